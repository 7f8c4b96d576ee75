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
    """This program's tile of both pre-activations, its rows and columns, and where it is inside."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    gate, inside = pre_activation(gate_out, p_gate, b_gate, s_gate, rows, cols, n_cols, n_rows, rank, p_stride, R,
                                  IEEE)
    up, _ = pre_activation(up_out, p_up, b_up, s_up, rows, cols, n_cols, n_rows, rank, p_stride, R, IEEE)
    return gate, up, rows, cols, inside


# Both kernels take the same arguments (fused_mlp.launch_gated_kernel); the down_proj ones (p_down, a_down_t,
# s_down, p_down_stride) are read by the backward with DOWN only.
@triton.jit
def forward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, hidden, p_down, a_down_t, s_down,
                   n_rows, n_cols, rank, p_stride, p_down_stride, R: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, IEEE: tl.constexpr, DOWN: tl.constexpr):
    gate, up, rows, cols, inside = tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up,
                                                        n_rows, n_cols, rank, p_stride, R, BM, BN, IEEE)
    where = rows[:, None] * n_cols + cols[None, :]
    tl.store(hidden + where, (gate * tl.sigmoid(gate) * up).to(hidden.dtype.element_ty), mask=inside)


@triton.jit
def backward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, grad, p_down, a_down_t, s_down,
                    n_rows, n_cols, rank, p_stride, p_down_stride, R: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, IEEE: tl.constexpr, DOWN: tl.constexpr):
    """Writes the gradients at the pre-activations over gate_out and up_out. With DOWN, grad lacks down_proj's
    adapter term s_d (grad at h A_d^T) A_d, added here in float32, and h is written over grad (each program reads
    its tile of grad before writing it)."""
    gate, up, rows, cols, inside = tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up,
                                                        n_rows, n_cols, rank, p_stride, R, BM, BN, IEEE)
    where = rows[:, None] * n_cols + cols[None, :]
    if DOWN:
        g, _ = pre_activation(grad, p_down, a_down_t, s_down, rows, cols, n_cols, n_rows, rank, p_down_stride, R,
                              IEEE)
    else:
        g = tl.load(grad + where, mask=inside, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    tl.store(gate_out + where, (g * up * sigmoid * (1 + gate * (1 - sigmoid))).to(gate_out.dtype.element_ty),
             mask=inside)
    tl.store(up_out + where, (g * gate * sigmoid).to(up_out.dtype.element_ty), mask=inside)
    if DOWN:
        tl.store(grad + where, (gate * sigmoid * up).to(grad.dtype.element_ty), mask=inside)
