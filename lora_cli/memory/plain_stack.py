"""The plain stack's step (TRL's SFTTrainer, transformers' checkpointing) for full fine-tuning, LoRA and QLoRA: the
rows of the memory plan (lora_cli/memory/__init__.py lists the terms)."""

from lora_cli.memory.device import ALLOCATOR_SLACK, CUBLAS_WORKSPACES, CUDA_CONTEXT_BYTES
from lora_cli.memory.layout import LayerModule, Layout

NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LM_HEAD_TOKEN_TILE = 4096  # TRL's chunked log-prob kernel: tokens per tile
LM_HEAD_VOCAB_TILE = 32768  # and vocabulary entries per tile
METHODS = ("full", "lora", "qlora")


def _layer_activation_bytes(lay: Layout, trained: list[LayerModule], per_module_copies: bool, lora_rank: int,
                            dropout: float, dora: bool, seq_len: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (lora_cli/memory/__init__.py lists them)."""
    saved = sum(4 * width for width in lay.norm_widths)
    if lay.eager_attention:  # repeated k and v, and the fp32 + bf16 attention probabilities
        saved += 2 * 3 * lay.q_dim + 8 * lay.heads * seq_len
    else:
        saved += 2 * (2 * lay.q_dim + 2 * lay.kv_dim)
    saved += 2 * lay.intermediate * lay.activation_saved
    if lay.gated:
        saved += 2 * 2 * lay.intermediate
    saved += lay.residual_dropouts * lay.hidden
    shared_inputs = {}
    for module in trained:
        if per_module_copies or dropout > 0:
            saved += 2 * module.in_features + (module.in_features if dropout > 0 else 0)
        elif not (module.role == "attention" and module.is_output and not lay.eager_attention):
            shared_inputs[(module.parent, module.is_output)] = module.in_features  # o_proj shares SDPA's output
        if lora_rank:
            saved += 2 * lora_rank + (4 * module.out_features if dora else 0)
    return saved + 2 * sum(shared_inputs.values())


def method_row(lay: Layout, method: str, checkpointing: bool, lora_trainable: int, trained: list[LayerModule],
               rank: int, dropout: float, dora: bool, seq_len: int, batch_size: int) -> dict:
    tokens = seq_len * batch_size
    full = method == "full"
    if full:
        weights, adapter, trainable, param_bytes = 4 * lay.params, 0, lay.params, 4
        trained = lay.layer_modules
    else:
        param_bytes = 4 if method == "lora" else 2
        trainable = lora_trainable
        adapter = trainable * param_bytes
        if method == "qlora":
            weights = int(lay.quantizable * NF4_DOUBLE_QUANT_BYTES) + 2 * (lay.params - lay.quantizable)
        else:
            weights = 2 * lay.params
    optimizer = 2 * trainable * param_bytes
    grads = trainable * param_bytes
    copies = param_bytes == 4  # fp32 trainables under bf16 autocast: one bf16 copy per module input and weight
    autocast_cache = 2 * (lay.quantizable if full else (lora_trainable if copies else 0))
    per_layer = tokens * _layer_activation_bytes(lay, trained, copies, 0 if full else rank, 0.0 if full else dropout,
                                                 dora and not full, seq_len)
    checkpoint = tokens * lay.hidden * (4 if full else 2)  # the layer input: fp32 residual stream when full
    saved = lay.layers * (checkpoint if checkpointing else per_layer)
    working = tokens * 6 * lay.intermediate
    if copies and trained:
        working += tokens * 4 * max(m.in_features for m in trained)
    if method == "qlora" or full:
        working += 2 * lay.largest_linear
    if dora and trained:
        working += 4 * max(m.in_features * m.out_features for m in trained)
    head = tokens * lay.hidden * (4 + 2 + 4) + min(tokens, LM_HEAD_TOKEN_TILE) * min(lay.vocab, LM_HEAD_VOCAB_TILE) * 2
    head_grads = 4 * lay.vocab * lay.hidden if full else 0
    static = weights + adapter + optimizer
    # grads at each moment: LoRA's are counted whole (they are small); full fine-tuning's build up layer by layer
    moments = {
        "end of forward (LM head)": (head_grads if full else grads, saved + autocast_cache + head),
        "backward of the last layer": (
            head_grads + grads // lay.layers if full else grads,
            saved + (per_layer + autocast_cache // lay.layers if checkpointing else autocast_cache)
            + tokens * lay.hidden * 2 + working,
        ),
        "end of backward": (grads, per_layer + checkpoint + working),
    }
    moment, (grads_now, activations) = max(moments.items(), key=lambda kv: sum(kv[1]))
    activations += CUBLAS_WORKSPACES
    peak = static + grads_now + activations
    return {
        "method": method,
        "gradient_checkpointing": checkpointing,
        "weights": weights,
        "lora_params": adapter,
        "gradients": grads_now,
        "optimizer": optimizer,
        "activations": activations,
        "peak": peak,
        "device": int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES,
        "peak_at": moment,
    }
