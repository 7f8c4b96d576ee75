"""Offloaded checkpointing and lean recomputation (lora_cli/speed/checkpointing.py, recomputation.py) against
transformers' checkpointing: same loss, same gradients."""

import pytest
import torch

from lora_cli.speed.checkpointing import offloaded_checkpointing
from lora_cli.speed.lora_linear import fuse_lora_layers
from lever_models import DEVICES, assert_same, checkpointed_fused_model, loss_and_grads, peft_model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_offloaded_checkpointing_matches_checkpointing(tiny_llama, device, quantized):
    """On a GPU the layer inputs go to the host and back on a side stream; on the CPU they stay (same recompute)."""
    model = peft_model(tiny_llama, device, quantized)
    fuse_lora_layers(model)
    autocast = torch.bfloat16 if device == "cuda" else None
    reference = loss_and_grads(model, device, autocast, checkpointing=True)
    assert offloaded_checkpointing(model) == (2, None)
    assert_same(reference, loss_and_grads(model, device, autocast), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("host_layers", [0, 1, 2])
def test_layer_inputs_partly_kept_on_the_gpu(tiny_llama, device, host_layers):
    """With host memory for only the first host_layers layers' inputs (speed/policy.py), the rest stay where they
    are: the same loss and gradients, two steps running (the host buffers are reused)."""
    model = peft_model(tiny_llama, device, True)
    fuse_lora_layers(model)
    autocast = torch.bfloat16 if device == "cuda" else None
    reference = loss_and_grads(model, device, autocast, checkpointing=True)
    offloaded_checkpointing(model, host_layers=host_layers)
    for _ in range(2):
        assert_same(reference, loss_and_grads(model, device, autocast), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_checkpointing_replays_dropout(tiny_llama, device):
    """The recomputation draws the same dropout masks as the forward (RNG state restored)."""
    model = peft_model(tiny_llama, device, dropout=0.3)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model)
    assert_same(reference, loss_and_grads(model, device), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("fused_mlp", [False, True], ids=["layers", "fused-mlp"])
def test_lean_recompute_skips_down_proj_with_the_same_gradients(tiny_llama, device, quantized, dropout, fused_mlp,
                                                                monkeypatch):
    """The rerun without down_proj's matmul gives the same loss and gradients, the whole step does exactly one
    down_proj forward matmul and weight dequantization fewer per layer (counted by torch's FLOP counter, matrix
    products only: with down_proj inside the fused MLP the lean rerun also skips SwiGLU, whose rank-r adapter
    products run as addmm on a CPU, and at lora_linear.base_weight), with the fused MLP too (whose backward takes the
    rerun's 4-bit gate and up weights as dequantized)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_cli.speed import fused_mlp as fused_mlp_module
    from lora_cli.speed import lora_linear

    model = checkpointed_fused_model(tiny_llama, device, quantized, dropout, fused_mlp)
    weights_made = []
    real_base_weight = lora_linear.base_weight
    for module in (lora_linear, fused_mlp_module):
        monkeypatch.setattr(module, "base_weight", lambda layer, dtype: weights_made.append(layer) or
                            real_base_weight(layer, dtype))
    runs = {}
    for lean in (False, True):
        offloaded_checkpointing(model, lean_recompute=lean)
        weights_made.clear()
        with FlopCounterMode(display=False) as counter:
            runs[lean] = loss_and_grads(model, device)
        runs[lean] += (counter.get_flop_counts()["Global"][torch.ops.aten.mm], len(weights_made))
    (*full, full_flops, full_weights), (*lean, lean_flops, lean_weights) = runs[False], runs[True]
    assert_same(full, lean, 0.0)
    config = model.config
    tokens = 2 * 24  # loss_and_grads' batch
    down_proj = 2 * tokens * config.intermediate_size * config.hidden_size
    assert full_flops - lean_flops == config.num_hidden_layers * down_proj
    # forward, rerun, backward; the fused MLP's backward reuses the rerun's dequantized gate and up weights
    kept = 2 if quantized and fused_mlp else 0
    assert full_weights == (3 * 7 - kept) * config.num_hidden_layers
    assert full_weights - lean_weights == config.num_hidden_layers


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_checkpointing_survives_trls_reference_passes(tiny_llama, device):
    """TRL's DPO, KTO and GRPO trainers turn checkpointing off and on around every reference or generation pass
    (trl.models.utils.disable_gradient_checkpointing); the offloaded functions must still be the layers' afterwards,
    and the step after it must still match transformers' checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    from trl.models.utils import disable_gradient_checkpointing

    model = peft_model(tiny_llama, device)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    installed = [layer._gradient_checkpointing_func for layer in layers]
    with torch.no_grad(), disable_gradient_checkpointing(model, {"use_reentrant": False}):
        assert not any(layer.gradient_checkpointing for layer in layers)
    assert [layer._gradient_checkpointing_func for layer in layers] == installed
    assert_same(reference, loss_and_grads(model, device), 1e-5)
