"""lora train's own step on a GPU: the GPU memory of its levers at any length, and the host memory offloading pins.

The plain stack's rows (plain_stack.py) do not model it: lora train's step on a GPU (speed/: checkpointing with the
layer inputs in host memory, the attention's saved tensors there too, the fused MLP, the chunked loss) keeps other
tensors, and at long sequences the host memory it pins is the limit that kills a run (issue 27: 99 GB resident at
131,072 tokens, no message). lora_train_plan counts both, for one choice of levers (Offloading); speed/policy.py
picks the choice that fits the GPU and the host. Counted from what the code allocates (bf16 compute), per tokens
T = batch x length; docs/long-sequences.md lists the terms and the command that measures them.
"""

import dataclasses
from dataclasses import dataclass

from lora_cli.memory.device import ALLOCATOR_SLACK, CUBLAS_WORKSPACES, CUDA_CONTEXT_BYTES, GIB
from lora_cli.memory.layout import LayerModule, Layout

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
# the peak against the named terms' 54.41, a gap of 3 such tensors (4 GiB each there). One of them was the
# embedding output, which that run's graph held the whole step and speed/checkpointing.py's input_of_first_layer
# now lets go: the full 32 layers at 524,288 tokens (commit 11c9166, row 2026-12-07-h100-11c9166) peaked at 64.99
# GiB allocated, 0.17 under the plan with 2. `BENCH_MEMORY=1 python benchmarks/speed.py --modes qlora --seq-lens
# 524288 --batch-size 1 --steps 1 --layers 2` prints what is alive at the peak.
UNTRACED_ATTENTION_BACKWARD = 2


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
