"""A Llama-style MLP's projections, their adapters and SwiGLU in one autograd function.

Why: with lora_linear.LoraLinear, each adapted projection adds its adapter's product into its full-size output
(`out.addmm_`, a read and a write of N x intermediate values), and SwiGLU then reads both outputs again. For the
Llama-3.1-8B QLoRA step on an H100 those adapter adds were 21 ms of the step's 388 ms of GPU time
(`BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora`, the `*_badd_*` kernels), the gate and up ones
two thirds of that. Here the adapter products (rank r) are added inside the SwiGLU kernel, where the projections
are read anyway: h = silu(x Wg^T + sg (dg(x) Ag^T) Bg^T) * (x Wu^T + su (du(x) Au^T) Bu^T). The backward kernel
rebuilds both pre-activations the same way and writes their gradients over the saved projections, as Liger's
SwiGLU does; the sum is computed in float32 and rounded once (PEFT and Liger round each term). When down_proj's
adapter has no dropout, down_proj runs inside the same function (LoraSwiGLUMLP, which says why); otherwise
LoraGatedMLP stops at SwiGLU and down_proj stays a fused LoRA layer.

Used while training, for the architectures whose MLP is `down_proj(silu(gate_proj(x)) * up_proj(x))` without
biases, when gate_proj and up_proj are fused LoRA layers (lora_linear.fuse_lora_layers) of the same adapter.
On a CPU, or without Triton, the same arithmetic runs as torch operations. Off with `speed.fused_mlp: false`;
tests/speed/test_fused_mlp.py checks loss and gradients against the unfused layers.
"""

import functools
import types

import torch

from lora_cli.speed.kernels import triton_available
from lora_cli.speed.lora_linear import (active_fused_adapter, add_adapter_input_grad, base_weight, compute_dtype,
                                        dropped_input, scaled_as)
from lora_cli.speed.recomputation import LLAMA_STYLE_MODEL_TYPES, Recomputation, output_is_read


class LoraGatedMLP(torch.autograd.Function):
    """silu(gate(x)) * up(x) with both adapters; down_proj stays a layer of its own (an adapter with dropout)."""

    @staticmethod
    def forward(ctx, x, gate, up, a_gate, b_gate, a_up, b_up, scales, dropouts):
        rows, adapters = compute_inputs(x, (a_gate, b_gate, a_up, b_up))
        with torch.autocast(rows.device.type, enabled=False):
            gate_out, up_out, p_gate, p_up, masks, weights = gate_and_up(rows, gate, up, adapters, dropouts)
            hidden = gated(gate_out, up_out, p_gate, adapters[1], p_up, adapters[3], scales)
        keep_for_gate_and_up(ctx, x, (gate, up), scales, dropouts, (a_gate, b_gate, a_up, b_up), weights)
        ctx.save_for_backward(rows, *masks_or_empty(masks), p_gate, p_up, *adapters, gate_out, up_out)
        return hidden.view(*x.shape[:-1], hidden.shape[-1])

    @staticmethod
    def backward(ctx, grad_hidden):
        rows, mask_gate, mask_up, p_gate, p_up, *adapters, gate_out, up_out = ctx.saved_tensors
        grad = grad_hidden.reshape(-1, grad_hidden.shape[-1]).to(rows.dtype)
        with torch.autocast(rows.device.type, enabled=False):
            grad_gate, grad_up = gated_backward(grad, gate_out, up_out, p_gate, adapters[1], p_up, adapters[3],
                                                ctx.scales)
            grad_x, grads = gate_and_up_backward(ctx, rows, (mask_gate, mask_up), p_gate, p_up, adapters, grad_gate,
                                                 grad_up)
        return grad_x, None, None, *grads, None, None


class LoraSwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with all three adapters, for a down_proj adapter without dropout.

    Why down_proj inside: its backward needs the SwiGLU output h (I columns) only for its adapter's gradients, and
    the SwiGLU backward kernel can rebuild h from what it reads anyway. So h is not saved (nor made at all by a lean
    rerun, recomputation.py), and the kernel also adds down_proj's adapter term to the gradient at h, which
    LoraLinear adds in a pass of its own over that gradient. For the Llama-3.1-8B QLoRA step on an H100 the rerun's
    SwiGLU kernel and that add took 140 and 118 us a layer (`BENCH_PROFILE=cuda BENCH_TRACE_DIR=...
    python benchmarks/speed.py --modes qlora`), and h was 112 MiB of the step's peak memory.
    """

    @staticmethod
    def forward(ctx, x, gate, up, down, a_gate, b_gate, a_up, b_up, a_down, b_down, scales, dropouts,
                output_read: bool = True):
        rows, adapters = compute_inputs(x, (a_gate, b_gate, a_up, b_up, a_down, b_down))
        with torch.autocast(rows.device.type, enabled=False):
            gate_out, up_out, p_gate, p_up, masks, weights = gate_and_up(rows, gate, up, adapters[:4], dropouts)
            if output_read:
                hidden = gated(gate_out, up_out, p_gate, adapters[1], p_up, adapters[3], scales[:2])
                p_down = hidden @ adapters[4].t()
                out = torch.nn.functional.linear(hidden, base_weight(down, hidden.dtype))
                out.addmm_(p_down, adapters[5].t(), alpha=scales[2])
            else:  # lean recomputation: nothing reads the output, and the backward rebuilds h
                p_down = rows.new_empty(0)
                out = rows.new_empty(rows.shape[0], down.out_features)
        keep_for_gate_and_up(ctx, x, (gate, up), scales[:2], dropouts, (a_gate, b_gate, a_up, b_up), weights)
        ctx.down, ctx.s_down, ctx.down_dtypes = down, scales[2], (a_down.dtype, b_down.dtype)
        ctx.save_for_backward(rows, *masks_or_empty(masks), p_gate, p_up, *adapters, gate_out, up_out, p_down)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, mask_gate, mask_up, p_gate, p_up, *adapters, gate_out, up_out, p_down = ctx.saved_tensors
        a_down, b_down = adapters[4:]
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(rows.dtype)
        with torch.autocast(rows.device.type, enabled=False):
            grad_p_down = grad @ b_down  # gradient at h A_d^T, unscaled
            grad_at_hidden = grad @ base_weight(ctx.down, rows.dtype)  # the adapter's term is added in the kernel
            grad_gate, grad_up, hidden = gated_backward(
                grad_at_hidden, gate_out, up_out, p_gate, adapters[1], p_up, adapters[3], ctx.scales,
                down=(grad_p_down, a_down, ctx.s_down))
            if p_down.numel() == 0:
                p_down = hidden @ a_down.t()
            grad_b_down = scaled_as(grad.t() @ p_down, ctx.s_down, ctx.down_dtypes[1])
            grad_a_down = scaled_as(grad_p_down.t() @ hidden, ctx.s_down, ctx.down_dtypes[0])
            del hidden, grad_at_hidden
            grad_x, grads = gate_and_up_backward(ctx, rows, (mask_gate, mask_up), p_gate, p_up, adapters[:4],
                                                 grad_gate, grad_up)
        return grad_x, None, None, None, *grads, grad_a_down, grad_b_down, None, None, None


def compute_inputs(x, adapter_weights):
    """x as rows and the adapter weights, in the dtype PEFT's layers would compute in."""
    dtype = compute_dtype(x)
    return x.reshape(-1, x.shape[-1]).to(dtype), [t.to(dtype) for t in adapter_weights]


def gate_and_up(rows, gate, up, adapters, dropouts):
    """Both projections without their adapters, the adapters' rank-r products, the dropout masks, and the
    dequantized base weights when the backward is to reuse them (keeps_weights), else None."""
    outputs, weights = [], [] if keeps_weights((gate, up)) else None
    for base in (gate, up):
        weight = base_weight(base, rows.dtype)
        outputs.append(torch.nn.functional.linear(rows, weight))
        if weights is not None:
            weights.append(weight)
    gate_out, up_out = outputs
    # Dropout masks drawn in PEFT's order (gate's, then up's), so a recomputation draws the same ones.
    dropped, masks = [], []
    for p in dropouts:
        d, mask = torch.native_dropout(rows, p, True) if p > 0 else (rows, None)
        dropped.append(d)
        masks.append(mask)
    if masks == [None, None]:  # one read of x for both adapters
        p_gate, p_up = (rows @ torch.cat([adapters[0], adapters[2]]).t()).chunk(2, dim=1)
    else:
        p_gate, p_up = dropped[0] @ adapters[0].t(), dropped[1] @ adapters[2].t()
    return gate_out, up_out, p_gate, p_up, masks, weights


def keeps_weights(bases) -> bool:
    """Whether the backward reuses the dequantized 4-bit weights of gate and up: in a rerun, whose backward follows
    at once (2 x 112 MiB held through one layer's backward for the Llama-3.1-8B shape, instead of dequantizing them
    again: 0.12 ms a layer on an H100, BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora). A forward pass
    outside a rerun would hold them for every layer until the backward."""
    return Recomputation.active and any(getattr(base.weight, "quant_state", None) is not None for base in bases)


