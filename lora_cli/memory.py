"""The memory model: GPU memory of one LoRA, QLoRA or full fine-tuning step, from a model's config alone.

Why our own code: no library estimates the peak of a LoRA training step. It models
`torch.cuda.max_memory_allocated` during a step of TRL's SFTTrainer (bf16 autocast, AdamW, SDPA attention,
TRL's chunked LM head, which never materialises the logits), for T = batch_size x seq_len tokens:

  weights      bf16, 2 bytes a parameter. QLoRA: the decoder's Linear weights in NF4 with double quantization,
               0.5 + 1/64 + 4/(64*256) bytes (4-bit codes, an 8-bit absmax per 64 weights, an fp32 absmax per
               256 blocks), the rest bf16. Full fine-tuning: fp32 master weights, 4 bytes.
  LoRA params  trainable x 4 bytes for LoRA (PEFT upcasts adapters to fp32), x 2 for QLoRA (TRL casts them to
               bf16); gradients as much again; AdamW's two moments in the parameter's dtype.
  activations  what autograd keeps per layer and token: 4 bytes per normalised element (norms keep an fp32
               input), SDPA's q, k, v and output, the MLP activation's input and the two factors of its gate,
               the input of each trained module (one bf16 copy per module when the adapter is fp32 or LoRA
               dropout is on, else one per shared input), LoRA's r-wide intermediate, dropout masks. With
               gradient checkpointing each layer keeps only its input and one layer is recomputed at a time.
  buffers      one layer's backward working set (three intermediate-width gradients, the fp32 gradient of an
               upcast input, a dequantized weight for QLoRA), the LM head's tile (min(T, 4096) x
               min(vocab, 32768) x 2 bytes) and fp32 hidden-state gradient, the bf16 copies autocast makes of
               fp32 trainable weights, and two 32 MiB cuBLAS workspaces.
  peak         the largest of three moments: the LM head at the end of the forward pass, the backward pass of
               the last layer, the end of the backward pass (all gradients, for full fine-tuning).
  device       peak x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES: what to have free on the GPU.

Every term is counted from what the libraries allocate, not fitted. Against the three peaks measured for the
Llama-3.1-8B shape on an H100 (the plain stack, `python benchmarks/speed.py --modes baseline_*`) it gives 7.86 / 7.57, 18.05 / 17.81 and 42.83 / 42.60 GiB
(+3.8%, +1.4%, +0.5%), and it is within 10% of eleven more measured runs; docs/inspect-params.md has the tables.

Public functions:
  memory_plan(config, lora_trainable, seq_len=2048, batch_size=1, lora_modules=None, rank=16, dropout=0.0,
              dora=False) -> dict
      config: a transformers config (model.config); lora_trainable: the trainable parameter count;
      lora_modules: target module names as in a recipe, "all-linear", or None for PEFT's default.
      Rows for full / LoRA / QLoRA with checkpointing on and off, in bytes.
  format_memory_plan(plan, highlight=None) -> str     highlight=("qlora", True) marks a row.
"""

import dataclasses
import re
import warnings
from dataclasses import dataclass, field

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

from lora_cli.errors import LoraError, first_line
from lora_cli.experts import language_layers
from lora_cli.multimodal import auto_class
from lora_cli.recipe import config_default

