"""Speed and memory defaults on GPUs: the measured levers that pay, each with a recipe key to turn it off.

Measured on an H100 with benchmarks/speed.py (benchmarks/results/, the README's performance table).
- use_liger_kernel: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its fused linear cross-entropy out,
  fused_loss.py calls it) where Liger supports the architecture. Off: `training.use_liger_kernel: false`.
- gradient_checkpointing, from the memory plan of `lora inspect-params` and the GPU's memory: bf16 LoRA turns
  recomputation off when the step fits without it (it costs about a third of the step). QLoRA keeps it on
  (whoever quantizes has chosen memory over speed). The recipe decides instead with `training.gradient_checkpointing`.
- lora's own kernels (kernels.py): fused LoRA layers (`speed.fused_lora`), checkpointed layer inputs offloaded
  to host memory on a side stream (`speed.offload_activations`), and packed rows through varlen flash attention
  (`speed.varlen_attention`, with `training.packing`).
- fused gated MLPs (fused_mlp.py, `speed.fused_mlp`): gate and up projections, their adapters and SwiGLU (and
  down_proj, when its adapter has no dropout) in one function, the adapters' products added inside the SwiGLU kernel.
- lean recomputation (kernels.py, `speed.lean_recompute`): with offloaded checkpointing and fused layers, the rerun
  of a Llama-style layer skips its last projection, whose output no backward reads; the fused MLP's backward takes
  the rerun's dequantized 4-bit gate and up weights instead of dequantizing them again (fused_mlp.keeps_weights).
- offloaded attention (offloaded_attention.py, `speed.offload_attention`): with offloaded checkpointing and fused
  attention projections without dropout, what the attention's backward reads waits in host memory too, and the
  rerun skips the attention.
- CUDA graphs of the checkpointed layers (graphs.py, `speed.cuda_graphs`) on one GPU, when the memory plan leaves
  room for their memory pool; packed batches are padded to one shape for them (kernels.FixedShapePackedBatches).
- the fused loss (fused_loss.py, `speed.fused_loss`): on one GPU, the LM head and loss through Liger's cross-entropy
  kernel, chunked as its fused linear cross-entropy, instead of TRL's fused LM head (two matmuls instead of three,
  no sync a step).
- the input embedding in host memory (host_embedding.py, `speed.offload_embeddings`): for QLoRA with offloaded
  checkpointing and fused MLPs on one GPU, a frozen embedding not tied to the LM head; the memory it frees pays for
  the weights the fused MLP keeps.
- batches are copied to the GPU without a wait (`training.accelerator_config: {non_blocking: true}`, a library
  setting the recipe can override).
On any device, `trim_step_overhead` takes out Python the Trainer runs every step, and train.py's defaults drop the
per-step device syncs of the Trainer's NaN filter and of StopOnNonFiniteWeights.
"""

import importlib.util
import sys

from accelerate import PartialState
from transformers import TrainerCallback

# Architectures Liger patches in transformers (liger_kernel.transformers.monkey_patch).
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "granite", "olmo2", "glm4"}
MEMORY_HEADROOM = 0.85  # plan with at most this share of the GPU memory available to us


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
    from lora_cli.inspect import memory_plan

    # Batches are copied to the GPU without waiting for the copy: a waiting copy drains the GPU's queue every step,
    # which then idles while the host runs the step's first Python (transformers' mask, the rotary tables).
    defaults = {"accelerator_config": {"non_blocking": True}}
    if liger_available() and model.config.model_type in LIGER_MODEL_TYPES:
        defaults["use_liger_kernel"] = True
    if recipe.lora.target_modules is None or "gradient_checkpointing" in training:
        return defaults
    lora = recipe.lora
    seq_len, batch_size = training.get("max_length") or 1024, training.get("per_device_train_batch_size", 8)
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
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved()


def step_memory_plan(peft_model, recipe, args) -> dict:
    """lora inspect-params' memory plan for the step these training arguments set up, with the exact adapter size."""
    from lora_cli.inspect import memory_plan

    trainable, _ = peft_model.get_nb_trainable_parameters()
    lora = recipe.lora
    return memory_plan(peft_model.get_base_model().config, trainable, args.max_length or 1024,
                       args.per_device_train_batch_size, lora.target_modules, lora.r, lora.dropout, lora.use_dora)


