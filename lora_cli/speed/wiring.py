"""The one place GPU levers are installed into a Trainer: each lever the recipe allows and this run can use, at the
moment the Trainer's own set-up leaves for it (callbacks), and the line the run prints about them.
"""

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from lora_cli.memory.lora_train import TILED_MLP_TOKENS
from lora_cli.speed.attention_kernels import use_attention_kernel
from lora_cli.speed.checkpointing import offloaded_checkpointing
from lora_cli.speed.coverage import off_reasons
from lora_cli.speed.fused_loss import fused_loss_unsupported, use_fused_loss
from lora_cli.speed.fused_mlp import fuse_gated_mlps, gated_mlps
from lora_cli.speed.grouped_experts import group_expert_adapters, grouped_linear_available
from lora_cli.speed.host_embedding import offload_embedding, offloadable_embedding, restore_embedding
from lora_cli.speed.lora_linear import fuse_lora_layers
from lora_cli.speed.offloaded_attention import offloadable_attentions
from lora_cli.speed.policy import graphs_fit
from lora_cli.speed.recomputation import lean_recompute_supported
from lora_cli.speed.tiled_mlp import tile_mlps, tileable_mlps
from lora_cli.speed.varlen import FixedShapePackedBatches, use_varlen_attention, varlen_available


def use_own_kernels(trainer, recipe, memory=None) -> str:
    """Switch on the levers the recipe allows and this run can use; returns what was done, for the log.

    memory: policy.check_memory_before_loading's choice of the memory levers (host memory), None for all the
    recipe allows. Fused layers and offloading not under FSDP: it shards parameters between module calls, and both
    levers read weights and rerun layers outside the calls its hooks wrap. Varlen attention holds no weights. For the
    methods beyond SFT, off_for_method says which levers do not apply and why; the line says so.
    """
    args = trainer.args
    method = recipe.method
    # TRL's bfd packing is padding-free; the preference and RL trainers pack nothing.
    packed = method == "sft" and getattr(trainer, "padding_free", args.padding_free)
    varlen = recipe.speed.varlen_attention and packed and varlen_available() and use_varlen_attention(trainer.model)
    kernel = use_attention_kernel(trainer.model, recipe.speed.attention_kernel) and recipe.speed.attention_kernel
    attention_line = f" attention_kernel={kernel}" if kernel else ""
    if trainer.is_fsdp_enabled:
        return f"fused_lora=off offload_activations=off (FSDP) varlen_attention={'on' if varlen else 'off'}{attention_line}"
    architecture = off_reasons(trainer.model)
    off = off_for_method(method)
    fused = fuse_lora_layers(trainer.model) if recipe.speed.fused_lora and "fused_lora" not in architecture else 0
    mlps = len(gated_mlps(trainer.model)) if fused and recipe.speed.fused_mlp else 0
    grouped = (group_expert_adapters(trainer.model)
               if recipe.speed.grouped_experts and recipe.lora.target_experts and grouped_linear_available() else 0)
    if mlps:
        trainer.add_callback(FuseGatedMLPs())
    offload = (recipe.speed.offload_activations and args.gradient_checkpointing and torch.cuda.is_available()
               and "offload" not in (args.gradient_checkpointing_kwargs or {}))
    chosen = memory.offloading if memory is not None else None
    reasons = memory.reasons if memory is not None else {}
    tiles = len(tileable_mlps(trainer.model)) if chosen is not None and chosen.tiled_mlp else 0
    if tiles:
        trainer.add_callback(TileMLPs())  # after FuseGatedMLPs: the tiles run the fused MLP
    host_layers = chosen.host_layers if offload and chosen is not None else None
    recomputed = chosen.recomputed_layers if offload and chosen is not None else 0
    # Graphs replay fixed shapes in one process: packed rows only where FixedShapePackedBatches can bound them (TRL's
    # packing keeps sequences within max_length), not DDP or DeepSpeed (their gradient hooks run inside the backward).
    # Not with tiles, whose backward runs a backward of its own, nor with recomputed layer inputs (a layer replaying
    # a graph keeps its input: checkpointing.HostOffloader).
    graphs = (offload and recipe.speed.cuda_graphs and not tiles and not recomputed
              and "cuda_graphs" not in architecture and "cuda_graphs" not in off
              and (not packed or (args.packing and args.max_length)) and args.world_size == 1 and graphs_fit(trainer.model, recipe, args))
    if graphs and packed:
        trainer.data_collator = FixedShapePackedBatches(
            trainer.data_collator, args.per_device_train_batch_size * args.max_length, args.max_length)
    lean = offload and fused and recipe.speed.lean_recompute and lean_recompute_supported(trainer.model)
    attention = (offloadable_attentions(trainer.model)
                 if offload and recipe.speed.offload_attention and (chosen is None or chosen.attention) else 0)
    if offload:
        trainer.add_callback(OffloadActivations(graphs, lean, attention > 0, host_layers, recomputed,
                                                memory.tokens if memory is not None else None))
    unsupported = fused_loss_unsupported(trainer) if recipe.speed.fused_loss and "fused_loss" not in off else ""
    fused_loss = unsupported is None
    if fused_loss:
        use_fused_loss(trainer)
    # The memory is what the fused MLP keeps from a rerun of a 4-bit layer (host_embedding.py says why).
    embedding = (offloadable_embedding(trainer.model) if recipe.speed.offload_embeddings and offload and mlps
                 and "offload_embeddings" not in off and recipe.is_quantized and args.world_size == 1
                 and not trainer.is_deepspeed_enabled else None)
    if embedding is not None:
        trainer.add_callback(OffloadEmbedding(embedding))
    experts_line = f" grouped_experts={'on' if grouped else 'off'} ({grouped})" if recipe.lora.target_experts else ""
    return (f"fused_lora={'on' if fused else 'off'} ({fused} layers) fused_mlp={'on' if mlps else 'off'} ({mlps})"
            f"{experts_line}"
            f" offload_activations={'on' if offload else 'off'}{why(reasons, 'offload_activations', offload)}"
            f" lean_recompute={'on' if lean else 'off'}"
            f" offload_attention={'on' if attention else 'off'} ({attention}){why(reasons, 'offload_attention')}"
            f" tiled_mlp={'on' if tiles else 'off'}{why(reasons, 'tiled_mlp', tiles)}"
            f" cuda_graphs={'on' if graphs else 'off'}{for_method(off, method, 'cuda_graphs', recipe.speed)}"
            f" varlen_attention={'on' if varlen else 'off'}{for_method(off, method, 'varlen_attention', recipe.speed)}"
            f" fused_loss={'on' if fused_loss else 'off'}{for_method(off, method, 'fused_loss', recipe.speed)}"
            f"{f' ({unsupported})' if unsupported else ''}"
            f" offload_embeddings={'on' if embedding is not None else 'off'}"
            f"{for_method(off, method, 'offload_embeddings', recipe.speed)}{attention_line}"
            + because(architecture, recipe.speed))


