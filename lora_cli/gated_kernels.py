"""Triton kernels of fused_mlp.py (a module of their own: Triton resolves the functions a kernel calls among
its module's globals, and importing triton needs the package, which CPU installs may lack)."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: float32 products (no TF32) for float32 inputs."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


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
    value = tl.load(out + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    return value + scale * dot(p_tile, b_tile, IEEE), inside


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


@triton.jit
def forward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, hidden, n_rows, n_cols, rank,
                   p_stride, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    gate, up, rows, cols, inside = tile_pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up,
                                                        n_rows, n_cols, rank, p_stride, R, BM, BN, IEEE)
    where = rows[:, None] * n_cols + cols[None, :]
    tl.store(hidden + where, (gate * tl.sigmoid(gate) * up).to(hidden.dtype.element_ty), mask=inside)


@triton.jit
def backward_kernel(gate_out, up_out, p_gate, b_gate, p_up, b_up, s_gate, s_up, grad, grad_p_down, a_down_t, s_down,
                    by_rows, by_cols, n_rows, n_cols, rank, p_stride, grad_p_stride, R: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, DOWN: tl.constexpr):
    """Writes the gradients at the pre-activations over gate_out and up_out, and their adapters' products in
    float32 parts: by_rows[k, block] (rows x R) is this column block's part of dgate Bg, dup Bu and, with DOWN,
    h A_d^T; by_cols[k, group] (columns x R) this row group's part of dgate^T p_gate, dup^T p_up and, with DOWN,
    h^T (grad at h A_d^T). A program takes one column block and every groups-th row tile, so the by_cols parts add
    up in registers. With DOWN, grad lacks down_proj's adapter term s_d (grad at h A_d^T) A_d, added here, and h
    is only used here: nothing else reads it."""
    block, blocks = tl.program_id(0), tl.num_programs(0)
    group, groups = tl.program_id(1), tl.num_programs(1)
    cols = block * BN + tl.arange(0, BN)
    r = tl.arange(0, R)
    col_in = cols < n_cols
    b_where, b_in = cols[:, None] * rank + r[None, :], (cols[:, None] < n_cols) & (r[None, :] < rank)
    # Outside the matrix every loaded value is 0, so every value computed there is 0 and adds nothing below.
    b_g = tl.load(b_gate + b_where, mask=b_in, other=0.0)
    b_u = tl.load(b_up + b_where, mask=b_in, other=0.0)
    a_d = tl.load(a_down_t + b_where, mask=b_in, other=0.0)  # without DOWN, a copy of b_g that goes unused
    sum_g = tl.zeros((BN, R), dtype=tl.float32)
    sum_u = tl.zeros((BN, R), dtype=tl.float32)
    sum_d = tl.zeros((BN, R), dtype=tl.float32)
    for tile in range(group, tl.cdiv(n_rows, BM), groups):
        rows = tile * BM + tl.arange(0, BM)
        row_in = rows < n_rows
        inside = row_in[:, None] & col_in[None, :]
        p_in = row_in[:, None] & (r[None, :] < rank)
        where = rows[:, None] * n_cols + cols[None, :]
        p_g = tl.load(p_gate + rows[:, None] * p_stride + r[None, :], mask=p_in, other=0.0)
        p_u = tl.load(p_up + rows[:, None] * p_stride + r[None, :], mask=p_in, other=0.0)
        gate = tl.load(gate_out + where, mask=inside, other=0.0).to(tl.float32) + s_gate * dot(p_g, tl.trans(b_g),
                                                                                            IEEE)
        up = tl.load(up_out + where, mask=inside, other=0.0).to(tl.float32) + s_up * dot(p_u, tl.trans(b_u), IEEE)
        g = tl.load(grad + where, mask=inside, other=0.0).to(tl.float32)
        if DOWN:
            grad_p_d = tl.load(grad_p_down + rows[:, None] * grad_p_stride + r[None, :], mask=p_in, other=0.0)
            g += s_down * dot(grad_p_d, tl.trans(a_d), IEEE)
        sigmoid = tl.sigmoid(gate)
        d_gate = (g * up * sigmoid * (1 + gate * (1 - sigmoid))).to(gate_out.dtype.element_ty)
        d_up = (g * gate * sigmoid).to(up_out.dtype.element_ty)
        tl.store(gate_out + where, d_gate, mask=inside)
        tl.store(up_out + where, d_up, mask=inside)
        part = (block * n_rows + rows[:, None]) * R + r[None, :]
        stride = blocks * n_rows * R
        tl.store(by_rows + part, dot(d_gate, b_g, IEEE), mask=row_in[:, None])
        tl.store(by_rows + stride + part, dot(d_up, b_u, IEEE), mask=row_in[:, None])
        sum_g += dot(tl.trans(d_gate), p_g, IEEE)
        sum_u += dot(tl.trans(d_up), p_u, IEEE)
        if DOWN:
            hidden = (gate * sigmoid * up).to(gate_out.dtype.element_ty)
            tl.store(by_rows + 2 * stride + part, dot(hidden, a_d, IEEE), mask=row_in[:, None])
            sum_d += dot(tl.trans(hidden), grad_p_d, IEEE)
    part = (group * n_cols + cols[:, None]) * R + r[None, :]
    stride = groups * n_cols * R
    tl.store(by_cols + part, sum_g, mask=col_in[:, None])
    tl.store(by_cols + stride + part, sum_u, mask=col_in[:, None])
    if DOWN:
        tl.store(by_cols + 2 * stride + part, sum_d, mask=col_in[:, None])
