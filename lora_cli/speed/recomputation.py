"""The state a rerun of a checkpointed layer shares between levers, and lean recomputation.

checkpointing.OffloadedCheckpoint sets `Recomputation.active` while it reruns a layer for its backward; the fused
layers (lora_linear.py, fused_mlp.py) and offloaded_attention.py read it to skip or replay work in that rerun. A
module of its own so that the layers read it without importing the checkpointing that imports them.
"""


class Recomputation:
    """Whether OffloadedCheckpoint is rerunning a layer for its backward (set and read in the autograd thread)."""

    active = False


# Lean recomputation. A checkpointed layer is rerun only for the tensors its backward saves, and in a Llama-style
# decoder layer (`hidden = residual + mlp.down_proj(...)`) nothing saved depends on down_proj's output: its own
# backward needs only its input, and the residual add needs no values. So the rerun skips that projection's
# dequantization and matmul: 27% of a layer's weights and matmul work for the Llama-3.1-8B shape. Only
# architectures whose layers end that way (with a norm after the MLP, as in Gemma 2 and OLMo 2, the output is
# read), and only where down_proj is a fused LoRA layer.
# Decoder layers `h = x + attn(norm(x)); out = h + mlp.down_proj(silu(gate_proj(n)) * up_proj(n)), n = norm(h)`:
# the shape lean recomputation and fused_mlp.py rely on.
LLAMA_STYLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def lean_recompute_supported(model) -> bool:
    return model.config.model_type in LLAMA_STYLE_MODEL_TYPES


def output_is_read(layer) -> bool:
    """Whether anything reads the layer's output in this call: not in a lean rerun of a layer marked unread."""
    return not (Recomputation.active and getattr(layer, "unread_in_recompute", False))


def mark_unread_in_recompute(layer, lean: bool) -> None:
    projection = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if hasattr(projection, "fused_adapters"):
        projection.unread_in_recompute = lean
