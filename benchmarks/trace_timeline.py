"""Where a profiled step's GPU time goes over time: for each window of a GPU trace (`BENCH_PROFILE=cuda
BENCH_TRACE_DIR=DIR python benchmarks/speed.py --modes qlora` keeps one), how long the GPU computed, only copied
to or from the host, or idled, and how busy each direction of the host link was; then the kernel time by kind.

The forward pass shows as windows with host copies out, the backward as windows with copies back, the LM head and
loss between them, the optimizer step and the next batch where both stop.

Usage: python benchmarks/trace_timeline.py TRACE.json.gz [--window-ms 10]
"""

import argparse
import collections
import gzip
import json


def merged(spans):
    out = []
    for begin, end in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return out


def within(spans, low, high) -> float:
    return sum(max(0.0, min(end, high) - max(begin, low)) for begin, end in spans)


def kind(name: str) -> str:
    if name.startswith(("Memcpy DtoH", "Memcpy HtoD")):
        return "host copy"
    if name.startswith("Memcpy DtoD") or "memcpy" in name:
        return "device copy"
    if name.startswith("nvjet") or "gemm" in name or "splitKreduce" in name:
        return "matmul"
    if "dequantize" in name:
        return "NF4 dequantization"
    if "sdpa" in name or "fmha" in name or "flash" in name:
        return "attention"
    if "elementwise" in name or "Memset" in name:
        return "elementwise and memset"
    return "other kernels (Triton, reductions)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--window-ms", type=float, default=10.0)
    args = parser.parse_args()
    events = json.loads(gzip.decompress(open(args.trace, "rb").read()))["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    start, stop = spans[0][0], max(end for _, end, _ in spans)
    link = {"out": [(b, e) for b, e, n in spans if n.startswith("Memcpy DtoH")],
            "back": [(b, e) for b, e, n in spans if n.startswith("Memcpy HtoD")]}
    compute = merged((b, e) for b, e, n in spans if kind(n) != "host copy")
    busy = merged((b, e) for b, e, _ in spans)
    window = args.window_ms * 1e3
    print(f"{(stop - start) / 1e3:.1f} ms traced: computing {within(compute, start, stop) / 1e3:.1f}, copying only "
          f"{(within(busy, start, stop) - within(compute, start, stop)) / 1e3:.1f}, idle "
          f"{(stop - start - within(busy, start, stop)) / 1e3:.1f} ms")
    print(f"{'from ms':>8} {'compute':>8} {'copy only':>10} {'idle':>6} {'link out':>9} {'link back':>10}")
    low = start
    while low < stop:
        high = low + window
        computing, busy_now = within(compute, low, high), within(busy, low, high)
        print(f"{(low - start) / 1e3:8.0f} {computing / 1e3:8.2f} {(busy_now - computing) / 1e3:10.2f} "
              f"{(min(high, stop) - low - busy_now) / 1e3:6.2f} {within(link['out'], low, high) / 1e3:9.2f} "
              f"{within(link['back'], low, high) / 1e3:10.2f}")
        low = high
    by_kind, calls = collections.Counter(), collections.Counter()
    for begin, end, name in spans:
        by_kind[kind(name)] += end - begin
        calls[kind(name)] += 1
    print("kernel time by kind (ms, calls, over the whole trace):")
    for name, total in by_kind.most_common():
        print(f"  {total / 1e3:8.2f} {calls[name]:6d}  {name}")


if __name__ == "__main__":
    main()
