"""Offloaded checkpointing and lean recomputation (lora_cli/speed/checkpointing.py, recomputation.py) against
transformers' checkpointing: same loss, same gradients."""

import weakref

import pytest
import torch

from lora_cli.speed.checkpointing import offloaded_checkpointing
from lora_cli.speed.lora_linear import fuse_lora_layers
from lever_models import (DEVICES, assert_same, checkpointed_fused_model, loss_and_grads, peft_model,
                          routed_model)


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
    # forward, rerun, backward; the fused MLP's backward reuses the rerun's dequantized gate and up weights; the first
    # layer's q, k and v compute no input gradient in the backward (the embedding output needs none)
    kept = 2 if quantized and fused_mlp else 0
    assert full_weights == (3 * 7 - kept) * config.num_hidden_layers - 3
    assert full_weights - lean_weights == config.num_hidden_layers


@pytest.mark.parametrize("device", DEVICES)
def test_the_embedding_output_is_let_go_after_the_forward(tiny_llama, device):
    """enable_input_require_grads makes the embedding output a leaf that requires grad; the step's graph no longer
    holds it (nor gives it a gradient) through the backward, and the adapters' gradients are checkpointing's."""
    model = peft_model(tiny_llama, device)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model)
    made = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, output: made.append(output))
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (2, 24), device=device)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    hook.remove()
    embedding_output = weakref.ref(made.pop())
    assert embedding_output() is None
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert_same(reference, (loss.item(), grads), 1e-5)


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


# Recomputed layer inputs: stored nowhere, made again in the backward from the layer before's.

@pytest.fixture(scope="module")
def four_layer_llama(tiny_llama, tmp_path_factory):
    """tiny_llama's shape with four decoder layers: room for two recomputed layer inputs (layers 1 and 3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("four-layer-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def layer_forward_calls(model) -> list[int]:
    """A counter of each decoder layer's forward runs (its MLP's: a hook on the layer itself is outside the
    checkpoint and misses the reruns)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = []
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        index = len(calls)
        calls.append(0)
        layer.mlp.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


def offloader_of(loss):
    """The HostOffloader of the checkpointed layers behind a loss, found in its autograd graph (each
    OffloadedCheckpoint node is its own ctx)."""
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "offloader"):
            return node.offloader
        nodes += [next_node for next_node, _ in node.next_functions]
    raise AssertionError("no offloaded checkpoint in the graph")


def stored_and_recomputed(model, device, autocast=None):
    """One training step's loss and gradients, with which layers' inputs were stored and which were left to be
    recomputed (read from the offloader between the forward and the backward) and each layer's forward runs."""
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (2, 24), device=device)
    model.zero_grad()
    calls = layer_forward_calls(model)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    offloader = offloader_of(loss)
    layers = len(offloader.places)
    stored = sorted(key % layers for key in [*offloader.kept, *offloader.on_host])
    recomputed = sorted(key % layers for key in offloader.recomputed)
    loss.backward()
    assert not (offloader.kept or offloader.on_host or offloader.prefetched or offloader.recomputed)
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    return (loss.item(), grads), stored, recomputed, calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("host_layers,recomputed", [(None, 1), (None, 2), (0, 2), (1, 2), (2, 1)])
def test_recomputed_layer_inputs_match_checkpointing(four_layer_llama, device, host_layers, recomputed):
    """Layers 3 (and 1) keep no input: their backward reruns layer 2 (and 0) from its input to make it. The same
    loss and gradients as transformers' checkpointing, one more forward of each layer before a recomputed one, two
    steps running; with the other inputs on the host, on the GPU or both."""
    model = peft_model(four_layer_llama, device, True)
    fuse_lora_layers(model)
    autocast = torch.bfloat16 if device == "cuda" else None
    reference = loss_and_grads(model, device, autocast, checkpointing=True)
    offloaded_checkpointing(model, host_layers=host_layers, recomputed_layers=recomputed)
    dropped = [3, 1][:recomputed]
    for _ in range(2):
        result, stored, not_stored, calls = stored_and_recomputed(model, device, autocast)
        assert_same(reference, result, 1e-5)
        assert not_stored == sorted(dropped)
        assert stored == [layer for layer in range(4) if layer not in dropped]
        assert calls == [3 if layer + 1 in dropped else 2 for layer in range(4)]


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_layer_inputs_replay_dropout(four_layer_llama, device):
    """The rerun of the layer before draws its forward's dropout masks again (its RNG state restored), so the input
    it makes is the one the forward passed on."""
    model = peft_model(four_layer_llama, device, dropout=0.3)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model, recomputed_layers=2)
    result, _, recomputed, _ = stored_and_recomputed(model, device)
    assert recomputed == [1, 3]
    assert_same(reference, result, 1e-5)


