"""Speed defaults on GPUs: the measured levers that pay, each an SFTConfig key a recipe can turn off.

Measured on an H100 with benchmarks/speed.py (see benchmarks/results/ and the README's performance table).
- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where Liger
  supports the architecture; `training.use_liger_kernel: false` turns it off.
"""

import importlib.util

# Architectures Liger patches in transformers (liger_kernel.transformers.monkey_patch).
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "glm4"}


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def gpu_speed_defaults(model) -> dict:
    """SFTConfig values lora sets on a GPU unless the recipe sets them itself."""
    defaults = {}
    if liger_available() and model.config.model_type in LIGER_MODEL_TYPES:
        defaults["use_liger_kernel"] = True
    return defaults
