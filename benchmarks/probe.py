"""Three measurements behind choices in the GPU levers (docs/performance.md), on a GPU machine:

    python benchmarks/probe.py

1. Varlen flash attention with grouped key/value heads passed as they are against repeated to the query's heads
   (Llama-3.1-8B shape, 4,096 packed tokens, forward and backward): outputs and gradients compared, time per call.
2. cuBLAS bf16 matmul rates on the shapes of that model's step (4,096 tokens).
3. Pinned host <-> GPU copy bandwidth, which bounds what activation offloading can move per step: each direction
   alone, then both at once on two streams (as when the forward pass copies activations out while weights or
   activations would come in: what streaming the NF4 weights from host memory would have to share).
"""

import inspect
import time

import torch
from torch.nn.attention.varlen import varlen_attn


def timed(fn, repeats: int) -> float:
    """Seconds per call, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    started = time.time()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.time() - started) / repeats


def grouped_attention() -> None:
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 4096, 32, 8, 128
    lengths = [300, 1200, 40, 700, 1856]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    options = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in options else {"window_size": (-1, 0)}
    gqa = {"enable_gqa": True} if "enable_gqa" in options else {}
    groups = heads // kv_heads
    calls = {
        "repeated": lambda: varlen_attn(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), cu, cu,
                                        max(lengths), max(lengths), **causal),
        "grouped": lambda: varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **causal, **gqa),
    }
    results = {}
    for name, call in calls.items():
        def step(call=call):
            call().backward(grad)
        q.grad = k.grad = v.grad = None
        out = call()
        out.backward(grad)
        results[name] = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
        print(f"varlen attention, key/value heads {name}: {timed(step, 50) * 1e3:.2f} ms forward and backward")
    for label, a, b in zip(("output", "dq", "dk", "dv"), results["repeated"], results["grouped"]):
        print(f"  {label}: max difference {(a.float() - b.float()).abs().max().item():.2e}")


def matmul_rates() -> None:
    for n, k in ((14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (128256, 4096)):
        a = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        seconds = timed(lambda a=a, w=w: a @ w.t(), 50)
        print(f"matmul 4096x{k} @ {k}x{n}: {seconds * 1e3:.3f} ms, {2 * 4096 * k * n / seconds / 1e12:.0f} TFLOP/s")


def host_bandwidth() -> None:
    device = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    host = torch.empty(device.shape, dtype=torch.uint8, pin_memory=True)
    for direction, (dst, src) in (("GPU -> host", (host, device)), ("host -> GPU", (device, host))):
        seconds = timed(lambda dst=dst, src=src: dst.copy_(src, non_blocking=True), 10)
        print(f"{direction}: {0.5 / seconds:.1f} GiB/s (pinned)")
    device_in = torch.empty_like(device)
    host_in = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)  # empty_like would not pin it
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        for stream, (dst, src) in zip(streams, ((host, device), (device_in, host_in))):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)

    seconds = timed(both, 10)
    print(f"both at once: {0.5 / seconds:.1f} GiB/s each way (pinned)")


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    grouped_attention()
    matmul_rates()
    host_bandwidth()
