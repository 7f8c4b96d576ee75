"""Times the MLP's large matmuls of the Llama-3.1-8B QLoRA step (4,096 tokens, bf16) in the layouts they could take,
alone and while a side stream copies to the host as offloading does, with the GPU's clock and power read alongside.

    python benchmarks/matmul_layouts.py

Why: in the profiled step (BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora) these matmuls ran at about
700 TFLOP/s on an H200, against about 800 for the same shapes timed alone on an H100 (benchmarks/probe.py). This
says whether the layout (the weight as stored, [out, in], or transposed), joining gate and up into one matmul, the
host copies beside them, or the clock under sustained load makes that difference.
"""

import subprocess

import torch

TOKENS, HIDDEN, INTERMEDIATE = 4096, 4096, 14336
REPEATS = 40


def clock_and_power() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return out or "nvidia-smi gave nothing"


def timed_graph(fn, flops: float, copying: bool) -> str:
    """fn replayed as a CUDA graph REPEATS times; TFLOP/s, with a host copy loop on a side stream if copying."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    copier = torch.cuda.Stream()
    if copying:  # about what the offloaded forward moves a layer, over and over
        source = torch.empty(146 * 2**20, dtype=torch.uint8, device="cuda")
        target = torch.empty(source.shape, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(copier):
            for _ in range(60):
                target.copy_(source, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / REPEATS
    return f"{seconds * 1e3:.3f} ms, {flops / seconds / 1e12:.0f} TFLOP/s"


def main() -> None:
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype)
    w = torch.randn(INTERMEDIATE, HIDDEN, device=device, dtype=dtype) * 0.02  # [out, in], as dequantized
    w_t = w.t().contiguous()  # [in, out]
    w_gate_up = torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=dtype) * 0.02
    grad = torch.randn(TOKENS, INTERMEDIATE, device=device, dtype=dtype)
    grad_gate_up = torch.randn(TOKENS, 2 * INTERMEDIATE, device=device, dtype=dtype)
    one = 2 * TOKENS * HIDDEN * INTERMEDIATE
    cases = {
        "forward x W^T, W [out, in] (as now)": (lambda: torch.nn.functional.linear(x, w), one),
        "forward x W_t, W_t [in, out]": (lambda: x @ w_t, one),
        "forward gate and up as one, [2I, in]": (lambda: torch.nn.functional.linear(x, w_gate_up), 2 * one),
        "input grad g W, W [out, in] (as now)": (lambda: grad @ w, one),
        "input grad g W_t^T, W_t [in, out]": (lambda: grad @ w_t.t(), one),
        "input grad gate and up as one, K = 2I": (lambda: grad_gate_up @ w_gate_up, 2 * one),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; before: {clock_and_power()}")
    for copying in (False, True):
        for name, (fn, flops) in cases.items():
            print(f"{name:>42} {'with host copies' if copying else 'alone':>16}: {timed_graph(fn, flops, copying)}"
                  f"  [{clock_and_power()}]", flush=True)
    # Sustained: the same forward matmul for about 10 s, the clock read every ~2 s.
    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    for second in range(5):
        print(f"sustained, {second * 2 + 2} s: {timed_graph(fn, one, False)} ... ", end="", flush=True)
        for _ in range(30):
            timed_graph(fn, one, False)
        print(clock_and_power(), flush=True)


if __name__ == "__main__":
    main()
