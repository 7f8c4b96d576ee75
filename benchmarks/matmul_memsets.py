"""Times one decoder layer's large matmuls (Llama-3.1-8B shape, 4,096 tokens, bf16) replayed as a CUDA graph, and
counts the memsets cuBLAS puts before them, under the cuBLAS settings named on the command line.

    python benchmarks/matmul_memsets.py            # each setting in its own process, side by side

Why: in the QLoRA step's GPU trace (BENCH_PROFILE=cuda BENCH_TRACE_DIR=... python benchmarks/speed.py --modes
qlora) cuBLAS ran a small memset before every large matmul, 772 a step, and the GPU idled about 9 ms a step
around them (graph nodes of another kind between kernels). Measured on an H100 (2026-11-23-h100-matmul-memsets.txt):
4.029 ms a layer with cuBLAS's memsets, 4.025 without them (CUBLAS_WORKSPACE_CONFIG=:0:0, other kernels).
"""

import json
import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "cublas workspace 0": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "cublasLt": {"LORA_PROBE_BLAS": "cublaslt"},
}
TOKENS, HIDDEN, KV, INTERMEDIATE = 4096, 4096, 1024, 14336


def measure() -> dict:
    import torch

    if os.environ.get("LORA_PROBE_BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["LORA_PROBE_BLAS"])
    dtype = torch.bfloat16
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=dtype)
    weights = {name: torch.randn(shape, device="cuda", dtype=dtype) * 0.02 for name, shape in
               {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
                "gate": (INTERMEDIATE, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}.items()}
    h = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=dtype)

    def layer():
        outs = [x @ weights[name].t() for name in ("q", "k", "v", "o", "gate", "up")]
        outs.append(h @ weights["down"].t())
        grads = [outs[0] @ weights["q"], outs[4] @ weights["gate"], x @ weights["down"]]
        return outs, grads

    for _ in range(3):
        layer()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        layer()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"ms_per_layer": round(start.elapsed_time(end) / 50, 4),
            "memsets": sum("emset" in e.name for e in events),
            "kernels": sorted({e.name[13:45] for e in events if "emset" not in e.name})}


def main() -> None:
    if "--one" in sys.argv:
        print(json.dumps(measure()))
        return
    for name, env in SETTINGS.items():
        proc = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True,
                              env={**os.environ, **env})
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else proc.stderr[-200:]
        print(f"{name:>22}: {result}", flush=True)


if __name__ == "__main__":
    main()