def keep_for_gate_and_up(ctx, x, bases, scales, dropouts, adapter_weights, weights) -> None:
    ctx.bases, ctx.scales, ctx.dropouts, ctx.input_dtype, ctx.input_shape = bases, scales, dropouts, x.dtype, x.shape
    ctx.adapter_dtypes = [t.dtype for t in adapter_weights]
    ctx.kept_weights = weights


def base_weights_again(ctx, dtype):
    """gate's, then up's base weight for the input's gradient: those the rerun kept, else dequantized again, one at
    a time (each is let go once used)."""
    kept, ctx.kept_weights = ctx.kept_weights, None
    for base in ctx.bases:
        yield kept.pop(0) if kept else base_weight(base, dtype)


def gate_and_up_backward(ctx, rows, saved_masks, p_gate, p_up, adapters, grad_gate, grad_up):
    """The input's gradient and the gate and up adapters' gradients, from the gradients at both pre-activations."""
    a_gate, b_gate, a_up, b_up = adapters
    masks = [None if m.numel() == 0 else m for m in saved_masks]
    s_gate, s_up = ctx.scales
    grad_p_gate, grad_p_up = grad_gate @ b_gate, grad_up @ b_up  # gradients at x A^T, unscaled
    grads = [None] * 4
    grads[1] = scaled_as(grad_gate.t() @ p_gate, s_gate, ctx.adapter_dtypes[1])
    grads[3] = scaled_as(grad_up.t() @ p_up, s_up, ctx.adapter_dtypes[3])
    dropped = [dropped_input(rows, mask, p) for mask, p in zip(masks, ctx.dropouts)]
    grads[0] = scaled_as(grad_p_gate.t() @ dropped[0], s_gate, ctx.adapter_dtypes[0])
    grads[2] = scaled_as(grad_p_up.t() @ dropped[1], s_up, ctx.adapter_dtypes[2])
    grad_x = None
    if ctx.needs_input_grad[0]:
        weights = base_weights_again(ctx, rows.dtype)
        grad_x = grad_gate @ next(weights)
        grad_x += grad_up @ next(weights)  # apart: cuBLAS runs an accumulating matmul slower
        for grad_p, a, mask, scale, p in zip((grad_p_gate, grad_p_up), (a_gate, a_up), masks, ctx.scales,
                                             ctx.dropouts):
            add_adapter_input_grad(grad_x, grad_p, a, mask, scale, p)
        grad_x = grad_x.view(*ctx.input_shape[:-1], grad_x.shape[-1]).to(ctx.input_dtype)
    return grad_x, grads


def masks_or_empty(masks):
    """save_for_backward takes tensors only: no mask is saved as an empty one."""
    return [torch.empty(0) if m is None else m for m in masks]


def gated(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales):
    """silu(gate_out + sg p_gate Bg^T) * (up_out + su p_up Bu^T), rounded once to the projections' dtype."""
    if gate_out.is_cuda and triton_available():
        hidden = torch.empty_like(gate_out)
        launch_gated_kernel(_kernels()[0], FORWARD_TILE, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales,
                            hidden)
        return hidden
    gate, up = pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales)
    return (torch.nn.functional.silu(gate) * up).to(gate_out.dtype)


def gated_backward(grad, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales, down=None):
    """The gradients at both pre-activations, written over gate_out and up_out (they are not needed again).

    down: (gradient at h A_d^T, A_d, s_d) of a down_proj adapter (LoraSwiGLUMLP): grad is then the gradient at h
    without that adapter's term, which is added here, and h is rebuilt over grad and returned third."""
    if grad.is_cuda and triton_available():
        grad = grad.contiguous()
        launch_gated_kernel(_kernels()[1], BACKWARD_TILE, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales, grad,
                            down)
        return (gate_out, up_out) if down is None else (gate_out, up_out, grad)
    gate, up = pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales)
    sigmoid = torch.sigmoid(gate)
    full_grad = grad.float()
    if down is not None:
        grad_p_down, a_down, s_down = down
        full_grad = torch.addmm(full_grad, grad_p_down.float(), a_down.float(), alpha=s_down)
    gate_out.copy_(full_grad * up * sigmoid * (1 + gate * (1 - sigmoid)))
    up_out.copy_(full_grad * gate * sigmoid)
    if down is None:
        return gate_out, up_out
    grad.copy_(torch.nn.functional.silu(gate) * up)  # as gated() computes h: the same values
    return gate_out, up_out, grad


def pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales):
    gate = torch.addmm(gate_out.float(), p_gate.float(), b_gate.float().t(), alpha=scales[0])
    up = torch.addmm(up_out.float(), p_up.float(), b_up.float().t(), alpha=scales[1])
    return gate, up


