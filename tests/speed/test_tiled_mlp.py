"""The tiled MLP (lora_cli/speed/tiled_mlp.py) against the whole MLP: loss, gradients and the tiles' shapes."""

import pytest
import torch

from lora_cli.speed.checkpointing import offloaded_checkpointing
from lora_cli.speed.fused_mlp import fuse_gated_mlps
from lora_cli.speed.lora_linear import fuse_lora_layers
from lora_cli.speed.tiled_mlp import tile_mlps, untile_mlps
from lever_models import DEVICES, assert_same, enable_checkpointing, peft_model

TILE = 5  # tokens a tile: the 2 x 24 tokens of a batch make 10 tiles, the last one short


def batch_loss_and_grads(model, device, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.detach().float().clone() for name, p in model.named_parameters()
                         if p.requires_grad}


def tiled_and_reference(model, device, dropout, seed=1):
    """Loss and gradients of a reference, then tiled, from the same random state.

    Without dropout the reference is the whole MLP. With dropout, tiles draw their masks tile by tile, which are
    not the whole MLP's masks; the reference is then the same tiles run with autograd (every intermediate kept),
    whose gradients the tiled backward's rerun must give: it draws the masks the forward drew."""
    ids = torch.randint(10, 1000, (2, 24), device=device)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    runs = []
    for tiled in (False, True):
        if tiled:
            assert tile_mlps(model, TILE) == len(mlps)
        elif dropout:
            for mlp in mlps:
                mlp.whole_forward, mlp.forward = mlp.forward, tiles_with_autograd(mlp.forward)
        torch.manual_seed(seed)
        runs.append(batch_loss_and_grads(model, device, ids))
        if dropout and not tiled:
            for mlp in mlps:
                mlp.forward = mlp.whole_forward
    untile_mlps(model)
    return runs


def tiles_with_autograd(forward):
    def tiles(x):
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([forward(rows[start:start + TILE].unsqueeze(0)).squeeze(0)
                         for start in range(0, rows.shape[0], TILE)])
        return out.view(*x.shape[:-1], out.shape[-1])
    return tiles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("quantized,fused_mlp", [(False, True), (True, True), (False, False)],
                         ids=["lora-fused-mlp", "qlora-fused-mlp", "lora-peft-layers"])
def test_tiled_mlp_gives_the_whole_mlps_loss_and_gradients(tiny_llama, device, quantized, dropout, fused_mlp):
    """fp32: the loss and gradients of the untiled MLP (PEFT's layers, or the fused MLP), for LoRA and NF4 QLoRA;
    with dropout, those of the same tiles with autograd (the tiles' rerun draws the forward's masks)."""
    model = peft_model(tiny_llama, device, quantized, dropout=dropout)
    if fused_mlp:
        fuse_lora_layers(model)
        fuse_gated_mlps(model)
    reference, tiled = tiled_and_reference(model, device, dropout)
    assert_same(reference, tiled, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_tiled_mlp_under_offloaded_checkpointing(tiny_llama, device, dropout):
    """With lora train's checkpointing (lean rerun, the attention kept where it can be) and the fused MLP, tiles
    give the gradients of the untiled layers."""
    model = peft_model(tiny_llama, device, quantized=False, dropout=dropout)
    fuse_lora_layers(model)
    fuse_gated_mlps(model)
    enable_checkpointing(model)
    offloaded_checkpointing(model, lean_recompute=True, offload_attention=True)
    reference, tiled = tiled_and_reference(model, device, dropout)
    assert_same(reference, tiled, 1e-5)


def test_no_mlp_call_sees_more_than_a_tile(tiny_llama):
    """What bounds the memory: every call of the MLP's own forward (the fused MLP, which makes the intermediate-wide
    tensors) gets at most a tile of tokens, in the forward and in the backward, and every intermediate-wide tensor
    autograd saves is a tile's."""
    model = peft_model(tiny_llama, "cpu")
    fuse_lora_layers(model)
    fuse_gated_mlps(model)
    tile_mlps(model, TILE)
    width = model.config.intermediate_size
    token_counts, saved_rows = [], []
    for mlp in [layer.mlp for layer in model.get_base_model().model.layers]:
        inner = mlp.untiled_forward

        def counting(x, inner=inner):
            token_counts.append(x.numel() // x.shape[-1])
            return inner(x)
        mlp.untiled_forward = counting

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == width and not isinstance(tensor, torch.nn.Parameter):
            saved_rows.append(tensor.numel() // width)
        return tensor

    ids = torch.randint(10, 1000, (2, 24))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
        forward_calls, saved_in_forward = len(token_counts), list(saved_rows)
        loss.backward()
    layers, tiles = model.config.num_hidden_layers, -(-48 // TILE)
    assert forward_calls == layers * tiles and len(token_counts) == 2 * layers * tiles
    assert max(token_counts) == TILE and sum(token_counts) == 2 * layers * 48
    assert saved_in_forward == []  # the forward keeps no intermediate at all, only the MLP's input
    assert len(saved_rows) > 0 and max(saved_rows) <= TILE  # the backward's rerun keeps one tile's
