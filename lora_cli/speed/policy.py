"""Which GPU levers a run gets: the library settings lora sets on a GPU unless the recipe sets them, from the
memory plan (lora_cli/memory) and the GPU's free memory.

- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) where Liger supports the architecture.
- gradient_checkpointing: bf16 LoRA turns recomputation off when the step fits without it (it costs about a third
  of the step); QLoRA keeps it on (whoever quantizes has chosen memory over speed).
- batches copied to the GPU without a wait (`training.accelerator_config: {non_blocking: true}`).
- CUDA graphs only when the step still fits beside their memory pool (graphs_fit).
- Host memory (choose_offloading, before the model loads): offloading pins host memory, which a long sequence can
  exhaust, and the kernel's out-of-memory killer then ends the run without a message (issue 27). The levers that
  pin it are chosen to fit this machine's host memory and the GPU's, or the run is refused with the numbers.
- Tiled MLP (speed.tiled_mlp) where one layer's MLP intermediates would be large (memory.lora_train.tiled_mlp_pays).
"""

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from lora_cli.adapters import lora_parameter_count
from lora_cli.errors import LoraError
from lora_cli.memory.device import GIB
from lora_cli.memory.layout import layout_and_trained
from lora_cli.memory.lora_train import (Offloading, attention_offloadable, lora_train_plan, mlp_intermediate_bytes,
                                        tiled_mlp_pays)
from lora_cli.memory.plan import memory_plan, method_step, plan_for_layout, recipe_value

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
    batch_size, seq_len = planned_step(recipe, training)
    plan = memory_plan(model.config, lora_parameter_count(model, lora), seq_len, batch_size, lora.target_modules,
                       lora.r, lora.dropout, lora.use_dora)
    available = available_gpu_bytes()
    choice = choose_checkpointing(plan, available, recipe.is_quantized)
    rows = device_bytes(plan, recipe.is_quantized)
    checkpointing = choice.get("gradient_checkpointing", True)
    offloaded = plan["offloaded"] if recipe.speed.offload_activations and checkpointing else 0
    method = "qlora" if recipe.is_quantized else "lora"
    needed = plan["lora_train"][method]["gpu"]["device"] if offloaded else min(rows.values())
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


def planned_step(recipe, training: dict) -> tuple[int, int]:
    """(sequences, tokens each) of the recipe's training step as the memory plan counts them (memory.plan.method_step:
    DPO's chosen and rejected completions, GRPO's prompt and completion), from the training settings, else the
    method's defaults."""
    recipe_or_default = recipe_value(recipe)
    batch_size, seq_len, _ = method_step(recipe.method, lambda name: training.get(name) or recipe_or_default(name))
    return batch_size, seq_len


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


# ---------------------------------------------------------------------------------------------------------------
# Host memory: what offloading may pin

HOST_MEMORY_ENV = "LORA_HOST_MEMORY_BYTES"  # the host memory to plan with, in bytes, instead of what the machine says
HOST_HEADROOM = 0.9  # plan with at most this share of the host memory available: pinned pages cannot be swapped out


@dataclass(frozen=True)
class HostMemory:
    """The host memory a run may use: MemAvailable, or what the container's limit leaves, whichever is less."""

    available: int
    total: int
    limit: int | None = None  # the container's limit (cgroup), where there is one
    source: str = "MemAvailable"

    def describe(self) -> str:
        limit = f", container limit {self.limit / GIB:.1f} GiB" if self.limit is not None else ""
        return f"{self.available / GIB:.1f} GiB available ({self.source}; {self.total / GIB:.1f} GiB in all{limit})"


