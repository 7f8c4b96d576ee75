"""NF4 dequantization in one Triton kernel (lora_linear.base_weight calls it for 4-bit weights on GPUs).

Why our own: bitsandbytes takes three launches for a double-quantized weight (its block
scales, their offset, the weight), each behind Python and ctypes: on an H100 the host needed 50-110 us between
them, so the GPU idled through the attention projections of every QLoRA layer (BENCH_PROFILE=cuda). A QLoRA step
dequantizes each weight three times (forward, recomputation, backward): 672 times for the Llama-3.1-8B shape.
Same arithmetic as bitsandbytes (float32 products, rounded once to the output dtype); tests/speed/test_nf4.py
checks the result is identical.
"""

import functools

import torch


@functools.cache
def _nf4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_nf4_kernel(packed, scales, scales2, code2, offset, lut, out, n_bytes, n_values, n_blocks,
                              BLOCKS: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr):
        # A program takes whole quantization blocks, a block a row: each block's scale is decoded once, not once a
        # byte (three loads a byte with double quantization). On an H200 a 14,336 x 4,096 weight took 50 us that
        # way and takes 40 us now (3.7 TB/s; `python benchmarks/kernel_tiles.py` times it). A table of value pairs,
        # one load a byte instead of two, was slower (docs/performance.md).
        blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        inside = blocks < n_blocks
        if NESTED:
            quantized = tl.load(scales + blocks, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + quantized) * tl.load(scales2 + blocks // BLOCK2, mask=inside, other=0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(scales + blocks, mask=inside, other=0.0)
        index = blocks[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        byte = tl.load(packed + index, mask=index < n_bytes, other=0).to(tl.int32)
        high = tl.load(lut + (byte >> 4)) * scale[:, None]  # the first value of a byte is in its high half
        low = tl.load(lut + (byte & 15)) * scale[:, None]
        values = tl.interleave(high, low)
        where = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tl.store(out + where, values.to(out.dtype.element_ty), mask=where < n_values)

    return dequantize_nf4_kernel


NF4_TILE = (1024, 4)  # packed bytes and warps a program (benchmarks/kernel_tiles.py)


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype, tile=NF4_TILE) -> torch.Tensor:
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    nested = state.nested
    scales2, code2, offset = ((state.state2.absmax, state.state2.code, state.offset) if nested
                              else (state.absmax, state.absmax, state.absmax))  # unused without double quantization
    n_bytes, (per_program, warps) = packed.numel(), tile
    block = state.blocksize
    blocks_per_program = max(1, per_program // (block // 2))
    n_blocks = -(-out.numel() // block)
    _nf4_kernel()[(-(-n_blocks // blocks_per_program),)](
        packed, state.absmax, scales2, code2, offset, state.code, out, n_bytes, out.numel(), n_blocks,
        BLOCKS=blocks_per_program, BLOCK=block, BLOCK2=state.state2.blocksize if nested else 1, NESTED=nested,
        enable_fp_fusion=False, num_warps=warps)  # bitsandbytes rounds the scale's product first: no FMA
    return out

