"""CUDA graphs of checkpointed layers (lora_cli/speed/cuda_graphs.py) against the eager layers (GPU only)."""

import pytest
import torch

from lora_cli.speed.checkpointing import offloaded_checkpointing
from lever_models import assert_same, checkpointed_fused_model, enable_checkpointing, routed_model


def graphed_runs(model, device, runs=3, length=24, accumulate=1):
    """loss_and_grads as a training loop calls it, several times: graphs are captured on the second call."""
    results = []
    for _ in range(runs):
        model.zero_grad()
        torch.manual_seed(1)
        for _ in range(accumulate):  # gradient accumulation: .grad is added to, not replaced
            ids = torch.randint(10, 1000, (2, length), device=device)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    return results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-batch", "accumulated"])
def test_cuda_graphs_match_eager_layers(tiny_llama, quantized, dropout, accumulate):
    """Replayed layers (rerun without down_proj) give the eager layers' loss and gradients (same dropout masks),
    step after step."""
    model = checkpointed_fused_model(tiny_llama, "cuda", quantized, dropout)
    offloaded_checkpointing(model)
    reference = graphed_runs(model, "cuda", accumulate=accumulate)[0]
    _, pool = offloaded_checkpointing(model, cuda_graphs=True, lean_recompute=True,  # as lora train's defaults
                                      offload_attention=True)
    runs = graphed_runs(model, "cuda", runs=4, accumulate=accumulate)
    assert pool.broken is None and all(layer.replaying for layer in pool.layers)
    for run in runs:  # eager warm-up, capture and replay, replays
        assert_same(reference, run, 1e-5)
    assert_same(reference, graphed_runs(model, "cuda", runs=1, accumulate=accumulate)[0], 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["offloaded-attention", "dropout"])
def test_failed_capture_goes_on_with_eager_layers(tiny_llama, capsys, dropout):
    """A layer CUDA cannot capture (this one reads a value back to the host) turns the graphs off for the run with
    a warning, and training goes on with the eager layers' losses and gradients, dropout masks included."""
    model = checkpointed_fused_model(tiny_llama, "cuda", quantized=True, dropout=dropout)

    def read_back(module, args, output):
        output.sum().item()  # a host sync: not allowed while a stream is captured

    model.get_base_model().model.layers[1].mlp.register_forward_hook(read_back)
    offloaded_checkpointing(model)
    reference = graphed_runs(model, "cuda")[0]
    _, pool = offloaded_checkpointing(model, cuda_graphs=True, lean_recompute=True, offload_attention=True)
    runs = graphed_runs(model, "cuda", runs=4)
    assert pool.broken is not None and "capture failed" in capsys.readouterr().err
    for run in runs:
        assert_same(reference, run, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_follow_a_new_shape(tiny_llama):
    """Rows of another length run eagerly, then get graphs of their own; the first shape's graphs still replay."""
    model = checkpointed_fused_model(tiny_llama, "cuda", fused_mlp=False)
    offloaded_checkpointing(model)
    short, long = graphed_runs(model, "cuda", runs=1)[0], graphed_runs(model, "cuda", runs=1, length=40)[0]
    _, pool = offloaded_checkpointing(model, cuda_graphs=True, offload_attention=True)
    for length, reference in [(24, short), (24, short), (40, long), (40, long), (24, short), (40, long)]:
        assert_same(reference, graphed_runs(model, "cuda", runs=1, length=length)[0], 1e-5)
    assert pool.broken is None and [len(layer.entries) for layer in pool.layers] == [2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_moe_layers_replayed_keep_the_router_loss(tiny_moe_dir, name):
    """Replayed MoE layers (in bf16, the experts through their grouped LoRA, as lora train runs them on a GPU)
    return the router logits their graphs made: the load-balancing loss (weighted 1) and every gradient are the
    eager layers', step after step."""
    model = routed_model(tiny_moe_dir(name), "cuda", experts=True).to(torch.bfloat16)
    enable_checkpointing(model)
    offloaded_checkpointing(model, offload_attention=True)
    reference = graphed_runs(model, "cuda")[0]
    _, pool = offloaded_checkpointing(model, cuda_graphs=True, offload_attention=True)
    runs = graphed_runs(model, "cuda", runs=4)
    assert pool.broken is None and all(layer.replaying for layer in pool.layers)
    for run in runs:  # eager warm-up, capture and replay, replays
        assert_same(reference, run, 1e-5)
    ids = torch.randint(10, 1000, (2, 24), device="cuda")
    outputs = model(input_ids=ids, labels=ids)
    assert outputs.aux_loss.requires_grad and len(outputs.router_logits) == model.config.num_hidden_layers