def host_memory(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> HostMemory:
    """This machine's host memory for planning; LORA_HOST_MEMORY_BYTES, where set, replaces what is available."""
    info = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            info[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal", 0)
    available, source = info.get("MemAvailable", total), "MemAvailable"
    limit, used = cgroup_memory(cgroup)
    if limit is not None and limit < total:
        if limit - used < available:
            available, source = max(0, limit - used), "the container's limit less its use"
    else:
        limit = None
    override = os.environ.get(HOST_MEMORY_ENV)
    if override:
        try:
            available, source = int(float(override)), HOST_MEMORY_ENV
            total = max(total, available)
        except ValueError:
            raise LoraError(f"{HOST_MEMORY_ENV}={override!r}: give the host memory to plan with in bytes, for example "
                            f"{HOST_MEMORY_ENV}={64 * GIB}.") from None
    return HostMemory(available, total or available, limit, source)


def cgroup_memory(root: Path) -> tuple[int | None, int]:
    """(limit, usage) of this process's memory cgroup: v2 memory.max and memory.current, or v1 memory.limit_in_bytes
    and memory.usage_in_bytes; (None, 0) without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None, 0
        try:
            used = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            used = 0
        return int(text), used
    return None, 0


@dataclass
class MemoryChoice:
    """The memory levers a run gets (memory.lora_train.Offloading), their plan (lora_train_plan) and why any is off."""

    offloading: Offloading
    plan: dict
    reasons: dict = field(default_factory=dict)  # lever -> why it is off or partial, for the lever line
    refused: bool = False  # the host holds only a split of the layer inputs that the GPU cannot hold
    tokens: int = 0  # a step's tokens (batch x length) the plan counted: the host buffers are made that large


def choose_offloading(lay, row: dict, trained: list, rank: int, dropout: float, tokens: int, speed,
                      host: HostMemory, gpu_available: int | None, processes: int = 1,
                      liger_norms: bool = True) -> MemoryChoice:
    """The levers that fit both the host memory (its share for each of this machine's processes) and the GPU
    (gpu_available; None: not checked). In order: all that the recipe allows; offload_attention off; the layer
    inputs of only the first layers on the host, the rest on the GPU; where the GPU cannot hold the rest, the fewest
    recomputed layer inputs (made again in the backward from the layer before's,
    memory.lora_train.layer_input_places) that let it. LoraError when even the most recomputed inputs leave the GPU
    more than it holds: a run that would pin more host memory than there is gets killed without a message.

    lay, row, trained: memory.layout.layout_and_trained and the plan's row of the method with checkpointing on."""
    arguments = (lay, row, trained, rank, dropout, tokens, speed, host, gpu_available, processes, liger_norms)
    chosen = fit_offloading(*arguments)
    if chosen.refused:
        raise LoraError(memory_refusal(*arguments, chosen))
    return chosen


def fit_offloading(lay, row, trained, rank, dropout, tokens, speed, host, gpu_available, processes,
                   liger_norms) -> "MemoryChoice":
    """choose_offloading's choice, marked refused instead of raising."""
    budget = host_budget(host, processes)
    wanted = Offloading(host_layers=lay.layers if speed.offload_activations else 0,
                        attention=speed.offload_attention and attention_offloadable(trained, dropout),
                        embedding=speed.offload_embeddings and row["method"] == "qlora" and not lay.tied,
                        tiled_mlp=speed.tiled_mlp and tiled_mlp_pays(lay, tokens), liger_norms=liger_norms)
    reasons = {}
    if wanted.tiled_mlp:
        reasons["tiled_mlp"] = (f"an MLP's intermediates of {tokens:,} tokens: "
                                f"{mlp_intermediate_bytes(lay, tokens) / GIB:.1f} GiB")

    def plan(off):
        return lora_train_plan(lay, row, trained, rank, tokens, off)

    def host_need(off):
        return plan(off)["host"]["total"]

    def gpu_fits(off):
        return gpu_available is None or plan(off)["gpu"]["device"] <= gpu_available

    available = f"{budget / GIB:.1f} available"
    choice = wanted
    if host_need(choice) > budget and choice.attention:
        reasons["offload_attention"] = f"host memory: needs {host_need(choice) / GIB:.1f} GiB, {available}"
        choice = dataclasses.replace(choice, attention=False)
    if host_need(choice) > budget and choice.host_layers:
        all_layers = host_need(choice)
        without = host_need(dataclasses.replace(choice, host_layers=0))
        per_layer = (all_layers - without) // choice.host_layers
        room = max(0, (budget - without) // per_layer) if per_layer else choice.host_layers  # layer inputs it holds
        choice = dataclasses.replace(choice, host_layers=min(choice.host_layers, room))
        if not gpu_fits(choice):
            # Nor the GPU the rest: the backward makes some inputs again from the layer before's, the fewest that fit.
            for recomputed in range(1, lay.layers // 2 + 1):
                choice = dataclasses.replace(choice, host_layers=min(lay.layers - recomputed, room),
                                             recomputed_layers=recomputed)
                if gpu_fits(choice):
                    break
        reasons["offload_activations"] = (f"{layer_inputs_placed(lay.layers, choice)} (host memory: all need "
                                          f"{all_layers / GIB:.1f} GiB, {available})")
    chosen = MemoryChoice(choice, plan(choice), reasons, tokens=tokens)
    chosen.refused = gpu_available is not None and choice != wanted and chosen.plan["gpu"]["device"] > gpu_available
    return chosen


def layer_inputs_placed(layers: int, off: Offloading) -> str:
    """Where the layer inputs wait for the backward, in words: '27 of 32 layer inputs on the host, 1 recomputed in
    the backward from the layer before, the rest on the GPU'."""
    on_gpu = layers - off.host_layers - off.recomputed_layers
    return ", ".join([f"{off.host_layers} of {layers} layer inputs on the host"]
                     + ([f"{off.recomputed_layers} recomputed in the backward from the layer before"]
                        if off.recomputed_layers else [])
                     + (["the rest on the GPU"] if on_gpu else []))


def host_budget(host: HostMemory, processes: int) -> int:
    return int(HOST_HEADROOM * host.available / processes)


def memory_refusal(lay, row, trained, rank, dropout, tokens, speed, host, gpu_available, processes, liger_norms,
                   chosen: MemoryChoice) -> str:
    """The one paragraph of a refused run: both memories' numbers, the longest length that fits, what to change."""
    off, gpu, budget = chosen.offloading, chosen.plan["gpu"]["device"], host_budget(host, processes)
    fits = longest_fitting_tokens(lay, row, trained, rank, dropout, tokens, speed, host, gpu_available, processes,
                                  liger_norms)
    per_process = f" per process ({processes} on this machine)" if processes > 1 else ""
    on_gpu = lay.layers - off.host_layers - off.recomputed_layers
    recomputed = (f", {off.recomputed_layers} recomputed in the backward from the layer before (the most there can be)"
                  if off.recomputed_layers else "")
    split = (f"with the inputs of {off.host_layers} of {lay.layers} layers in host memory (what "
             f"{budget / GIB:.1f} GiB{per_process} of host memory holds: {HOST_HEADROOM:.0%} of {host.describe()})"
             f"{recomputed}" + (f" and the other {on_gpu} on the GPU" if on_gpu else ""))
    longest = (f"about {fits:,} tokens a step fit" if fits else "not even 1,024 tokens a step fit")
    return (f"{tokens:,} tokens a step need more memory than this machine has: {split}, and the step would need "
            f"about {gpu / GIB:.1f} GiB of GPU memory where {gpu_available / GIB:.1f} GiB are free; {longest}. "
            f"Lower training.max_length or training.per_device_train_batch_size, or free host memory (or set "
            f"{HOST_MEMORY_ENV} if the machine has more than it says); speed.offload_activations: false keeps every "
            "layer input on the GPU and pins no host memory for them.")


def longest_fitting_tokens(lay, row, trained, rank, dropout, tokens, speed, host, gpu_available, processes,
                           liger_norms) -> int:
    """The most tokens a step (a multiple of 1,024 below tokens) for which choose_offloading finds levers."""
    low, high = 0, tokens // 1024
    while low < high:
        middle = (low + high + 1) // 2
        if fit_offloading(lay, row, trained, rank, dropout, middle * 1024, speed, host, gpu_available, processes,
                          liger_norms).refused:
            high = middle - 1
        else:
            low = middle
    return low * 1024


def check_memory_before_loading(recipe) -> MemoryChoice | None:
    """The memory levers of a run on a GPU, chosen from the model's config before its weights load (LoraError when
    none fit); None where nothing is offloaded (no GPU, FSDP, checkpointing off or turned off by the plan)."""
    from lora_cli.models import has_accelerator, load_config, resolve_model_path

    training, speed = recipe.training, recipe.speed
    if (not has_accelerator() or recipe.distributed == "fsdp" or not speed.offload_activations
            or training.get("gradient_checkpointing") is False):
        return None
    config = load_config(resolve_model_path(recipe.model.name_or_path), recipe.model.trust_remote_code)
    lora = recipe.lora
    lay, trained = layout_and_trained(config, lora.target_modules)
    batch_size, seq_len = planned_step(recipe, training)
    trainable = lora.r * lay.layers * sum(m.in_features + m.out_features for m in trained)
    plan = plan_for_layout(lay, trainable, trained, lora.r, lora.dropout, lora.use_dora, seq_len, batch_size)
    device = PartialState().local_process_index
    free, _ = torch.cuda.mem_get_info(device)
    if "gradient_checkpointing" not in training and choose_checkpointing(plan, free, recipe.is_quantized):
        return None  # bf16 LoRA that fits without recomputation: nothing offloaded
    method = "qlora" if recipe.is_quantized else "lora"
    row = next(r for r in plan["rows"] if r["method"] == method and r["gradient_checkpointing"])
    liger = liger_available() and config.model_type in LIGER_MODEL_TYPES and training.get("use_liger_kernel", True)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return choose_offloading(lay, row, trained, lora.r, lora.dropout, seq_len * batch_size, speed, host_memory(),
                             free, processes, bool(liger))
