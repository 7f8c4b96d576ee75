"""Triton kernels of fused_mlp.py (a module of their own: Triton resolves the functions a kernel calls among
its module's globals, and importing triton needs the package, which CPU installs may lack)."""

import triton
import triton.language as tl


@triton.jit
def pre_activation(out, p, b, scale, rows, cols, n_cols, n_rows, rank, p_stride, R: tl.constexpr,
                   IEEE: tl.constexpr):
    """A tile of out + scale * p b^T in float32 (p: rows x rank, b: cols x rank), and where the tile is inside."""
    r = tl.arange(0, R)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    p_tile = tl.load(p + rows[:, None] * p_stride + r[None, :],
                     mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)
    b_tile = tl.load(b + cols[None, :] * rank + r[:, None], mask=(cols[None, :] < n_cols) & (r[:, None] < rank),
                     other=0.0)
    if IEEE:
        product = tl.dot(p_tile, b_tile, input_precision="ieee")
    else:
        product = tl.dot(p_tile, b_tile)
    value = tl.load(out + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    return value + scale * product, inside


@triton.jit
def tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, n_rows, n_cols, rank,
                         p_stride, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """This program's tile of both pre-activations, its offsets and where it is inside."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    gate, inside = pre_activation(gate_out, p_gate, b_gate, s_gate, rows, cols, n_cols, n_rows, rank, p_stride, R,
                                  IEEE)
    up, _ = pre_activation(up_out, p_up, b_up, s_up, rows, cols, n_cols, n_rows, rank, p_stride, R, IEEE)
    return gate, up, rows[:, None] * n_cols + cols[None, :], inside


@triton.jit
def forward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, hidden, n_rows, n_cols, rank,
                   p_stride, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    gate, up, where, inside = tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up,
                                                   n_rows, n_cols, rank, p_stride, R, BM, BN, IEEE)
    tl.store(hidden + where, (gate * tl.sigmoid(gate) * up).to(hidden.dtype.element_ty), mask=inside)


@triton.jit
def backward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, grad, n_rows, n_cols, rank,
                    p_stride, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Writes the gradients at the pre-activations over gate_out and up_out."""
    gate, up, where, inside = tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up,
                                                   n_rows, n_cols, rank, p_stride, R, BM, BN, IEEE)
    g = tl.load(grad + where, mask=inside, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    tl.store(gate_out + where, (g * up * sigmoid * (1 + gate * (1 - sigmoid))).to(gate_out.dtype.element_ty),
             mask=inside)
    tl.store(up_out + where, (g * gate * sigmoid).to(up_out.dtype.element_ty), mask=inside)
