"""What the lever tests share: tiny PEFT models set up as lora train sets them up, and their loss and gradients.

Every lever test runs on the CPU and, where there is one, on a GPU (`python -m pytest tests/speed` there): only the
GPU moves checkpointed inputs to the host on a side stream; on the CPU the same recomputation runs with the inputs
left in place. The Triton kernels run on the GPU, or on a machine without one through Triton's interpreter
(tests/conftest.py turns it on), where triton is installed.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lora_cli.experts import expert_parameters
from lora_cli.speed.fused_mlp import fuse_gated_mlps
from lora_cli.speed.grouped_experts import group_expert_adapters
from lora_cli.speed.kernels import triton_available
from lora_cli.speed.lora_linear import fuse_lora_layers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through Triton's interpreter
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def peft_model(base_dir, device, quantized=False, dropout=0.0, use_dora=False, seed=0, untied=False, experts=False):
    """experts: the routed experts' weights too (lora.target_experts)."""
    kwargs = {"dtype": torch.float32, "device_map": {"": device}}
    if untied:  # an LM head of its own (random), apart from the input embedding
        kwargs["tie_word_embeddings"] = False
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                            use_dora=use_dora,
                                            target_parameters=expert_parameters(base) if experts else None))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter has B = 0, which would hide errors in A's gradient
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def routed_model(base_dir, device, experts=False):
    """An MoE model with PEFT's all-linear: the attention projections (and on Qwen3-MoE and Mixtral the router and
    experts), so the load-balancing loss reaches adapters through the hidden states, which the checkpoint's rerun
    recomputes; with experts, the routed experts' weights through their grouped LoRA, as lora train runs them."""
    model = peft_model(base_dir, device, experts=experts)
    fuse_lora_layers(model)
    if experts:
        group_expert_adapters(model)
    return model


def enable_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def checkpointed_fused_model(base_dir, device, quantized=False, dropout=0.0, fused_mlp=True):
    """A PEFT model with fused LoRA layers (and MLPs) and checkpointing on, as lora train sets it up on a GPU."""
    model = peft_model(base_dir, device, quantized, dropout=dropout)
    fuse_lora_layers(model)
    if fused_mlp:
        fuse_gated_mlps(model)
    enable_checkpointing(model)
    return model


def loss_and_grads(model, device, autocast_dtype=None, checkpointing=False, length=24, **model_kwargs):
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (2, length), device=device)
    if checkpointing:
        enable_checkpointing(model)
    model.zero_grad()
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids, **model_kwargs).loss
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def assert_same(reference, fused, tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = reference, fused
    assert loss_b == pytest.approx(loss_a, rel=tolerance, abs=tolerance)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], tolerance, name)


def assert_close(actual, expected, tolerance, name=""):
    """Within tolerance of expected's largest magnitude, everywhere (a NaN fails)."""
    scale = expected.abs().max().item() + 1e-8
    assert (actual.cpu() - expected.cpu()).abs().max().item() <= tolerance * scale, name