def why(reasons: dict, lever: str, on=True) -> str:
    """The policy's reason for a lever's state, where it gave one and the lever is in that state."""
    return f" ({reasons[lever]})" if lever in reasons and on else ""


def for_method(off: dict[str, str], method: str, lever: str, speed) -> str:
    """Why a lever the recipe allows is off for this training method, where it is."""
    return f" ({method}: {off[lever]})" if lever in off and getattr(speed, lever) else ""


def off_for_method(method: str) -> dict[str, str]:
    """The levers that do not apply to a method's trainer, with the reason the lever line gives."""
    if method == "sft":
        return {}
    off = {"varlen_attention": "its trainer does not pack rows",
           "fused_loss": "its loss is not SFT's token cross-entropy; TRL's chunked log-prob head scores the completions "
                         "without materialising the logits"}
    if method == "grpo":
        off["cuda_graphs"] = "completions of a new length every step would capture a graph per shape"
        off["offload_embeddings"] = "generation reads the embedding at every token"
    return off


def because(reasons: dict[str, str], speed) -> str:
    """'; off for this architecture: lever (why), ...' for the levers the recipe allows and the architecture has not."""
    named = [f"{lever} ({why})" for lever, why in reasons.items() if getattr(speed, lever)]
    return f"; off for this architecture: {', '.join(named)}" if named else ""


class FuseGatedMLPs(TrainerCallback):
    """Installs fused_mlp's MLPs when training begins: the Trainer has just set Liger's SwiGLU MLP forward then."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        fuse_gated_mlps(model)


class TileMLPs(TrainerCallback):
    """Installs tiled_mlp's tiles when training begins, after FuseGatedMLPs: each tile runs the MLP's forward then."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tile_mlps(model, TILED_MLP_TOKENS)


class OffloadEmbedding(TrainerCallback):
    """Keeps the input embedding in host memory from when training begins to when it ends (host_embedding.py)."""

    def __init__(self, embedding):
        self.embedding = embedding

    def on_train_begin(self, args, state, control, **kwargs):
        offload_embedding(self.embedding)

    def on_train_end(self, args, state, control, **kwargs):
        restore_embedding(self.embedding)


class OffloadActivations(TrainerCallback):
    """Installs checkpointing.offloaded_checkpointing once the Trainer has turned checkpointing on (before step one), and
    drops its CUDA graphs when training ends (their memory pool holds a layer's activations)."""

    def __init__(self, cuda_graphs: bool, lean_recompute: bool, offload_attention: bool, host_layers: int | None,
                 recomputed_layers: int, max_tokens: int | None):
        self.cuda_graphs, self.lean_recompute, self.offload_attention = cuda_graphs, lean_recompute, offload_attention
        self.host_layers, self.recomputed_layers, self.max_tokens = host_layers, recomputed_layers, max_tokens
        self.pool = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _, self.pool = offloaded_checkpointing(model, self.cuda_graphs, self.lean_recompute, self.offload_attention,
                                               self.host_layers, self.recomputed_layers, self.max_tokens)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.pool is not None:
            layers = self.pool.layers
            if PartialState().is_main_process and self.pool.broken is None:
                print(f"CUDA graphs: {sum(layer.replaying for layer in layers)} of {len(layers)} decoder layers "
                      "replayed", flush=True)
            offloaded_checkpointing(model, lean_recompute=self.lean_recompute,  # no graphs, should it train again
                                    offload_attention=self.offload_attention, host_layers=self.host_layers,
                                    recomputed_layers=self.recomputed_layers, max_tokens=self.max_tokens)
            self.pool = None
