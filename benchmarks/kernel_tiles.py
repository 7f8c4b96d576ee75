"""Tile sizes of fused_mlp's Triton kernels (gated.py; fused_mlp.FORWARD_TILE and BACKWARD_TILE): time
of the forward and backward kernels, and the memory bandwidth they reach, for the Llama-3.1-8B MLP shape at batch
2 x 2048 tokens, r=16, bf16. On a GPU:

    python benchmarks/kernel_tiles.py

Both kernels are memory-bound (the forward reads two N x intermediate projections and writes one, the backward
reads three and writes two), so the figure to compare is GB/s against the GPU's (H100 SXM: 3,350 GB/s; H200: 4,800
by the datasheet). The NF4 dequantization's program size is swept too (kernels/nf4.NF4_TILE).
"""

import itertools

import torch

from lora_cli.speed.fused_mlp import launch_gated_kernel
from lora_cli.speed.kernels import gated
from lora_cli.speed.kernels.nf4 import dequantize_nf4

ROWS, COLS, RANK = 4096, 14336, 16


def milliseconds(run, repeats=50) -> float:
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def gated_mlp_tiles() -> None:
    torch.manual_seed(0)
    big = dict(device="cuda", dtype=torch.bfloat16)
    tensors = [torch.randn(ROWS, COLS, **big), torch.randn(ROWS, COLS, **big), torch.randn(ROWS, RANK, **big),
               torch.randn(COLS, RANK, **big), torch.randn(ROWS, RANK, **big), torch.randn(COLS, RANK, **big)]
    hidden, grad = torch.empty(ROWS, COLS, **big), torch.randn(ROWS, COLS, **big)
    size = ROWS * COLS * 2
    print(f"{'BM':>4} {'BN':>4} {'warps':>5}  {'forward ms':>10} {'GB/s':>6}  {'backward ms':>11} {'GB/s':>6}")
    for block_rows, block_cols, warps in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        if block_rows * block_cols > 128 * 128:
            continue
        tile = block_rows, block_cols, warps
        forward = milliseconds(
            lambda: launch_gated_kernel(gated.forward_kernel, tile, *tensors, (2.0, 2.0), hidden))
        # The backward writes gradients over the projections it reads: values change, the memory traffic does not.
        backward = milliseconds(
            lambda: launch_gated_kernel(gated.backward_kernel, tile, *tensors, (2.0, 2.0), grad))
        print(f"{block_rows:>4} {block_cols:>4} {warps:>5}  {forward:>10.3f} {3 * size / forward / 1e6:>6.0f}  "
              f"{backward:>11.3f} {5 * size / backward / 1e6:>6.0f}", flush=True)


def nf4_tiles() -> None:
    import bitsandbytes.functional as bnb

    weight = torch.randn(COLS, 4096, device="cuda", dtype=torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    print(f"{'bytes':>6} {'warps':>5}  {'dequantize ms':>13} {'GB/s':>6}")
    for per_program, warps in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)):
        elapsed = milliseconds(lambda: dequantize_nf4(packed, state, torch.bfloat16, (per_program, warps)))
        print(f"{per_program:>6} {warps:>5}  {elapsed:>13.3f} {weight.numel() * 2.5 / elapsed / 1e6:>6.0f}", flush=True)


if __name__ == "__main__":
    gated_mlp_tiles()
    nf4_tiles()
