"""A Llama-style MLP's gate and up projections, their adapters and SwiGLU in one autograd function.

Why: with kernels.LoraLinear, each adapted projection adds its adapter's product into its full-size output
(`out.addmm_`, a read and a write of N x intermediate values), and SwiGLU then reads both outputs again. For the
Llama-3.1-8B QLoRA step on an H100 those adapter adds were 21 ms of the step's 388 ms of GPU time
(`BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora`, the `*_badd_*` kernels), the gate and up ones
two thirds of that. Here the adapter products (rank r) are added inside the SwiGLU kernel, where the projections
are read anyway: h = silu(x Wg^T + sg (dg(x) Ag^T) Bg^T) * (x Wu^T + su (du(x) Au^T) Bu^T). The backward kernel
rebuilds both pre-activations the same way and writes their gradients over the saved projections, as Liger's
SwiGLU does; the sum is computed in float32 and rounded once (PEFT and Liger round each term).

Used while training, for the architectures whose MLP is `down_proj(silu(gate_proj(x)) * up_proj(x))` without
biases, when gate_proj and up_proj are fused LoRA layers (kernels.fuse_lora_layers) of the same adapter.
On a CPU, or without Triton, the same arithmetic runs as torch operations. Off with `speed.fused_mlp: false`;
tests/test_kernels.py checks loss and gradients against the unfused layers.
"""

import functools
import types

import torch

from lora_cli.kernels import (LLAMA_STYLE_MODEL_TYPES, active_fused_adapter, add_adapter_input_grad, base_weight,
                              compute_dtype, dropped_input, scaled_as, triton_available)


class LoraGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, up, a_gate, b_gate, a_up, b_up, scales, dropouts):
        dtype = compute_dtype(x)
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(dtype)
        adapters = [t.to(dtype) for t in (a_gate, b_gate, a_up, b_up)]
        with torch.autocast(rows.device.type, enabled=False):
            gate_out = torch.nn.functional.linear(rows, base_weight(gate, dtype))
            up_out = torch.nn.functional.linear(rows, base_weight(up, dtype))
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
            hidden = gated(gate_out, up_out, p_gate, adapters[1], p_up, adapters[3], scales)
        ctx.bases, ctx.scales, ctx.dropouts, ctx.input_dtype = (gate, up), scales, dropouts, x.dtype
        ctx.adapter_dtypes = [t.dtype for t in (a_gate, b_gate, a_up, b_up)]
        ctx.save_for_backward(rows, *masks_or_empty(masks), p_gate, p_up, *adapters, gate_out, up_out)
        return hidden.view(*shape[:-1], hidden.shape[-1])

    @staticmethod
    def backward(ctx, grad_hidden):
        rows, mask_gate, mask_up, p_gate, p_up, a_gate, b_gate, a_up, b_up, gate_out, up_out = ctx.saved_tensors
        masks = [None if m.numel() == 0 else m for m in (mask_gate, mask_up)]
        dtype = rows.dtype
        grad = grad_hidden.reshape(-1, grad_hidden.shape[-1]).to(dtype)
        s_gate, s_up = ctx.scales
        with torch.autocast(rows.device.type, enabled=False):
            grad_gate, grad_up = gated_backward(grad, gate_out, up_out, p_gate, b_gate, p_up, b_up, ctx.scales)
            grad_p_gate, grad_p_up = grad_gate @ b_gate, grad_up @ b_up  # gradients at x A^T, unscaled
            grads = [None] * 4
            grads[1] = scaled_as(grad_gate.t() @ p_gate, s_gate, ctx.adapter_dtypes[1])
            grads[3] = scaled_as(grad_up.t() @ p_up, s_up, ctx.adapter_dtypes[3])
            dropped = [dropped_input(rows, mask, p) for mask, p in zip(masks, ctx.dropouts)]
            grads[0] = scaled_as(grad_p_gate.t() @ dropped[0], s_gate, ctx.adapter_dtypes[0])
            grads[2] = scaled_as(grad_p_up.t() @ dropped[1], s_up, ctx.adapter_dtypes[2])
            grad_x = None
            if ctx.needs_input_grad[0]:
                gate, up = ctx.bases
                grad_x = grad_gate @ base_weight(gate, dtype)
                grad_x += grad_up @ base_weight(up, dtype)  # apart: cuBLAS runs an accumulating matmul slower
                for grad_p, a, mask, scale, p in zip((grad_p_gate, grad_p_up), (a_gate, a_up), masks,
                                                     ctx.scales, ctx.dropouts):
                    add_adapter_input_grad(grad_x, grad_p, a, mask, scale, p)
                grad_x = grad_x.view(*grad_hidden.shape[:-1], grad_x.shape[-1]).to(ctx.input_dtype)
        return grad_x, None, None, *grads, None, None


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


