"""Tiled MLP: a decoder layer's MLP computed a tile of tokens at a time, forward and backward (`speed.tiled_mlp`).

Why: an MLP keeps intermediate-wide tensors for the whole sequence. For the Llama-3.1-8B shape (intermediate
14,336) at 524,288 tokens, the gate and up outputs and the gradient at their product are 14 GiB each, more than
everything else a layer's backward holds (memory.lora_train.mlp_intermediate_bytes). Computed in tiles of
TILED_MLP_TOKENS tokens, only one tile's intermediates exist at once (224 MiB each there), as in Arctic Long
Sequence Training's TiledMLP (arXiv 2506.13996) and Unsloth's tiled MLP.

How: `TiledMLP.forward` runs the module's own forward (the fused MLP of fused_mlp.py, Liger's or transformers') on
one tile at a time without autograd, writing each tile's output into the whole output, and saves only the input.
Its backward reruns each tile with autograd and backpropagates that tile's share of the output gradient at once:
the adapters' gradients accumulate as usual, the tile's input gradient goes into the whole one. The random state
of the forward's start is restored for the rerun, so LoRA dropout draws the same masks. The checkpointed forward
(checkpointing.py, without autograd) runs in tiles too. In a lean rerun (recomputation.py: nothing reads the
layer's output) the forward computes nothing, as down_proj's fused layer does there, and the backward's tiles rerun
lean too. So with checkpointing an MLP is computed twice a step, as without tiles.

On by default where it pays (speed/policy.py, from memory.lora_train.tiled_mlp_pays), off with
`speed.tiled_mlp: false`; tests/speed/test_tiled_mlp.py checks loss and gradients against the untiled MLP and the
tile shapes.
"""

import types

import torch

from lora_cli.speed.recomputation import Recomputation, output_is_read


def run_tiles(forward, x: torch.Tensor, tile: int) -> torch.Tensor:
    """forward over x's tokens a tile at a time, into one output (no autograd: the caller's grad mode)."""
    rows = x.reshape(-1, x.shape[-1])
    out = None
    for start in range(0, rows.shape[0], tile):
        part = forward(rows[start:start + tile].unsqueeze(0)).squeeze(0)
        if out is None:
            out = part.new_empty(rows.shape[0], part.shape[-1])
        out[start:start + part.shape[0]] = part
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledMLP(torch.autograd.Function):
    """The MLP's output, its intermediates computed a tile at a time, in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, forward, tile: int, output_read: bool, lean: bool, x):
        ctx.forward, ctx.tile, ctx.lean = forward, tile, lean
        kind = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if kind == "cuda" else None)
        ctx.save_for_backward(x)
        if not output_read:  # a lean rerun: nothing reads the output, and the backward computes the tiles itself
            return x.new_empty(x.shape)
        with torch.no_grad():
            return run_tiles(forward, x, tile)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        rows, grads = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[4] else None
        device = x.device
        cuda = device.type == "cuda"
        enabled, dtype = ctx.autocast
        active = Recomputation.active
        with torch.random.fork_rng(devices=[device] if cuda else []), torch.enable_grad(), \
                torch.autocast(device.type, dtype, enabled):
            torch.set_rng_state(ctx.rng[0])
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            try:
                for start in range(0, rows.shape[0], ctx.tile):
                    part = rows[start:start + ctx.tile].detach().requires_grad_(grad_x is not None)
                    Recomputation.active = ctx.lean  # a rerun for the backward: lean layers skip what none reads
                    out = ctx.forward(part.unsqueeze(0))
                    Recomputation.active = active
                    torch.autograd.backward(out, grads[start:start + part.shape[0]].unsqueeze(0))
                    if grad_x is not None:
                        grad_x[start:start + part.shape[0]] = part.grad
                    del out, part
            finally:
                Recomputation.active = active
        return None, None, None, None, None if grad_x is None else grad_x.view_as(x)


def tiled_mlp_forward(self, x):
    """Replaces an MLP's forward while training with tiles; short inputs and evaluation run it whole."""
    tile = self.mlp_tile_tokens
    if not self.training or x.numel() // x.shape[-1] <= tile:
        return self.untiled_forward(x)
    if not torch.is_grad_enabled():  # the checkpointed forward, or no training step at all
        return run_tiles(self.untiled_forward, x, tile)
    down = getattr(self, "down_proj", None)
    lean = getattr(down, "unread_in_recompute", False)
    return TiledMLP.apply(self.untiled_forward, tile, output_is_read(down), lean, x)


def tileable_mlps(model) -> list:
    """The decoder layers' dense MLPs (a module named mlp whose class ends in MLP): token by token, hidden to hidden."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and type(getattr(layer, "mlp", None)).__name__.endswith("MLP")]


def tile_mlps(model, tile_tokens: int) -> int:
    """Route the decoder layers' MLPs through TiledMLP while training, tile_tokens tokens a tile; returns how many.
    Call it after anything that replaces their forward (fused_mlp.fuse_gated_mlps): the tiles run that forward."""
    mlps = tileable_mlps(model)
    for mlp in mlps:
        if getattr(mlp.forward, "__func__", None) is not tiled_mlp_forward:
            mlp.untiled_forward = mlp.forward
            mlp.forward = types.MethodType(tiled_mlp_forward, mlp)
        mlp.mlp_tile_tokens = tile_tokens
    return len(mlps)


def untile_mlps(model) -> None:
    """The MLPs' forward as before tile_mlps."""
    for mlp in tileable_mlps(model):
        if getattr(mlp.forward, "__func__", None) is tiled_mlp_forward:
            mlp.forward = mlp.untiled_forward
            del mlp.untiled_forward