# Rows, columns and warps of a program, the fastest of `python benchmarks/kernel_tiles.py` on an H100 (Llama-3.1-8B
# MLP, 4,096 tokens): forward 0.139 ms against 0.162 with 64 x 128 and 4 warps, backward 0.238 against 0.258.
FORWARD_TILE, BACKWARD_TILE = (32, 64, 8), (32, 128, 4)


@functools.cache
def _kernels():
    from lora_cli.speed.kernels import gated  # imports triton, which a CPU install may lack

    return gated.forward_kernel, gated.backward_kernel


def launch_gated_kernel(kernel, tile, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales, last, down=None):
    import triton

    n_rows, n_cols = gate_out.shape
    rank = b_gate.shape[1]
    if p_gate.stride(1) != 1 or p_up.stride() != p_gate.stride():
        p_gate, p_up = p_gate.contiguous(), p_up.contiguous()
    if down is None:  # the kernel's down_proj arguments go unread
        p_down, a_down_t, s_down = p_gate, b_gate, 0.0
    else:
        p_down, a_down, s_down = down
        p_down, a_down_t = p_down.contiguous(), a_down.t().contiguous()  # A_d^T: laid out as B is (I x r)
    block_rows, block_cols, warps = tile
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    kernel[grid](gate_out, up_out, p_gate, b_gate.contiguous(), p_up, b_up.contiguous(), scales[0], scales[1], last,
                 p_down, a_down_t, s_down, n_rows, n_cols, rank, p_gate.stride(0), p_down.stride(0),
                 R=max(16, triton.next_power_of_2(rank)), BM=block_rows, BN=block_cols,
                 IEEE=gate_out.dtype == torch.float32,  # tl.dot needs K >= 16; IEEE: no TF32
                 DOWN=down is not None, num_warps=warps)


def fused_mlp_forward(self, x):
    """Replaces a gated MLP's forward while training; anything unusual goes to its own forward."""
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    adapter = active_fused_adapter(gate)
    if (adapter is None or adapter != active_fused_adapter(up)
            or gate.lora_A[adapter].weight.shape != up.lora_A[adapter].weight.shape):
        return self.unfused_forward(x)
    a_gate, b_gate = gate.lora_A[adapter].weight, gate.lora_B[adapter].weight
    a_up, b_up = up.lora_A[adapter].weight, up.lora_B[adapter].weight
    scales, dropouts = (gate.scaling[adapter], up.scaling[adapter]), (gate.fused_adapters[adapter],
                                                                     up.fused_adapters[adapter])
    if down_inside(self, adapter):
        return LoraSwiGLUMLP.apply(x, gate.fused_base, up.fused_base, down.fused_base, a_gate, b_gate, a_up, b_up,
                                   down.lora_A[adapter].weight, down.lora_B[adapter].weight,
                                   (*scales, down.scaling[adapter]), dropouts, output_is_read(down))
    hidden = LoraGatedMLP.apply(x, gate.fused_base, up.fused_base, a_gate, b_gate, a_up, b_up, scales, dropouts)
    return down(hidden)


def down_inside(mlp, adapter) -> bool:
    """Whether LoraSwiGLUMLP runs the MLP's down_proj too: a fused LoRA layer of the same adapter without dropout
    and without a base bias (the gated MLPs have none)."""
    down = mlp.down_proj
    return (hasattr(down, "fused_adapters") and active_fused_adapter(down) == adapter
            and down.fused_adapters[adapter] == 0 and down.fused_base.bias is None)


def gated_mlps(model) -> list:
    """The model's MLPs that LoraGatedMLP can run: Llama-style, gate and up projections fused LoRA layers."""
    text_config = model.config.get_text_config()
    if (model.config.model_type not in LLAMA_STYLE_MODEL_TYPES or getattr(text_config, "mlp_bias", False)
            or text_config.hidden_act not in ("silu", "swish")):
        return []
    return [module for module in model.modules()
            if hasattr(getattr(module, "gate_proj", None), "fused_adapters")
            and hasattr(getattr(module, "up_proj", None), "fused_adapters") and hasattr(module, "down_proj")]


def fuse_gated_mlps(model) -> int:
    """Route the model's gated MLPs through LoraGatedMLP while training (after kernels.fuse_lora_layers); returns
    how many. Call it again after anything that replaces their forward (the Trainer applies Liger's SwiGLU MLP
    when training begins)."""
    mlps = gated_mlps(model)
    for module in mlps:
        if getattr(module.forward, "__func__", None) is not fused_mlp_forward:
            module.unfused_forward = module.forward
            module.forward = types.MethodType(fused_mlp_forward, module)
    return len(mlps)
