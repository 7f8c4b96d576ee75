"""Times one Llama-3.1-8B layer's frozen base products at long sequences in bf16 and in FP8 (e4m3, a scale a row),
the quantization of their inputs included, to bound what FP8 base products could take off a QLoRA step.

    python benchmarks/fp8_products.py [--tokens 65536]

Why: at 65,536 tokens the step is bound by compute and by the GPU's power limit (docs/long-sequences.md, "Speed at
32K and 64K"); the base products are a third of its kernel time, and Hopper's FP8 products do twice the bf16 FLOPs.
This measures, before anything is built, the products the step runs for each layer: the forward (x W^T) and the
input gradient (g W) of q, k, v, o, gate, up and down, plus the backward's rerun of gate and up. FP8 times include
quantizing the activation or gradient (amax a row, scale, cast; compiled into one kernel by torch.compile); the
frozen weights are quantized once, outside the timing (as a cache of them would be). The relative error of each
FP8 product against bf16 is printed beside it.
"""

import argparse
import subprocess

import torch

from kernel_tiles import milliseconds

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def clock_and_power() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return out or "nvidia-smi gave nothing"


@torch.compile
def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in e4m3 with one fp32 scale a row (x ~ q * scale), as torch._scaled_mm's rowwise scaling takes it."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    return (x.float() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn), amax / E4M3_MAX


def fp8_product(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x W^T with W given as e4m3 rows [out, in] and their scales [out, 1]."""
    x_q, x_scale = quantized_rows(x)
    return torch._scaled_mm(x_q, weight_q.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, tokens = "cuda", args.tokens
    # (name, in, out, runs a step: forward, input gradient, and gate/up once more in the backward's rerun)
    products = [("q", HIDDEN, HIDDEN, 2), ("k", HIDDEN, KV, 2), ("v", HIDDEN, KV, 2), ("o", HIDDEN, HIDDEN, 2),
                ("gate", HIDDEN, INTERMEDIATE, 3), ("up", HIDDEN, INTERMEDIATE, 3), ("down", INTERMEDIATE, HIDDEN, 2)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {tokens} tokens; before: {clock_and_power()}")
    totals = {"bf16": 0.0, "fp8": 0.0}
    for name, fan_in, fan_out, runs in products:
        weight = torch.randn(fan_out, fan_in, device=device, dtype=torch.bfloat16) * fan_in ** -0.5
        x = torch.randn(tokens, fan_in, device=device, dtype=torch.bfloat16)
        grad = torch.randn(tokens, fan_out, device=device, dtype=torch.bfloat16)
        weight_q, weight_scale = quantized_rows(weight)  # rows [out, in]: the forward's
        weight_t_q, weight_t_scale = quantized_rows(weight.t().contiguous())  # rows [in, out]: the input gradient's
        flops = 2 * tokens * fan_in * fan_out
        cases = {
            "forward": (lambda: x @ weight.t(), lambda: fp8_product(x, weight_q, weight_scale), 1 + (runs == 3)),
            "input grad": (lambda: grad @ weight, lambda: fp8_product(grad, weight_t_q, weight_t_scale), 1),
        }
        for case, (bf16, fp8, count) in cases.items():
            error = ((fp8().float() - bf16().float()).norm() / bf16().float().norm()).item()
            bf16_ms, fp8_ms = milliseconds(bf16, args.repeats), milliseconds(fp8, args.repeats)
            totals["bf16"] += count * bf16_ms
            totals["fp8"] += count * fp8_ms
            print(f"{name:>5} {case:>10} x{count}: bf16 {bf16_ms:7.2f} ms ({flops / bf16_ms / 1e9:4.0f} TFLOP/s), "
                  f"fp8 {fp8_ms:7.2f} ms ({flops / fp8_ms / 1e9:4.0f} TFLOP/s), relative error {error:.4f}", flush=True)
        del weight, x, grad
    print(f"one layer's base products a step: bf16 {totals['bf16']:.1f} ms, fp8 {totals['fp8']:.1f} ms "
          f"({totals['bf16'] - totals['fp8']:.1f} ms less); after: {clock_and_power()}")


if __name__ == "__main__":
    main()
