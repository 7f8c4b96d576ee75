"""Speed defaults on GPUs: the measured levers that pay, each an SFTConfig key a recipe can set to turn it off.

Measured on an H100 with benchmarks/speed.py (see benchmarks/results/ and the README's performance table).
- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where Liger
  supports the architecture. Off: `training.use_liger_kernel: false`.
- gradient_checkpointing: recomputation costs about a third of the step. For bf16 LoRA lora turns it off when
  the memory plan of `lora inspect-params` says the step fits in the GPU's free memory without it. QLoRA keeps
  it on: whoever quantizes has chosen memory over speed. Force either way with `training.gradient_checkpointing`.
"""

import importlib.util

# Architectures Liger patches in transformers (liger_kernel.transformers.monkey_patch).
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "glm4"}
MEMORY_HEADROOM = 0.85  # use at most this share of the free GPU memory by the plan's estimate


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def lora_parameter_count(model, lora_section) -> int:
    """r x (in + out) for every targeted linear layer: the adapter size, before PEFT wraps the model."""
    targets = lora_section.target_modules
    total = 0
    for name, module in model.named_modules():
        in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_features is None or name.endswith("lm_head"):
            continue
        last = name.split(".")[-1]
        if targets == "all-linear" or (isinstance(targets, list) and last in targets):
            total += lora_section.r * (in_features + out_features)
    return total


def fits_without_checkpointing(model, lora_section, batch_size: int, seq_len: int) -> bool:
    import torch

    from lora_cli.inspect import memory_plan

    plan = memory_plan(model.config, lora_parameter_count(model, lora_section), seq_len, batch_size,
                       lora_section.target_modules, lora_section.r, lora_section.dropout, lora_section.use_dora)
    row = next(r for r in plan["rows"] if r["method"] == "lora" and not r["gradient_checkpointing"])
    free, _ = torch.cuda.mem_get_info()
    # The plan counts the weights, which are already loaded: what this process holds is ours to plan with too.
    return row["device"] < MEMORY_HEADROOM * (free + torch.cuda.memory_reserved())


def gpu_speed_defaults(model, recipe, training: dict) -> dict:
    """SFTConfig values lora sets on a GPU unless the recipe sets them itself."""
    defaults = {}
    if liger_available() and model.config.model_type in LIGER_MODEL_TYPES:
        defaults["use_liger_kernel"] = True
    if not recipe.is_quantized and recipe.lora.target_modules is not None:
        seq_len = training.get("max_length") or 1024
        if fits_without_checkpointing(model, recipe.lora, training.get("per_device_train_batch_size", 8), seq_len):
            defaults["gradient_checkpointing"] = False
    return defaults