class DoubledInput(torch.nn.Module):
    """A decoder layer with its input doubled first, outside the layer's checkpoint (a hook on the layer would run
    inside it in some transformers releases)."""

    def __init__(self, layer, in_place: bool):
        super().__init__()
        self.layer, self.in_place = layer, in_place

    def forward(self, hidden_states, *args, **kwargs):
        hidden_states = hidden_states.mul_(2) if self.in_place else hidden_states * 2
        return self.layer(hidden_states, *args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("between", ["new tensor", "in place"])
def test_an_input_that_is_not_the_layer_befores_output_is_kept(four_layer_llama, device, between):
    """Where something runs between two layers (here: the hidden states doubled before layer 3, into a new tensor
    or in place), rerunning the layer before would not give the input: it is kept, and gradients still match."""
    from lora_cli.experts import language_layers

    model = peft_model(four_layer_llama, device)
    fuse_lora_layers(model)
    _, layers = language_layers(model.get_base_model())
    layers[3] = DoubledInput(layers[3], in_place=between == "in place")
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model, recomputed_layers=2)
    result, stored, recomputed, calls = stored_and_recomputed(model, device)
    assert recomputed == [1] and stored == [0, 2, 3]
    assert calls == [3, 2, 2, 2]
    assert_same(reference, result, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_layer_inputs_with_lora_trains_long_sequence_levers(four_layer_llama, device):
    """As lora train runs half a million tokens: QLoRA, the fused MLP in tiles, lean recomputation (whose rerun skips
    down_proj, which the rerun of the layer before must not), one input on the host, one on the GPU, two recomputed."""
    from lora_cli.speed.tiled_mlp import tile_mlps, untile_mlps

    model = checkpointed_fused_model(four_layer_llama, device, quantized=True)
    autocast = torch.bfloat16 if device == "cuda" else None
    tile_mlps(model, 5)  # in the reference too: in bf16 the tiles' sums round apart from the whole sequence's
    reference = loss_and_grads(model, device, autocast)
    offloaded_checkpointing(model, lean_recompute=True, host_layers=1, recomputed_layers=2)
    result, stored, recomputed, calls = stored_and_recomputed(model, device, autocast)
    untile_mlps(model)
    assert (stored, recomputed, calls) == ([0, 2], [1, 3], [3, 2, 3, 2])
    assert_same(reference, result, 1e-5)


# MoE: the router's load-balancing loss, from router logits the checkpointed layers record (router_logits.py).

ROUTED = ["qwen3_moe", "mixtral", "gpt_oss"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ROUTED)
def test_router_loss_gradient_matches_checkpointing(tiny_moe_dir, device, name):
    """The loss with the load-balancing loss, and every LoRA gradient, are transformers' checkpointing's (its
    checkpoint, not reentrant, records router logits with autograd): the router logits the model returns carry the
    gradient, two steps running."""
    model = routed_model(tiny_moe_dir(name), device)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model)
    ids = torch.randint(10, 1000, (1, 8), device=device)
    outputs = model(input_ids=ids, labels=ids)
    assert outputs.aux_loss.requires_grad and all(logits.requires_grad for logits in outputs.router_logits)
    for _ in range(2):
        assert_same(reference, loss_and_grads(model, device), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("host_layers,recomputed", [(None, 2), (1, 1)])
def test_router_loss_gradient_with_recomputed_layer_inputs(tiny_moe_dir, device, host_layers, recomputed):
    """Layers whose input the backward makes again from the layer before's rerun (no autograd, no router logits
    recorded) give the same loss and gradients: the router logits come from each layer's own forward and rerun."""
    model = routed_model(tiny_moe_dir("qwen3_moe", layers=4), device)
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model, host_layers=host_layers, recomputed_layers=recomputed)
    dropped = [3, 1][:recomputed]
    result, _, not_stored, calls = stored_and_recomputed(model, device)
    assert not_stored == sorted(dropped)
    assert calls == [3 if layer + 1 in dropped else 2 for layer in range(4)]
    assert_same(reference, result, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_router_loss_gradient_with_offloaded_attention(tiny_moe_dir, device):
    """With the attention kept on the host, not rerun, the rerun's router logits still carry the gradient."""
    from lora_cli.speed.offloaded_attention import offloadable_attentions

    model = routed_model(tiny_moe_dir("qwen3_moe"), device)
    assert offloadable_attentions(model) == 2
    reference = loss_and_grads(model, device, checkpointing=True)
    offloaded_checkpointing(model, offload_attention=True)
    assert_same(reference, loss_and_grads(model, device), 1e-5)


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked-in-the-call"])
def test_router_logits_asked_for_in_the_call(tiny_moe_dir, asked):
    """With the config not asking for router logits the model records none and the loss is the LM loss alone; asked
    for in the call instead (no config), they carry the gradient too: the same loss and gradients as transformers'
    checkpointing either way."""
    model = routed_model(tiny_moe_dir("qwen3_moe"), "cpu")
    model.get_base_model().config.output_router_logits = False
    reference = loss_and_grads(model, "cpu", checkpointing=True, output_router_logits=asked)
    offloaded_checkpointing(model)
    ids = torch.randint(10, 1000, (1, 8))
    outputs = model(input_ids=ids, labels=ids, output_router_logits=asked)
    assert (outputs.router_logits is not None) == asked and (outputs.aux_loss is not None) == asked
    assert_same(reference, loss_and_grads(model, "cpu", output_router_logits=asked), 1e-5)