def gated_backward(grad, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales):
    """The gradients at both pre-activations, written over gate_out and up_out (they are not needed again)."""
    if grad.is_cuda and triton_available():
        launch_gated_kernel(_kernels()[1], BACKWARD_TILE, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales,
                            grad.contiguous())
        return gate_out, up_out
    gate, up = pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales)
    sigmoid = torch.sigmoid(gate)
    grad = grad.float()
    gate_out.copy_(grad * up * sigmoid * (1 + gate * (1 - sigmoid)))
    up_out.copy_(grad * gate * sigmoid)
    return gate_out, up_out


def pre_activations(gate_out, up_out, p_gate, b_gate, p_up, b_up, scales):
    gate = torch.addmm(gate_out.float(), p_gate.float(), b_gate.float().t(), alpha=scales[0])
    up = torch.addmm(up_out.float(), p_up.float(), b_up.float().t(), alpha=scales[1])
    return gate, up


# Rows, columns and warps of a program, the fastest of `python benchmarks/kernel_tiles.py` on an H100 (Llama-3.1-8B
# MLP, 4,096 tokens): forward 0.139 ms against 0.162 with 64 x 128 and 4 warps, backward 0.238 against 0.258.
FORWARD_TILE, BACKWARD_TILE = (32, 64, 8), (32, 128, 4)


@functools.cache
def _kernels():
    from lora_cli import gated_kernels  # imports triton, which a CPU install may lack

    return gated_kernels.forward_kernel, gated_kernels.backward_kernel


def launch_gated_kernel(kernel, tile, gate_out, up_out, p_gate, b_gate, p_up, b_up, scales, last):
    import triton

    n_rows, n_cols = gate_out.shape
    rank = b_gate.shape[1]
    if p_gate.stride(1) != 1 or p_up.stride() != p_gate.stride():
        p_gate, p_up = p_gate.contiguous(), p_up.contiguous()
    block_rows, block_cols, warps = tile
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    kernel[grid](gate_out, up_out, p_gate, b_gate.contiguous(), p_up, b_up.contiguous(), scales[0], scales[1], last,
                 n_rows, n_cols, rank, p_gate.stride(0), R=max(16, triton.next_power_of_2(rank)), BM=block_rows,
                 BN=block_cols, IEEE=gate_out.dtype == torch.float32,  # tl.dot needs K >= 16; IEEE: no TF32
                 num_warps=warps)


def fused_mlp_forward(self, x):
    """Replaces a gated MLP's forward while training; anything unusual goes to its own forward."""
    gate, up = self.gate_proj, self.up_proj
    adapter = active_fused_adapter(gate)
    if (adapter is None or adapter != active_fused_adapter(up)
            or gate.lora_A[adapter].weight.shape != up.lora_A[adapter].weight.shape):
        return self.unfused_forward(x)
    hidden = LoraGatedMLP.apply(
        x, gate.fused_base, up.fused_base, gate.lora_A[adapter].weight, gate.lora_B[adapter].weight,
        up.lora_A[adapter].weight, up.lora_B[adapter].weight, (gate.scaling[adapter], up.scaling[adapter]),
        (gate.fused_adapters[adapter], up.fused_adapters[adapter]))
    return self.down_proj(hidden)


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