def use_own_kernels(trainer, recipe) -> str:
    """Switch on kernels.py's levers the recipe allows and this run can use; returns what was done, for the log.

    Fused layers and offloading not under FSDP: it shards parameters between module calls, and both levers read
    weights and rerun layers outside the calls its hooks wrap. Varlen attention holds no weights.
    """
    import torch

    from lora_cli.fused_loss import fused_loss_supported, use_fused_loss
    from lora_cli.fused_mlp import gated_mlps
    from lora_cli.host_embedding import offloadable_embedding
    from lora_cli.kernels import (FixedShapePackedBatches, fuse_lora_layers, lean_recompute_supported,
                                  use_varlen_attention, varlen_available)
    from lora_cli.offloaded_attention import offloadable_attentions

    args = trainer.args
    packed = getattr(trainer, "padding_free", args.padding_free)  # TRL's bfd packing is padding-free
    varlen = recipe.speed.varlen_attention and packed and varlen_available() and use_varlen_attention(trainer.model)
    if trainer.is_fsdp_enabled:
        return f"fused_lora=off offload_activations=off (FSDP) varlen_attention={'on' if varlen else 'off'}"
    fused = fuse_lora_layers(trainer.model) if recipe.speed.fused_lora else 0
    mlps = len(gated_mlps(trainer.model)) if fused and recipe.speed.fused_mlp else 0
    if mlps:
        trainer.add_callback(FuseGatedMLPs())
    offload = (recipe.speed.offload_activations and args.gradient_checkpointing and torch.cuda.is_available()
               and "offload" not in (args.gradient_checkpointing_kwargs or {}))
    # Graphs replay fixed shapes in one process: packed rows only where FixedShapePackedBatches can bound them (TRL's
    # packing keeps sequences within max_length), not DDP or DeepSpeed (their gradient hooks run inside the backward).
    graphs = (offload and recipe.speed.cuda_graphs and (not packed or (args.packing and args.max_length))
              and args.world_size == 1 and graphs_fit(trainer.model, recipe, args))
    if graphs and packed:
        trainer.data_collator = FixedShapePackedBatches(
            trainer.data_collator, args.per_device_train_batch_size * args.max_length, args.max_length)
    lean = offload and fused and recipe.speed.lean_recompute and lean_recompute_supported(trainer.model)
    attention = offloadable_attentions(trainer.model) if offload and recipe.speed.offload_attention else 0
    if offload:
        trainer.add_callback(OffloadActivations(graphs, lean, attention > 0))
    fused_loss = recipe.speed.fused_loss and fused_loss_supported(trainer)
    if fused_loss:
        use_fused_loss(trainer)
    # The memory is what the fused MLP keeps from a rerun of a 4-bit layer (host_embedding.py says why).
    embedding = (offloadable_embedding(trainer.model) if recipe.speed.offload_embeddings and offload and mlps
                 and recipe.is_quantized and args.world_size == 1 and not trainer.is_deepspeed_enabled else None)
    if embedding is not None:
        trainer.add_callback(OffloadEmbedding(embedding))
    return (f"fused_lora={'on' if fused else 'off'} ({fused} layers) fused_mlp={'on' if mlps else 'off'} ({mlps})"
            f" offload_activations={'on' if offload else 'off'} lean_recompute={'on' if lean else 'off'}"
            f" offload_attention={'on' if attention else 'off'} ({attention})"
            f" cuda_graphs={'on' if graphs else 'off'} varlen_attention={'on' if varlen else 'off'}"
            f" fused_loss={'on' if fused_loss else 'off'}"
            f" offload_embeddings={'on' if embedding is not None else 'off'}")


