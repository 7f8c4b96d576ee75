"""Fused LoRA linear layers (lora_cli/speed/lora_linear.py) against PEFT's: same loss, same gradients."""

import pytest
import torch

from lora_cli.speed.lora_linear import LoraLinear, fuse_lora_layers
from lever_models import DEVICES, assert_same, loss_and_grads, peft_model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_layers_match_peft(tiny_llama, device, quantized):
    model = peft_model(tiny_llama, device, quantized)
    reference = loss_and_grads(model, device)
    assert fuse_lora_layers(model) == 14  # 7 linear layers x 2 decoder layers
    assert_same(reference, loss_and_grads(model, device), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_layers_match_peft_under_bf16_autocast_and_checkpointing(tiny_llama, device):
    model = peft_model(tiny_llama, device)
    reference = loss_and_grads(model, device, torch.bfloat16, checkpointing=True)
    fuse_lora_layers(model)
    # Both compute in bf16; they differ in the order of roundings (PEFT rounds s * (x A^T) B^T before adding it).
    assert_same(reference, loss_and_grads(model, device, torch.bfloat16, checkpointing=True), 3e-2)


def test_dropout_mask_is_used_in_forward_and_backward():
    """With dropout the fused layer equals x W^T + s (drop(x) A^T) B^T through autograd, with the same mask."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    base = torch.nn.Linear(16, 12, bias=True).requires_grad_(False)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)
    torch.manual_seed(7)
    fused = LoraLinear.apply(x, base, base.bias, a, b, 0.5, 0.3)
    fused.square().sum().backward()
    fused_grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(7)
    dropped, _ = torch.native_dropout(x.reshape(-1, 16), 0.3, True)
    reference = base(x) + 0.5 * (dropped.view_as(x) @ a.t()) @ b.t()
    reference.square().sum().backward()
    assert torch.allclose(fused, reference, atol=1e-5)
    for got, want in zip(fused_grads, (x.grad, a.grad, b.grad)):
        assert torch.allclose(got, want, atol=1e-4)


def test_dora_layers_keep_peft_forward(tiny_llama):
    model = peft_model(tiny_llama, "cpu", use_dora=True)
    reference = loss_and_grads(model, "cpu")
    fuse_lora_layers(model)
    assert_same(reference, loss_and_grads(model, "cpu"), 1e-7)  # PEFT's own forward: exactly the same


def test_evaluation_keeps_peft_forward(tiny_llama):
    """Evaluation and generation keep PEFT's path (and bitsandbytes' inference kernels): identical logits."""
    model = peft_model(tiny_llama, "cpu").eval()
    ids = torch.randint(10, 1000, (1, 8))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        fuse_lora_layers(model)
        assert torch.equal(plain, model(input_ids=ids).logits)
