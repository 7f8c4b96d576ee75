"""Why a lever stays off for an architecture, in words for the run's lever line (wiring.py prints them).

The levers recognise what they were written for: fused_mlp.py the Llama-style SwiGLU MLP (gate, up, down), lean
recomputation a layer that ends with `residual + down_proj(...)`, offloaded_attention.py four q/k/v/o projections,
fused_loss.py plain logits. Qwen3's q/k norms sit inside the attention, between projections the levers fuse, so
Qwen3 gets every lever. What each other family has instead is named here, so that a lever off is never a mystery.
"""

from lora_cli.experts import experts_modules
from lora_cli.speed.recomputation import LLAMA_STYLE_MODEL_TYPES

LOGIT_SOFTCAPPING = "final_logit_softcapping"
WRITES_INTO_PROJECTIONS = {"llama4", "llama4_text"}  # the fused layer's output is a view autograd cannot modify


def off_reasons(model) -> dict[str, str]:
    """lever -> why this model's architecture keeps it off (levers it can use are absent)."""
    config = model.config.get_text_config()
    model_type = config.model_type
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "")
    reasons = {}
    if model_type in WRITES_INTO_PROJECTIONS:
        reasons["fused_lora"] = "Llama 4's attention writes into its projections' outputs in place"
    if experts_modules(model):
        reasons["fused_mlp"] = "MoE: the routed experts are 3-D weights, not the gated MLP the kernel fuses"
    elif str(activation).startswith("gelu"):
        reasons["fused_mlp"] = f"GeGLU MLP ({activation}); the fused kernel is SwiGLU's"
    elif model_type not in LLAMA_STYLE_MODEL_TYPES:
        reasons["fused_mlp"] = f"{model_type}'s MLP is not the Llama-style gate/up/down one"
    if model_type not in LLAMA_STYLE_MODEL_TYPES:
        reasons["lean_recompute"] = f"{model_type}'s layers do not end with the residual add of down_proj"
    if getattr(config, LOGIT_SOFTCAPPING, None):
        reasons["fused_loss"] = "logit soft-capping, which Liger's cross-entropy kernel does not apply"
    return reasons
