"""grouped_experts.py: the experts' LoRA as grouped low-rank products gives PEFT's outputs and gradients, on the MoE
families whose experts differ in layout (Qwen3-MoE: gate and up concatenated, (experts, out, in); gpt-oss: gate and
up interleaved, transposed, with biases; DeepSeek-V3: shared experts beside the routed ones)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lora_cli.experts import expert_parameters
from lora_cli.speed.grouped_experts import group_expert_adapters, grouped_linear_available
from tests.speed.lever_models import DEVICES
from tests.tiny_models import FAMILY

pytestmark = pytest.mark.skipif(not grouped_linear_available(), reason="transformers has no grouped experts forward")
VOCAB = 96


def tiny_moe(name: str, device: str, rank: int = 8):
    family = FAMILY[name]
    config = AutoConfig.for_model(family.model_type, **family.config, vocab_size=VOCAB, pad_token_id=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"],
                                            target_parameters=expert_parameters(base)))
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:  # a fresh adapter has B = 0, which would hide errors in A's gradient
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_grouped_experts_match_peft(name, device):
    model = tiny_moe(name, device)
    ids = torch.randint(1, VOCAB, (2, 24), device=device)
    expected_loss, expected = loss_and_grads(model, ids)
    assert group_expert_adapters(model) == model.config.num_hidden_layers - getattr(
        model.config, "first_k_dense_replace", 0)
    loss, grads = loss_and_grads(model, ids)
    assert set(grads) == set(expected) and any("experts.lora_A" in n for n in grads)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for param_name, grad in grads.items():
        torch.testing.assert_close(grad, expected[param_name], rtol=1e-4, atol=1e-6, msg=param_name)


def test_peft_forward_runs_where_the_adapter_is_off():
    """With the adapter disabled (a DPO reference, --compare-base) the experts compute the base model, as PEFT does."""
    model = tiny_moe("qwen3_moe", "cpu")
    ids = torch.randint(1, VOCAB, (1, 16))
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    group_expert_adapters(model)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base_logits)
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)


def test_ranks_off_the_16_byte_grid_keep_peft_forward():
    model = tiny_moe("qwen3_moe", "cpu", rank=4)
    assert group_expert_adapters(model) == 0


def test_the_saved_adapter_is_the_same_with_the_lever(tmp_path):
    """Only forward changes: the adapter's state dict (what lora train saves) holds the same tensors."""
    from peft import get_peft_model_state_dict

    model = tiny_moe("qwen3_moe", "cpu")
    before = get_peft_model_state_dict(model)
    group_expert_adapters(model)
    after = get_peft_model_state_dict(model)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waiting for the GPU is a GPU matter")
def test_the_grouped_forward_never_waits_for_the_gpu():
    """bincount read the largest expert id back to the host in every call of an MoE layer's experts (forward and
    rerun)."""
    from lora_cli.speed.grouped_experts import wrapped_experts

    model = tiny_moe("qwen3_moe", "cuda").to(torch.bfloat16)  # as lora train runs it on a GPU
    group_expert_adapters(model)
    experts = wrapped_experts(model)[0]
    tokens, top_k = 24, model.config.num_experts_per_tok
    hidden = torch.randn(tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    top_k_index = torch.randint(0, model.config.num_experts, (tokens, top_k), device="cuda")
    top_k_weights = torch.rand(tokens, top_k, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts(hidden, top_k_index, top_k_weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