def graphs_fit(peft_model, recipe, args) -> bool:
    """Whether the step, checkpointed and offloaded, still fits with the CUDA graphs' memory pool beside it.

    The pool keeps the memory of one layer's recomputation and backward for the graphs alone (1.01 GiB for the
    Llama-3.1-8B QLoRA step, benchmarks/results/2026-11-23-h100-llama-3.1-8b-qlora-graphs.json: about twice the
    plan's activations per layer), memory the rest of the step cannot reuse."""
    plan = step_memory_plan(peft_model, recipe, args)
    rows = device_bytes(plan, recipe.is_quantized)
    pool = 2 * (rows[False] - rows[True]) / peft_model.get_base_model().config.get_text_config().num_hidden_layers
    return rows[True] - plan["offloaded"] + pool < MEMORY_HEADROOM * available_gpu_bytes()


class FuseGatedMLPs(TrainerCallback):
    """Installs fused_mlp's MLPs when training begins: the Trainer has just set Liger's SwiGLU MLP forward then."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from lora_cli.fused_mlp import fuse_gated_mlps

        fuse_gated_mlps(model)


class OffloadEmbedding(TrainerCallback):
    """Keeps the input embedding in host memory from when training begins to when it ends (host_embedding.py)."""

    def __init__(self, embedding):
        self.embedding = embedding

    def on_train_begin(self, args, state, control, **kwargs):
        from lora_cli.host_embedding import offload_embedding

        offload_embedding(self.embedding)

    def on_train_end(self, args, state, control, **kwargs):
        from lora_cli.host_embedding import restore_embedding

        restore_embedding(self.embedding)


class OffloadActivations(TrainerCallback):
    """Installs kernels.offloaded_checkpointing once the Trainer has turned checkpointing on (before step one), and
    drops its CUDA graphs when training ends (their memory pool holds a layer's activations)."""

    def __init__(self, cuda_graphs: bool, lean_recompute: bool, offload_attention: bool):
        self.cuda_graphs, self.lean_recompute, self.offload_attention = cuda_graphs, lean_recompute, offload_attention
        self.pool = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from lora_cli.kernels import offloaded_checkpointing

        _, self.pool = offloaded_checkpointing(model, self.cuda_graphs, self.lean_recompute, self.offload_attention)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from lora_cli.kernels import offloaded_checkpointing

        if self.pool is not None:
            layers = self.pool.layers
            if PartialState().is_main_process and self.pool.broken is None:
                print(f"CUDA graphs: {sum(layer.replaying for layer in layers)} of {len(layers)} decoder layers "
                      "replayed", flush=True)
            offloaded_checkpointing(model, lean_recompute=self.lean_recompute,  # no graphs, should it train again
                                    offload_attention=self.offload_attention)
            self.pool = None


def trim_step_overhead(trainer) -> None:
    """Take out the Python the Trainer runs every step walking all of the model's modules and parameters.

    For the Llama-3.1-8B shape with LoRA on all linear layers (2,665 modules, 739 parameters), Trainer's per-step
    `floating_point_ops` (a parameter count, for the `total_flos` it logs), `model.train()` and `model.zero_grad()`
    took 13, 16 and 8 ms of Python a step on this project's CI machine, and on a GPU the device idles while the next
    step waits for them. The parameter count is taken once; the others run through the callback below. Not under
    FSDP or DeepSpeed, which replace the parameters when they wrap the model.
    """
    flops_per_token = 6 * trainer.model.num_parameters(exclude_embeddings=True)  # Trainer's formula, counted once
    main_input = getattr(trainer.model, "main_input_name", "input_ids")
    trainer.floating_point_ops = lambda inputs: flops_per_token * inputs[main_input].numel() if main_input in inputs else 0
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        trainer.add_callback(SkipModelWalks())


class SkipModelWalks(TrainerCallback):
    """Once the optimizer exists: `model.train(mode)` walks the modules only when the mode changes (evaluation and
    the Trainer go through this call; nothing in a run sets a submodule's mode on its own), and `model.zero_grad()`
    clears the gradients of the optimizer's parameters, the only ones that get any."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        walk, mode_set = model.train, None

        def train(mode: bool = True):
            nonlocal mode_set
            if mode != mode_set:
                walk(mode)
                mode_set = mode
            return model

        def zero_grad(set_to_none: bool = True):
            for param in params:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

        model.train, model.zero_grad = train, zero_grad
