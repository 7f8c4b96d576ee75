"""lora's own kernels (lora_cli/kernels.py) against the libraries' path: same loss, same gradients.

Every test runs on the CPU and, where there is one, on a GPU (run there with `python -m pytest
tests/test_kernels.py`): only the GPU moves checkpointed inputs to the host on a side stream; on the CPU the
same recomputation runs with the inputs left in place. The Triton kernels themselves run on the GPU, or on a machine
without one through Triton's interpreter (conftest.py turns it on), where triton is installed.
"""

import pytest
import torch

from lora_cli.fused_mlp import fuse_gated_mlps
from lora_cli.kernels import LoraLinear, fuse_lora_layers, offloaded_checkpointing, triton_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through Triton's interpreter
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def peft_model(base_dir, device, quantized=False, dropout=0.0, use_dora=False, seed=0, untied=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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
                                            use_dora=use_dora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter has B = 0, which would hide errors in A's gradient
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


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


def loss_and_grads(model, device, autocast_dtype=None, checkpointing=False):
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (2, 24), device=device)
    if checkpointing:
        enable_checkpointing(model)
    model.zero_grad()
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
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
    products run as addmm on a CPU, and at kernels.base_weight), with the fused MLP too (whose backward takes the
    rerun's 4-bit gate and up weights as dequantized)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_cli import fused_mlp as fused_mlp_module
    from lora_cli import kernels

    model = checkpointed_fused_model(tiny_llama, device, quantized, dropout, fused_mlp)
    weights_made = []
    real_base_weight = kernels.base_weight
    for module in (kernels, fused_mlp_module):
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
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("fused_mlp", [False, True], ids=["layers", "fused-mlp"])
def test_offloaded_attention_gives_the_recomputed_gradients(tiny_llama, device, quantized, fused_mlp, monkeypatch):
    """The attention kept on the host, not rerun, gives the loss and gradients of recomputation; the step runs
    each attention projection twice (forward, backward) instead of three times, and the attention kernel once."""
    from lora_cli import kernels

    model = checkpointed_fused_model(tiny_llama, device, quantized, fused_mlp=fused_mlp)
    autocast = torch.bfloat16 if device == "cuda" else None
    weights_made = []
    real_base_weight = kernels.base_weight
    monkeypatch.setattr(kernels, "base_weight", lambda layer, dtype: weights_made.append(layer) or
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
    attention = model.get_base_model().model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        base = getattr(attention, name).get_base_layer()
        assert (recomputed_weights.count(base), kept_weights.count(base)) == (3, 2), name


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


@needs_triton
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("shape", [(1024, 4096), (33, 65)], ids=["even", "odd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_nf4_dequantization_is_bitsandbytes_exactly(nested, shape, dtype):
    import bitsandbytes.functional as bnb_functional

    from lora_cli.kernels import dequantize_nf4

    if KERNEL_DEVICE == "cpu" and (dtype == torch.bfloat16 or shape[0] > 64):
        # Triton's interpreter rounds float32 to bf16 otherwise than GPUs do (one bf16 step off, seen with
        # triton 3.6 and 3.9), and is slow: there the float32 values of the odd shape are checked.
        pytest.skip("the GPU's bf16 rounding and the large shape need a GPU")
    torch.manual_seed(0)
    weight = torch.randn(shape, device=KERNEL_DEVICE, dtype=torch.bfloat16) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    state.dtype = dtype  # bitsandbytes' own output in that dtype
    assert torch.equal(dequantize_nf4(packed, state, dtype), bnb_functional.dequantize_4bit(packed, state))


@needs_triton
@pytest.mark.parametrize("down", [False, True], ids=["gated", "with-down"])
def test_swiglu_kernels_compute_the_torch_arithmetic(down):
    """fused_mlp's Triton kernels against its torch arithmetic (what a CPU runs) in float32, on a shape that fills no
    tile and a rank below tl.dot's 16: SwiGLU of both pre-activations with their adapters' products; the gradients at
    both, written over the projections; with down_proj's adapter (LoraSwiGLUMLP), its term added to the gradient and h
    rebuilt over it."""
    from lora_cli.fused_mlp import BACKWARD_TILE, FORWARD_TILE, _kernels, gated, gated_backward, launch_gated_kernel

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's cross-entropy kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_torch(dtype):
    """The fused loss's LM head and loss, over several chunks and with unlabelled rows: the summed loss, the count
    of labels predicted right and the gradient at the hidden states are torch's."""
    from lora_cli.fused_loss import LinearCrossEntropy, liger_cross_entropy_kernel

    if liger_cross_entropy_kernel() is None:
        pytest.skip("needs liger-kernel")
    torch.manual_seed(0)
    rows, width, vocab = 300, 64, 5000  # ten chunks of 32 rows (CHUNK_MEM_CONST x 64 x 64 logits at most)
    hidden = torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, device="cuda", dtype=dtype) / width**0.5
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    loss, right = LinearCrossEntropy.apply(hidden, weight, labels)
    (loss / 10).backward()
    reference = hidden.detach().float().requires_grad_(True)
    logits = reference @ weight.float().t()
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    (expected / 10).backward()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    labelled = labels != -100
    assert right.item() == (logits.argmax(-1) == labels)[labelled].sum().item()
    assert torch.allclose(hidden.grad.float(), reference.grad, atol=tolerance * reference.grad.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU reads the embedding from pinned host memory")
def test_embedding_in_host_memory_gives_the_same_loss_and_gradients(tiny_llama):
    """The input embedding moved to host memory frees its GPU memory and changes no number; it comes back to the
    GPU as it was. A tied embedding (the LM head's weight too) stays."""
    from lora_cli.host_embedding import offload_embedding, offloadable_embedding, restore_embedding

    model = peft_model(tiny_llama, "cuda", untied=True)
    enable_checkpointing(model)
    reference = loss_and_grads(model, "cuda")
    embedding = offloadable_embedding(model)
    matrix = embedding.weight.detach().clone()
    before = torch.cuda.memory_allocated()
    offload_embedding(embedding)
    assert before - torch.cuda.memory_allocated() == matrix.numel() * matrix.element_size()
    assert embedding.weight.is_cuda and torch.equal(embedding.weight, matrix)
    assert_same(reference, loss_and_grads(model, "cuda"), 0.0)
    restore_embedding(embedding)
    assert torch.cuda.memory_allocated() == before
    assert torch.equal(embedding.weight, matrix)
    assert offloadable_embedding(peft_model(tiny_llama, "cuda")) is None
