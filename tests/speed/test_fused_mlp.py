"""The fused gated MLP (lora_cli/speed/fused_mlp.py) against the fused layers, and its Triton kernels
(lora_cli/speed/kernels/gated.py) against its torch arithmetic."""

import pytest
import torch

from lora_cli.speed.fused_mlp import fuse_gated_mlps
from lora_cli.speed.lora_linear import fuse_lora_layers
from lever_models import (DEVICES, KERNEL_DEVICE, assert_close, assert_same, loss_and_grads, needs_triton,
                          peft_model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_fused_mlp_matches_fused_layers(tiny_llama, device, quantized, dropout):
    """Gate, up, their adapters and SwiGLU in one function (the Triton kernel on a GPU): the loss and gradients of
    the separate fused layers, in float32; the same dropout masks."""
    model = peft_model(tiny_llama, device, quantized, dropout=dropout)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device)
    assert fuse_gated_mlps(model) == 2
    assert_same(reference, loss_and_grads(model, device), 1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_fused_mlp_keeps_no_swiglu_output_without_down_dropout(tiny_llama, dropout):
    """Without dropout on down_proj's adapter, the whole MLP is one function that saves no SwiGLU output (its
    backward rebuilds it); with dropout, down_proj stays a fused layer, which saves it."""
    model = peft_model(tiny_llama, "cpu", dropout=dropout)
    fuse_lora_layers(model)
    fuse_gated_mlps(model)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    out = mlp(x)
    full_width = [t for t in out.grad_fn.saved_tensors
                  if t.is_floating_point() and t.shape == (10, model.config.intermediate_size)]
    if dropout == 0:
        assert type(out.grad_fn).__name__ == "LoraSwiGLUMLPBackward"
        assert len(full_width) == 2  # gate's and up's outputs, no h
    else:
        assert type(out.grad_fn).__name__ == "LoraLinearBackward"
        assert len(full_width) == 1  # down_proj's input, h


@pytest.mark.parametrize("device", DEVICES)
def test_fused_mlp_under_bf16_autocast(tiny_llama, device):
    """In bf16 the fused MLP rounds once where the separate layers round each term: close, not equal."""
    model = peft_model(tiny_llama, device, True)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device, torch.bfloat16, checkpointing=True)
    fuse_gated_mlps(model)
    assert_same(reference, loss_and_grads(model, device, torch.bfloat16, checkpointing=True), 3e-2)


@needs_triton
@pytest.mark.parametrize("down", [False, True], ids=["gated", "with-down"])
def test_swiglu_kernels_compute_the_torch_arithmetic(down):
    """fused_mlp's Triton kernels against its torch arithmetic (what a CPU runs) in float32, on a shape that fills no
    tile and a rank below tl.dot's 16: SwiGLU of both pre-activations with their adapters' products; the gradients at
    both, written over the projections; with down_proj's adapter (LoraSwiGLUMLP), its term added to the gradient and h
    rebuilt over it."""
    from lora_cli.speed.fused_mlp import BACKWARD_TILE, FORWARD_TILE, _kernels, gated, gated_backward, launch_gated_kernel

    torch.manual_seed(0)
    rows, cols, rank, scales = 70, 200, 8, (0.5, 2.0)
    gate_out, up_out, grad = torch.randn(rows, cols), torch.randn(rows, cols), torch.randn(rows, cols)
    p_gate, b_gate, p_up, b_up = torch.randn(rows, rank), torch.randn(cols, rank), torch.randn(rows, rank), \
        torch.randn(cols, rank)
    down_term = (torch.randn(rows, rank), torch.randn(rank, cols), 0.25) if down else None
    adapters = [t.to(KERNEL_DEVICE) for t in (p_gate, b_gate, p_up, b_up)]

    def on_device(term):
        return None if term is None else (term[0].to(KERNEL_DEVICE), term[1].to(KERNEL_DEVICE), term[2])

    hidden = torch.full((rows, cols), float("nan"), device=KERNEL_DEVICE)  # every value must be written
    launch_gated_kernel(_kernels()[0], FORWARD_TILE, gate_out.to(KERNEL_DEVICE), up_out.to(KERNEL_DEVICE), *adapters,
                        scales, hidden)
    assert hidden.device.type == KERNEL_DEVICE
    assert_close(hidden, gated(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales), 1e-5)

    expected = gated_backward(grad.clone(), gate_out.clone(), up_out.clone(), p_gate, b_gate, p_up, b_up, scales,
                              down=down_term)
    written = [t.clone().to(KERNEL_DEVICE) for t in (gate_out, up_out, grad)]
    launch_gated_kernel(_kernels()[1], BACKWARD_TILE, written[0], written[1], *adapters, scales, written[2],
                        on_device(down_term))
    for kernel_out, expected_out in zip(written, expected):
        assert_close(kernel_out, expected_out, 1e-5)
    if not down:
        assert torch.equal(written[2].cpu(), grad)  # without down_proj inside, the gradient at h is only read