GIB = 2**30
MIB = 2**20
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUBLAS_WORKSPACES = 64 * MIB  # 32 MiB per cuBLAS handle on Hopper, one for the forward and one for autograd's thread
CUDA_CONTEXT_BYTES = int(1.35 * GIB)  # measured on an H100 (torch 2.11, CUDA 13, bitsandbytes loaded)
ALLOCATOR_SLACK = 0.10  # reserved over allocated: 2-14% measured, the most on the smallest models
LM_HEAD_TOKEN_TILE = 4096  # TRL's chunked log-prob kernel: tokens per tile
LM_HEAD_VOCAB_TILE = 32768  # and vocabulary entries per tile
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h"}
# Activation functions written as several tensor ops in Python keep that many intermediates for backward.
ACTIVATION_SAVED = {"gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2}
METHODS = ("full", "lora", "qlora")
METHOD_NAMES = {"full": "full (fp32 + AdamW)", "lora": "LoRA (bf16)", "qlora": "QLoRA (NF4 + DQ)"}


@dataclass
class LayerModule:
    path: str  # relative to the decoder layer: self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def role(self) -> str:
        parent = self.parent.lower()
        return "attention" if "attn" in parent or "attention" in parent else "mlp"

    @property
    def is_output(self) -> bool:
        return self.leaf in OUTPUT_PROJECTIONS


@dataclass
class Layout:
    """The shapes of a causal LM that the memory plan uses, read off the meta model."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    quantizable: int  # weights of the Linear/Conv1D modules bitsandbytes quantizes: all but the LM head
    largest_linear: int
    layer_modules: list[LayerModule] = field(default_factory=list)
    norm_widths: list[int] = field(default_factory=list)
    gated: bool = True
    activation_saved: int = 1
    residual_dropouts: int = 0
    eager_attention: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a Linear or transformers' Conv1D (GPT-2), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def build_meta_model(config, trust_remote_code: bool = False):
    """The model for this config on the meta device: every shape, no memory, no weights downloaded."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise LoraError(
            f"The model type '{config.model_type}' is not a causal language model: {first_line(error)}"
        ) from None


