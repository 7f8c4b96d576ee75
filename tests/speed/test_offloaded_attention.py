"""The attention kept in host memory (lora_cli/speed/offloaded_attention.py) against its recomputation."""

import pytest
import torch

from lora_cli.speed.checkpointing import offloaded_checkpointing
from lever_models import DEVICES, assert_same, checkpointed_fused_model, loss_and_grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("fused_mlp", [False, True], ids=["layers", "fused-mlp"])
def test_offloaded_attention_gives_the_recomputed_gradients(tiny_llama, device, quantized, fused_mlp, monkeypatch):
    """The attention kept on the host, not rerun, gives the loss and gradients of recomputation; the step runs
    each attention projection twice (forward, backward) instead of three times, and the attention kernel once."""
    from lora_cli.speed import lora_linear

    model = checkpointed_fused_model(tiny_llama, device, quantized, fused_mlp=fused_mlp)
    autocast = torch.bfloat16 if device == "cuda" else None
    weights_made = []
    real_base_weight = lora_linear.base_weight
    monkeypatch.setattr(lora_linear, "base_weight", lambda layer, dtype: weights_made.append(layer) or
                        real_base_weight(layer, dtype))
    attention_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: attention_calls.append(1) or real_sdpa(*args, **kwargs))
    runs = {}
    for offload_attention in (False, True):
        offloaded_checkpointing(model, lean_recompute=True, offload_attention=offload_attention)
        weights_made.clear()
        attention_calls.clear()
        runs[offload_attention] = loss_and_grads(model, device, autocast), list(weights_made), len(attention_calls)
    (recomputed, recomputed_weights, recomputed_calls), (kept, kept_weights, kept_calls) = runs[False], runs[True]
    assert_same(recomputed, kept, 0.0 if device == "cpu" else 1e-5)
    layers = model.config.num_hidden_layers
    assert (recomputed_calls, kept_calls) == (2 * layers, layers)
    # the last layer's: the first layer's input needs no gradient, so its recomputed attention has no backward
    # product with the weights either
    attention = model.get_base_model().model.layers[-1].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        base = getattr(attention, name).get_base_layer()
        assert (recomputed_weights.count(base), kept_weights.count(base)) == (3, 2), name


def buffer_addresses_by_step(tiny_llama, lengths, max_tokens=None) -> list:
    """Each step's host buffer addresses (per layer, per saved storage's place) for rows of these lengths, each step
    checked against recomputation's loss and gradients."""
    from lora_cli.speed.offloaded_attention import attention_of

    model = checkpointed_fused_model(tiny_llama, "cpu", False)
    offloaded_checkpointing(model, lean_recompute=True)
    recomputed = [loss_and_grads(model, "cpu", length=length) for length in lengths]
    offloaded_checkpointing(model, lean_recompute=True, offload_attention=True, max_tokens=max_tokens)
    savers = [attention_of(layer).attention_saver for layer in model.get_base_model().model.layers]
    addresses = []
    for length, reference in zip(lengths, recomputed):
        assert_same(reference, loss_and_grads(model, "cpu", length=length), 0.0)
        addresses.append([{place: buffer.data_ptr() for place, buffer in saver.buffers.items()} for saver in savers])
    return addresses


@pytest.mark.parametrize("planned", [False, True], ids=["grown", "planned"])
def test_buffers_for_the_planned_tokens_are_made_once(tiny_llama, planned):
    """Rows growing longer step by step grow the buffers each time, pinning them anew; given the memory plan's
    tokens a step (max_tokens), the first row makes each per-token buffer that large and the longer rows reuse it,
    with the gradients of recomputation either way."""
    lengths = (16, 20, 24)
    max_tokens = 2 * max(lengths) if planned else None  # loss_and_grads: 2 rows
    addresses = buffer_addresses_by_step(tiny_llama, lengths, max_tokens)
    assert (addresses[0] == addresses[1] == addresses[2]) == planned


def test_rows_of_changing_length_grow_the_host_buffers_once(tiny_llama):
    """Packed long documents change the row's length from step to step: each layer's host buffers grow to the
    longest row and shorter rows use them (buffers of each exact size were pinned anew every step), with the
    gradients of recomputation."""
    addresses = buffer_addresses_by_step(tiny_llama, (24, 16, 24, 20))
    assert all(step == addresses[0] for step in addresses)  # made by the longest row, the first
    assert len(addresses[0][0]) > 1
