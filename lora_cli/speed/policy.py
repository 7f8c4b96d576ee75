"""Which GPU levers a run gets: the library settings lora sets on a GPU unless the recipe sets them, from the
memory plan (memory.py) and the GPU's free memory.

- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) where Liger supports the architecture.
- gradient_checkpointing: bf16 LoRA turns recomputation off when the step fits without it (it costs about a third
  of the step); QLoRA keeps it on (whoever quantizes has chosen memory over speed).
- batches copied to the GPU without a wait (`training.accelerator_config: {non_blocking: true}`).
- CUDA graphs only when the step still fits beside their memory pool (graphs_fit).
"""

import importlib.util
import sys

import torch
from accelerate import PartialState

from lora_cli.adapters import lora_parameter_count
from lora_cli.memory import memory_plan, method_step, recipe_value

LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "glm4"}
MEMORY_HEADROOM = 0.85  # plan with at most this share of the GPU memory available to us


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def device_bytes(plan: dict, quantized: bool) -> dict[bool, int]:
    """The plan's GPU memory for this method, by whether checkpointing is on."""
    method = "qlora" if quantized else "lora"
    return {row["gradient_checkpointing"]: row["device"] for row in plan["rows"] if row["method"] == method}


def choose_checkpointing(plan: dict, available: int, quantized: bool) -> dict:
    """SFTConfig values for checkpointing from a memory plan and the bytes of GPU memory available to us."""
    rows = device_bytes(plan, quantized)
    if not quantized and rows[False] < MEMORY_HEADROOM * available:
        return {"gradient_checkpointing": False}
    return {}


def gpu_speed_defaults(model, recipe, training: dict) -> dict:
    """SFTConfig values lora sets on a GPU unless the recipe sets them itself."""
    # Batches are copied to the GPU without waiting for the copy: a waiting copy drains the GPU's queue every step,
    # which then idles while the host runs the step's first Python (transformers' mask, the rotary tables).
    defaults = {"accelerator_config": {"non_blocking": True}}
    if liger_available() and model.config.model_type in LIGER_MODEL_TYPES:
        defaults["use_liger_kernel"] = True
    if recipe.lora.target_modules is None or "gradient_checkpointing" in training:
        return defaults
    lora = recipe.lora
    defaults = recipe_value(recipe)
    batch_size, seq_len, _ = method_step(recipe.method, lambda name: training.get(name) or defaults(name))
    plan = memory_plan(model.config, lora_parameter_count(model, lora), seq_len, batch_size, lora.target_modules,
                       lora.r, lora.dropout, lora.use_dora)
    available = available_gpu_bytes()
    choice = choose_checkpointing(plan, available, recipe.is_quantized)
    rows = device_bytes(plan, recipe.is_quantized)
    checkpointing = choice.get("gradient_checkpointing", True)
    offloaded = plan["offloaded"] if recipe.speed.offload_activations and checkpointing else 0
    needed = min(rows.values()) - offloaded
    if PartialState().is_main_process:
        moved = f" ({offloaded / 2**30:.1f} GiB of it moved to host memory)" if offloaded else ""
        print(f"memory plan (GPU memory with the CUDA context): {rows[False] / 2**30:.1f} GiB without "
              f"recomputation, {rows[True] / 2**30:.1f} GiB with it{moved}; this GPU has {available / 2**30:.1f} GiB",
              flush=True)
    if not choice and needed >= MEMORY_HEADROOM * available:
        print(f"warning: the memory plan needs about {needed / 2**30:.1f} GiB and this GPU has {available / 2**30:.1f} "
              "GiB: expect out-of-memory; lower training.per_device_train_batch_size or training.max_length.",
              file=sys.stderr, flush=True)
    return {**defaults, **choice}


def available_gpu_bytes() -> int:
    """The GPU memory free to us: the plan counts the weights, which may already be loaded, so what this process
    holds is ours to plan with too."""
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved()


def step_memory_plan(peft_model, recipe, args) -> dict:
    """lora inspect-params' memory plan for the step these training arguments set up, with the exact adapter size."""
    trainable, _ = peft_model.get_nb_trainable_parameters()
    lora = recipe.lora
    batch_size, seq_len, step = method_step(recipe.method, lambda name: getattr(args, name, None))
    plan = memory_plan(peft_model.get_base_model().config, trainable, seq_len, batch_size, lora.target_modules,
                       lora.r, lora.dropout, lora.use_dora)
    return {**plan, "step": step}


def graphs_fit(peft_model, recipe, args) -> bool:
    """Whether the step, checkpointed and offloaded, still fits with the CUDA graphs' memory pool beside it.

    The pool keeps the memory of one layer's recomputation and backward for the graphs alone (1.01 GiB for the
    Llama-3.1-8B QLoRA step on an H100, graph_pool_gib of `python benchmarks/speed.py --modes qlora`: about twice
    the plan's activations per layer), memory the rest of the step cannot reuse."""
    plan = step_memory_plan(peft_model, recipe, args)
    rows = device_bytes(plan, recipe.is_quantized)
    pool = 2 * (rows[False] - rows[True]) / peft_model.get_base_model().config.get_text_config().num_hidden_layers
    return rows[True] - plan["offloaded"] + pool < MEMORY_HEADROOM * available_gpu_bytes()