def layer_key(name: str, prefix: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj; lm_head stays lm_head. Outside the language layers
    (an image-text model's vision tower) layer numbers become *, so that a tower's layers share their rows:
    model.vision_tower.encoder.layers.*.mlp.fc1."""
    if name.startswith(prefix + "."):
        rest = name[len(prefix) + 1:]
        return rest.partition(".")[2]
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def _global(config, name: str):
    """A config value, or None where the config has none or sets it per layer (Gemma 4 refuses the global read)."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError, a class older versions lack
        return None


def layout_of(model) -> Layout:
    config = model.config.get_text_config()
    _, layers = language_layers(model)
    output_embeddings = model.get_output_embeddings()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    attention = getattr(layers[0], "self_attn", None)  # Gemma 4 sizes heads per layer: its first layer's
    head_dim = getattr(attention, "head_dim", None) or _global(config, "head_dim") or hidden // heads
    kv_heads = _global(config, "num_key_value_heads") or heads // getattr(attention, "num_key_value_groups", 1)
    quantizable, largest = 0, 0
    for module in model.modules():
        shape = linear_shape(module)
        if shape and module is not output_embeddings:
            quantizable += shape[0] * shape[1]
            largest = max(largest, shape[0] * shape[1])
    layer_modules, norm_widths, dropouts = [], [], 0
    for name, module in layers[0].named_modules():
        shape = linear_shape(module)
        if shape:
            layer_modules.append(LayerModule(name, *shape))
        elif type(module).__name__.endswith("Norm") and getattr(module, "weight", None) is not None:
            width = module.weight.numel()
            if "q_norm" in name or "q_layernorm" in name:
                width = heads * head_dim
            elif "k_norm" in name or "k_layernorm" in name:
                width = kv_heads * head_dim
            norm_widths.append(width)
        elif isinstance(module, torch.nn.Dropout) and module.p > 0 and "attn_dropout" not in name:
            dropouts += 1  # residual dropouts keep a mask; SDPA's attention dropout keeps only an RNG state
    mlp_outputs = [m.in_features for m in layer_modules if m.role == "mlp" and m.is_output]
    intermediate = max(mlp_outputs) if mlp_outputs else getattr(config, "intermediate_size", None) or 4 * hidden
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or ""
    if getattr(config, "hidden_activation", None):
        activation = config.hidden_activation
    return Layout(
        model_type=config.model_type,
        layers=len(layers),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        params=sum(p.numel() for p in model.parameters()),
        quantizable=quantizable,
        largest_linear=largest,
        layer_modules=layer_modules,
        norm_widths=norm_widths,
        gated=any("gate" in m.leaf for m in layer_modules if m.role == "mlp"),
        activation_saved=ACTIVATION_SAVED.get(str(activation), 1),
        residual_dropouts=dropouts,
        eager_attention=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
    )


# ---------------------------------------------------------------------------------------------------------------
# The memory plan


def _layer_activation_bytes(lay: Layout, trained: list[LayerModule], per_module_copies: bool, lora_rank: int,
                            dropout: float, dora: bool, seq_len: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
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


def _method_plan(lay: Layout, method: str, checkpointing: bool, lora_trainable: int, trained: list[LayerModule],
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


def plan_for_layout(lay: Layout, lora_trainable: int, trained: list[LayerModule], rank: int, dropout: float, dora: bool,
          seq_len: int, batch_size: int) -> dict:
    rows = [
        _method_plan(lay, method, checkpointing, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)
        for method in METHODS
        for checkpointing in (True, False)
    ]
    tokens = seq_len * batch_size
    lora_train = {row["method"]: lora_train_plan(lay, row, trained, rank, tokens,
                                                 default_offloading(lay, row["method"], trained, dropout, tokens))
                  for row in rows if row["method"] != "full" and row["gradient_checkpointing"]}
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "rank": rank,
        "lora_trainable": lora_trainable,
        "lora_dropout": dropout,
        "rows": rows,
        # What lora train's offloaded checkpointing (speed/checkpointing.py, on GPUs) keeps in host memory instead: each
        # decoder layer's bf16 input. Measured: QLoRA 7.37 -> 6.56 GiB on the Llama-3.1-8B shape (plan: 1.0 GiB).
        "offloaded": lay.layers * batch_size * seq_len * lay.hidden * 2,
        # lora train's own step on a GPU with its default levers, GPU and host memory (lora_train_plan)
        "lora_train": lora_train,
        "assumptions": (
            "peak = torch.cuda.max_memory_allocated of a TRL SFTTrainer step: bf16 autocast, AdamW, SDPA, "
            "TRL's chunked LM head; LoRA adapters fp32 (PEFT), QLoRA adapters bf16 (TRL); full fine-tuning keeps "
            f"fp32 weights. device = peak x {1 + ALLOCATOR_SLACK:g} + {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context."
        ),
    }


# ---------------------------------------------------------------------------------------------------------------
# lora train on a GPU: the memory of its levers at any length, and the host memory offloading pins
#
# The rows above model the plain stack. lora train's step on a GPU (speed/: checkpointing with the layer inputs in
# host memory, the attention's saved tensors there too, the fused MLP, the chunked loss) keeps different tensors,
# and at long sequences the host memory it pins is the limit that kills a run (issue 27: 99 GB resident at 131,072
# tokens, no message). lora_train_plan counts both, for one choice of levers (Offloading); speed/policy.py picks the
# choice that fits the GPU and the host. Counted from what the code allocates (bf16 compute), per tokens T = batch x
# length; docs/long-sequences.md lists the terms and the command that measures them.

HOST_PROCESS_BYTES = 4 * GIB  # unpinned host memory of a training process: Python, the libraries, CUDA's host side,
# the data. An allowance, not a count: 77 GiB were in use at 65,536 tokens (issue 27), the pinned terms are 73.5.
TILED_MLP_TOKENS = 8192  # tokens per tile of speed/tiled_mlp.py: 224 MiB per intermediate-wide tensor for Llama-3.1-8B
# speed.tiled_mlp is on where one layer's MLP intermediates of the whole sequence (the gate and up outputs and the
# gradient at their product) would take more than this.
TILED_MLP_FROM_BYTES = 2 * GIB
LOSS_CHUNK_BYTES = GIB  # speed/fused_loss.py: the most its logits chunk takes (rows x vocabulary x 2 bytes)
# GPU memory beyond the terms lora_train_gpu_bytes names, counted in the attention backward as hidden-wide bf16
# tensors: measured, not yet traced. The Llama-3.1-8B shape cut to 8 layers, QLoRA, 524,288 tokens, attention
# recomputed, tiled MLP (H100, 2026-12-07, commit af9fe47, row 2026-12-07-h100-af9fe47-2): 66.36 GiB allocated at
# the peak against the named terms' 54.41, a gap of 3 such tensors (4 GiB each there). `BENCH_MEMORY=1 python
# benchmarks/speed.py --modes qlora --seq-lens 524288 --batch-size 1 --steps 1 --layers 2` prints what is alive at
# the peak. That run's graph also held the embedding output the whole step (one such tensor, not in the named
# terms), which speed/checkpointing.py's input_of_first_layer now lets go; the gap stays 3 until measured again.
UNTRACED_ATTENTION_BACKWARD = 3


@dataclass(frozen=True)
class Offloading:
    """One choice of lora train's memory levers on a GPU (speed.* keys)."""

    host_layers: int  # layers whose checkpointed input waits in host memory (layer_input_places says which)
    attention: bool  # speed.offload_attention: each layer's attention saved tensors and output in host memory
    embedding: bool  # speed.offload_embeddings: the input embedding in pinned host memory
    tiled_mlp: bool  # speed.tiled_mlp: the MLP computed in tiles of TILED_MLP_TOKENS tokens
    liger_norms: bool = True  # Liger's RMSNorm keeps its bf16 input; transformers' keeps an fp32 copy
    recomputed_layers: int = 0  # layers whose input is not kept: the backward reruns the layer before to get it


def layer_input_places(layers: int, host_layers: int, recomputed_layers: int) -> list[str]:
    """Where each decoder layer's checkpointed input waits for the backward, first layer first: "recomputed" for the
    last, third-last, ... (recomputed_layers of them, never two adjacent: each is rerun from the kept input of the
    layer before it, speed/checkpointing.py), then "host" for the first host_layers of the others and "gpu" for the
    rest (the first layers' backward comes last, so their inputs have the longest wait on the host)."""
    if not 0 <= recomputed_layers <= layers // 2:
        raise ValueError(f"{recomputed_layers} recomputed layer inputs of {layers} layers: at most {layers // 2}")
    recomputed = set(range(layers - 1, layers - 2 * recomputed_layers, -2))
    stored = [layer for layer in range(layers) if layer not in recomputed]
    places = {layer: "host" if index < host_layers else "gpu" for index, layer in enumerate(stored)}
    return [places.get(layer, "recomputed") for layer in range(layers)]


def pinned_bytes(count: int) -> int:
    """Host memory torch's caching host allocator takes for count bytes of pinned memory: the next power of two
    (c10's CachingHostAllocator rounds every pinned allocation up so that blocks can be reused)."""
    return 1 << (count - 1).bit_length() if count > 0 else 0


def attention_offloadable(trained: list[LayerModule], dropout: float) -> bool:
    """offloaded_attention.attention_of: all four attention projections trained (fused), no LoRA dropout."""
    attention = {m.leaf for m in trained if m.role == "attention"}
    return dropout == 0 and {"q_proj", "k_proj", "v_proj", "o_proj"} <= attention


def attention_host_bytes(lay: Layout, trained: list[LayerModule], rank: int, adapter_bytes: int, tokens: int,
                         compute_bytes: int = 2) -> int:
    """Host memory speed/offloaded_attention.py keeps for one layer: every storage the attention's backward reads
    (q and k after RoPE, v, SDPA's output, which o_proj reads as its input, the fp32 log-sum-exp, each projection's
    r-wide product x A^T; the bf16 casts of fp32 adapters) and the module's output, in buffers of their exact size
    (host_bytes, not the caching allocator). With a mask (padded rows) transformers repeats k and v to every query
    head; unpadded rows (batch 1, packed rows) take grouped-query attention as it is, which is what is counted."""
    projections = [m for m in trained if m.role == "attention"]
    per_token = compute_bytes * (2 * lay.q_dim + 2 * lay.kv_dim + lay.hidden + rank * len(projections)) + 4 * lay.heads
    casts = (compute_bytes * rank * sum(m.in_features + m.out_features for m in projections)
             if adapter_bytes != compute_bytes else 0)
    return tokens * per_token + casts


def tiled_mlp_pays(lay: Layout, tokens: int) -> bool:
    return mlp_intermediate_bytes(lay, tokens) > TILED_MLP_FROM_BYTES


def mlp_intermediate_bytes(lay: Layout, tokens: int) -> int:
    """One layer's MLP intermediates in its backward: the gate and up outputs (the fused MLP writes their gradients
    over them) and the gradient at their product, bf16."""
    return tokens * 3 * 2 * lay.intermediate


def loss_chunk_rows(vocab: int, hidden: int, tokens: int) -> int:
    """Rows of logits speed/fused_loss.py computes at once. Liger's chunk: logits of at most 8 x (tokens x hidden
    size) values (8 keeps a chunk of 1,024 rows for the Llama-3 vocabulary at 4,096 tokens, 256 MB in bf16, matmuls
    cuBLAS runs at full speed), a power of two; and at most LOSS_CHUNK_BYTES, as Liger's bound grows with the tokens
    (32 GiB of logits at 524,288 tokens of Llama-3.1-8B)."""
    chunks = -(-vocab // (8 * hidden))
    rows = 1 << (-(-tokens // chunks) - 1).bit_length()
    cap = 1 << max(0, (LOSS_CHUNK_BYTES // (2 * vocab)).bit_length() - 1)
    return max(1, min(tokens, rows, cap))


def lora_train_gpu_bytes(lay: Layout, row: dict, trained: list[LayerModule], rank: int, tokens: int,
                         off: Offloading) -> dict:
    """GPU memory of lora train's checkpointed step with these levers: the largest of three moments.

    Kept through the step: weights, adapters, their gradients and AdamW's moments (the row's), the layer inputs
    kept on the GPU (those neither on the host nor recomputed: layer_input_places), the rotary tables (cos and sin
    for every position, bf16), the token ids, labels and positions.
    The backward of one layer adds its rerun: the gradient at its output, its input (brought back from the host,
    and the next one already coming; or, for a recomputed input, made by a no-grad forward of the layer before from
    that layer's input, which it holds until its own backward: a forward's working set, less than a backward's),
    the attention's input (the norm's output) and saved tensors (q, k, v, output, log-sum-exp; back from the host
    or recomputed) and, with offload_attention, the attention module's output (held until its backward) and the
    next layer's, already coming; then
      MLP half:       the post-attention norm's saved input, the MLP's input and the gradient at it, and the MLP's
                      intermediates (for the whole sequence, or one tile with speed.tiled_mlp);
      attention half: the gradient at the attention output and the flash backward's dq, dk, dv, fp32 dq
                      accumulator and softmax sums (dk and dv for every query head first, under grouped-query
                      attention), and what a measurement found beyond these (UNTRACED_ATTENTION_BACKWARD).
    End of forward: the last hidden states, the final norm's output, the gradient the loss computes in its
    forward, and one chunk of logits (loss_chunk_rows).
    No L x L mask: unpadded rows give SDPA none (is_causal), packed rows none on the varlen path (speed/varlen.py);
    tests/test_memory.py checks both."""
    h, c = lay.hidden, 2
    static = row["weights"] + row["lora_params"] + row["gradients"] + row["optimizer"]
    if off.embedding:
        static -= c * lay.vocab * h
    gpu_inputs = (lay.layers - off.host_layers - off.recomputed_layers) * tokens * h * c
    kept = static + gpu_inputs + tokens * 2 * lay.head_dim * c + tokens * 3 * 8 + CUBLAS_WORKSPACES
    saved_attention = attention_host_bytes(lay, [], 0, 2, tokens) - tokens * c * h  # without the output
    saved_attention += tokens * c * rank * sum(m.role == "attention" for m in trained)
    # Two layer inputs at once: one back from the host and the next coming, or a recomputed one and its source; and
    # two attention outputs: the layer's and the next one's (offloaded_attention.SavedForward.fetch_output).
    brought_back = tokens * c * h * ((2 if off.host_layers or off.recomputed_layers else 0)
                                     + (2 if off.attention else 0))
    norm_bytes = 2 if off.liger_norms else 4
    rerun = (tokens * c * h  # the gradient at the layer's output
             + tokens * c * h  # the norm's output, the attention's input
             + (0 if off.liger_norms else tokens * 4 * h)  # transformers' input norm keeps an fp32 copy
             + brought_back + saved_attention)
    tile = min(tokens, TILED_MLP_TOKENS) if off.tiled_mlp else tokens
    dequantized = 2 * 2 * h * lay.intermediate if row["method"] == "qlora" else 0  # gate's and up's, for the backward
    mlp = (tokens * (norm_bytes * h + 2 * c * h) + mlp_intermediate_bytes(lay, tile) + dequantized
           + (2 * tile * c * h if off.tiled_mlp else 0))  # a tile's input gradient and output
    gqa = 2 * c * lay.q_dim if lay.kv_heads < lay.heads else 0
    attention = tokens * (c * lay.q_dim + c * (lay.q_dim + 2 * lay.kv_dim) + gqa + 4 * lay.q_dim + 4 * lay.heads
                          + UNTRACED_ATTENTION_BACKWARD * c * h)
    loss = tokens * (3 * c * h + 8) + loss_chunk_rows(lay.vocab, h, tokens) * lay.vocab * c
    moments = {"backward of a layer: MLP": kept + rerun + mlp, "backward of a layer: attention": kept + rerun + attention,
               "end of forward (loss)": kept + loss}
    moment, peak = max(moments.items(), key=lambda kv: kv[1])
    return {"peak": peak, "device": int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES, "peak_at": moment,
            "static": static, "layer_inputs": gpu_inputs,
            "rerun": rerun, "mlp": mlp, "attention": attention, "loss": loss}


def lora_train_host_bytes(lay: Layout, trained: list[LayerModule], rank: int, adapter_bytes: int, tokens: int,
                          off: Offloading) -> dict:
    """Host memory of lora train's step with these levers: pinned (the layer inputs and the attention in buffers of
    their exact size, the embedding through torch's caching host allocator) and the process. Recomputed layer
    inputs take none."""
    terms = {
        "layer_inputs": off.host_layers * tokens * lay.hidden * 2,
        "attention": lay.layers * attention_host_bytes(lay, trained, rank, adapter_bytes, tokens) if off.attention else 0,
        "embedding": pinned_bytes(lay.vocab * lay.hidden * 2) if off.embedding else 0,
        "process": HOST_PROCESS_BYTES,
    }
    return {**terms, "total": sum(terms.values())}


def lora_train_plan(lay: Layout, row: dict, trained: list[LayerModule], rank: int, tokens: int,
                    off: Offloading) -> dict:
    """GPU and host memory of lora train's step (row: the plan's row of its method, checkpointing on)."""
    adapter_bytes = 4 if row["method"] == "lora" else 2
    return {"levers": dataclasses.asdict(off), "gpu": lora_train_gpu_bytes(lay, row, trained, rank, tokens, off),
            "host": lora_train_host_bytes(lay, trained, rank, adapter_bytes, tokens, off)}


def default_offloading(lay: Layout, method: str, trained: list[LayerModule], dropout: float, tokens: int) -> Offloading:
    """The levers lora train uses on a GPU when both memories have room: every layer input and attention on the
    host, the embedding too for QLoRA (untied), tiled MLP where it pays."""
    return Offloading(host_layers=lay.layers, attention=attention_offloadable(trained, dropout),
                      embedding=method == "qlora" and not lay.tied, tiled_mlp=tiled_mlp_pays(lay, tokens))


def _match(module_path: str, names) -> bool:
    return any(module_path == n or module_path.endswith("." + n) for n in names)


def memory_plan(config, lora_trainable: int, seq_len: int = 2048, batch_size: int = 1, lora_modules=None,
                rank: int = 16, dropout: float = 0.0, dora: bool = False) -> dict:
    """The memory plan for training this config (a transformers config) with lora_trainable adapter parameters.

    lora_modules: the target module names as in a recipe, "all-linear" for every Linear of a decoder layer, or
    None for PEFT's default for the architecture. Returns a JSON-serialisable dict; format_memory_plan prints it.
    """
    lay, trained = layout_and_trained(config, lora_modules)
    return plan_for_layout(lay, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)


def layout_and_trained(config, lora_modules=None) -> tuple[Layout, list[LayerModule]]:
    """The config's Layout and the decoder-layer modules LoRA trains (lora_modules as memory_plan takes them)."""
    lay = layout_of(build_meta_model(config))
    if lora_modules is None:
        lora_modules = PEFT_DEFAULTS.get(lay.model_type) or "all-linear"
    if lora_modules == "all-linear":
        return lay, lay.layer_modules
    names = [lora_modules] if isinstance(lora_modules, str) else list(lora_modules)
    return lay, [m for m in lay.layer_modules if _match(m.path, names)]


PAIR_METHODS = ("dpo", "orpo", "simpo")
GRPO_PROMPT_TOKENS = 512  # prompt tokens planned before GRPO's completions, where no data says (--seq-len overrides)


def method_step(method: str, value) -> tuple[int, int, str]:
    """(sequences a step runs with gradients, tokens each, what they are in words) for a method's training step;
    value(name) gives a training setting (the recipe's, else the method's default).

    DPO, ORPO and SimPO forward the chosen and the rejected completion of every pair (one batch of both); KTO one
    completion per example (its KL estimate's mismatched completions go through without gradients, so they keep no
    activations); GRPO per_device_train_batch_size completions, num_generations of them per prompt. Reference passes
    run without gradients and keep nothing for the backward.
    """
    batch = value("per_device_train_batch_size")
    if method == "grpo":
        completion = value("max_completion_length")
        groups = value("num_generations")
        return batch, GRPO_PROMPT_TOKENS + completion, (
            f"{batch} completions ({groups} per prompt) of up to {completion} tokens after a prompt of up to "
            f"{GRPO_PROMPT_TOKENS}")
    seq_len = value("max_length") or 1024
    if method in PAIR_METHODS:
        return 2 * batch, seq_len, f"the chosen and the rejected completion of {batch} pairs"
    return batch, seq_len, f"{batch} {'labelled completions' if method == 'kto' else 'examples'}"


def recipe_value(recipe):
    """value(name) for method_step: the recipe's training setting, else the method's default."""
    return lambda name: recipe.training[name] if name in recipe.training else config_default(recipe.method, name)


def gib_text(n: int) -> str:
    return "<0.01" if 0 < n < GIB / 200 else f"{n / GIB:.2f}"


def text_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_memory_plan(plan: dict, highlight: tuple[str, bool] | None = None) -> str:
    """The memory plan as a text table (GiB); highlight=(method, checkpointing) marks one row."""
    tokens = f"{plan['batch_size']} x {plan['seq_len']} tokens"
    title = f"Memory plan for one training step, batch {tokens}, LoRA r={plan['rank']} (GiB, peak = max allocated):"
    lines = [title]
    if plan.get("step"):
        lines.append(f"  a step of {plan['step']}")
    header = ["method", "checkpointing", "weights", "LoRA", "grads", "optimizer", "activations", "peak", "device"]
    rows = []
    for row in plan["rows"]:
        mark = "  <- recipe" if highlight == (row["method"], row["gradient_checkpointing"]) else ""
        rows.append([METHOD_NAMES[row["method"]], "on" if row["gradient_checkpointing"] else "off",
                     gib_text(row["weights"]), "-" if row["method"] == "full" else gib_text(row["lora_params"]),
                     gib_text(row["gradients"]), gib_text(row["optimizer"]), gib_text(row["activations"]), gib_text(row["peak"]),
                     gib_text(row["device"]) + mark])
    lines += text_table(header, rows, right=set(range(2, 9)))
    lines.append("  activations include the backward working set, the LM head's buffers and cuBLAS workspaces;")
    lines.append("  device adds the CUDA context and allocator slack. Measured on an H100: docs/inspect-params.md.")
    lines.append(f"  With checkpointing on a GPU, lora train keeps each layer's input in host memory "
                 f"(speed.offload_activations):\n  {gib_text(plan['offloaded'])} GiB less on the rows with checkpointing on.")
    lines += format_lora_train(plan.get("lora_train", {}))
    return "\n".join(lines)


def format_lora_train(lora_train: dict) -> list[str]:
    """lora train's own step on a GPU with its default levers: GPU and host memory (GiB)."""
    if not lora_train:
        return []
    lines = ["lora train on a GPU, its default levers (checkpointing, offloading; docs/long-sequences.md), GiB:"]
    header = ["method", "GPU peak", "device", "host: layer inputs", "attention", "embedding", "process", "host total"]
    rows = []
    for method, part in lora_train.items():
        gpu, host = part["gpu"], part["host"]
        rows.append([METHOD_NAMES[method], gib_text(gpu["peak"]), gib_text(gpu["device"]),
                     gib_text(host["layer_inputs"]), gib_text(host["attention"]), gib_text(host["embedding"]),
                     gib_text(host["process"]), gib_text(host["total"])])
    lines += text_table(header, rows, right=set(range(1, 8)))
    levers = next(iter(lora_train.values()))["levers"]
    lines.append(f"  tiled MLP {'on' if levers['tiled_mlp'] else 'off'}; host memory is pinned (page-locked): "
                 "lora train turns levers off or refuses before loading when it does not fit.")
    return lines
