"""Speed and memory defaults on GPUs: the measured levers that pay, each an SFTConfig key a recipe can set itself.

Measured on an H100 with benchmarks/speed.py (benchmarks/results/, the README's performance table).
- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where Liger
  supports the architecture (QLoRA -3% to +11% over three runs, 0.2 GiB less). Off: `training.use_liger_kernel: false`.
- gradient_checkpointing, from the memory plan of `lora inspect-params` and the GPU's memory:
  bf16 LoRA turns recomputation off when the step fits without it (it costs about a third of the step).
  QLoRA keeps it on (whoever quantizes has chosen memory over speed), and when even that does not fit, the
  checkpointed layer inputs go to pinned host memory (transformers' `offload`: 7.37 -> 6.50 GiB at 16% less
  speed on the Llama-3.1-8B shape, same loss). The recipe decides instead with `training.gradient_checkpointing`
  and `training.gradient_checkpointing_kwargs`.
"""

import importlib.util
import inspect
import sys

# Architectures Liger patches in transformers (liger_kernel.transformers.monkey_patch).
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "glm4"}
MEMORY_HEADROOM = 0.85  # plan with at most this share of the GPU memory available to us


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def offload_supported() -> bool:
    """Whether this transformers can keep checkpointed activations in host memory (5.23 can; checked, not assumed)."""
    from transformers import PreTrainedModel

    method = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    return method is not None and "offload" in inspect.signature(method).parameters


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


def offloaded_bytes(config, batch_size: int, seq_len: int) -> int:
    """What offloading moves to the host: each decoder layer's bf16 input, kept for recomputation."""
    text = config.get_text_config()
    return text.num_hidden_layers * batch_size * seq_len * text.hidden_size * 2


def choose_checkpointing(plan: dict, available: int, quantized: bool, offload_bytes: int, can_offload: bool) -> dict:
    """SFTConfig values for checkpointing from a memory plan and the bytes of GPU memory available to us."""
    budget = MEMORY_HEADROOM * available
    method = "qlora" if quantized else "lora"
    rows = {row["gradient_checkpointing"]: row["device"] for row in plan["rows"] if row["method"] == method}
    if not quantized and rows[False] < budget:
        return {"gradient_checkpointing": False}
    if rows[True] >= budget and can_offload and rows[True] - offload_bytes < budget:
        return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"offload": True}}
    return {}


def gpu_speed_defaults(model, recipe, training: dict) -> dict:
    """SFTConfig values lora sets on a GPU unless the recipe sets them itself."""
    import torch

    from lora_cli.inspect import memory_plan

    defaults = {}
    if liger_available() and model.config.model_type in LIGER_MODEL_TYPES:
        defaults["use_liger_kernel"] = True
    if recipe.lora.target_modules is None or "gradient_checkpointing" in training:
        return defaults
    lora = recipe.lora
    seq_len, batch_size = training.get("max_length") or 1024, training.get("per_device_train_batch_size", 8)
    plan = memory_plan(model.config, lora_parameter_count(model, lora), seq_len, batch_size, lora.target_modules,
                       lora.r, lora.dropout, lora.use_dora)
    free, _ = torch.cuda.mem_get_info()
    # The plan counts the weights, which may already be loaded: what this process holds is ours to plan with too.
    available = free + torch.cuda.memory_reserved()
    choice = choose_checkpointing(plan, available, recipe.is_quantized, offloaded_bytes(model.config, batch_size, seq_len),
                                  offload_supported() and "gradient_checkpointing_kwargs" not in training)
    method = "qlora" if recipe.is_quantized else "lora"
    needed = min(r["device"] for r in plan["rows"] if r["method"] == method)
    if not choice and needed >= MEMORY_HEADROOM * available:
        print(f"warning: the memory plan needs about {needed / 2**30:.1f} GiB and this GPU has {available / 2**30:.1f} "
              "GiB: expect out-of-memory; lower training.per_device_train_batch_size or training.max_length.",
              file=sys.stderr, flush=True)
    return {**defaults, **choice}
