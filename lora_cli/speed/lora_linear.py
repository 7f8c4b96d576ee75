"""Fused LoRA linear layers: out = x W^T + s (drop(x) A^T) B^T as one autograd function.

Why our own: for every adapted layer PEFT runs the base layer, clones its output (4-bit), casts the input to the
adapter's dtype, applies dropout, two small matmuls, a scale and an add: each a kernel of its own over the full
activation, plus bitsandbytes' and PEFT's Python per call. Profiled on an H100 (Llama-3.1-8B shape,
`BENCH_PROFILE=1 python benchmarks/speed.py`), those elementwise kernels took about 30% of the GPU time of a step,
and the GPU idled while Python launched them. `LoraLinear` below adds the adapter in place into the base output,
and its backward computes the three gradients with matmuls only, dequantizing 4-bit weights to bitsandbytes' exact
values (in one Triton kernel on GPUs, kernels/nf4.py). (Writing the adapter's product first and letting the base
matmul accumulate onto it was measured 23% slower on an H100: cuBLAS picks slower kernels for a large matmul that
adds into its output.)
PEFT's modules, state dict and saving are untouched: only their forward is replaced while training.

Off with `speed.fused_lora: false`; tests/speed/test_lora_linear.py checks losses and gradients against PEFT's.
"""

import types

import torch

from lora_cli.speed.kernels import triton_available
from lora_cli.speed.kernels.nf4 import dequantize_nf4
from lora_cli.speed.recomputation import output_is_read


def base_weight(layer, dtype):
    """The base layer's weight in the compute dtype: dequantized for bitsandbytes 4-bit, as its own matmul does."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.to(dtype)
    packed = weight.data if weight.dtype == torch.uint8 else weight.data.view(torch.uint8)
    if packed.is_cuda and state.quant_type == "nf4" and triton_available():
        return dequantize_nf4(packed, state, dtype)
    absmax = state.absmax
    if state.nested:  # double quantization: the block scales are quantized themselves
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32)
        absmax += state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, absmax, state.blocksize, state.quant_type, state.shape, dtype)


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * (drop(x) A^T) B^T, saving x, the dropout mask, x A^T (r columns) and the adapter weights
    in the compute dtype for the backward.

    The kernel count matters as much as the matmuls: on an H100 the bf16 LoRA backward waited on Python launching
    small kernels (benchmarks/speed.py with BENCH_PROFILE=1). So the backward reuses the forward's casts of A and B,
    and each adapter gradient is scaled and cast to the weight's dtype in one kernel.
    """

    @staticmethod
    def forward(ctx, x, base, bias, lora_a, lora_b, scaling: float, dropout: float, output_read: bool = True):
        dtype = compute_dtype(x)
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        with torch.autocast(rows.device.type, enabled=False):
            dropped, mask = torch.native_dropout(rows, dropout, True) if dropout > 0 else (rows, None)
            projected = dropped @ a.t()
            if output_read:
                out = torch.nn.functional.linear(rows, base_weight(base, dtype), None if bias is None else bias.to(dtype))
                out.addmm_(projected, b.t(), alpha=scaling)
            else:  # lean recomputation (below): nothing reads this output, only what the backward saves
                out = rows.new_empty(rows.shape[0], base.out_features)
        ctx.base, ctx.scaling, ctx.dropout, ctx.input_dtype = base, scaling, dropout, x.dtype
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        ctx.save_for_backward(rows, mask, projected, a, b)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, mask, projected, a, b = ctx.saved_tensors
        dtype, scaling = rows.dtype, ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        with torch.autocast(rows.device.type, enabled=False):
            grad_b_side = grad @ b  # gradient at x A^T, r columns
            if ctx.needs_input_grad[4]:
                grad_b = scaled_as(grad.t() @ projected, scaling, ctx.adapter_dtypes[1])
            if ctx.needs_input_grad[3]:
                grad_a = scaled_as(grad_b_side.t() @ dropped_input(rows, mask, ctx.dropout), scaling,
                                   ctx.adapter_dtypes[0])
            if ctx.needs_input_grad[0]:
                grad_x = grad @ base_weight(ctx.base, dtype)
                add_adapter_input_grad(grad_x, grad_b_side, a, mask, scaling, ctx.dropout)
                grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.input_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def dropped_input(rows: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """The adapter's input as the forward's dropout left it (mask saved, not the dropped copy)."""
    return rows if mask is None else rows * mask * (1 / (1 - dropout))


def add_adapter_input_grad(grad_x, grad_projected, a, mask, scaling: float, dropout: float) -> None:
    """grad_x += s * drop'(grad at x A^T @ A): the adapter's part of the input gradient, in place."""
    if mask is None:
        grad_x.addmm_(grad_projected, a, alpha=scaling)
    else:
        grad_x.add_((grad_projected @ a).mul_(mask), alpha=scaling / (1 - dropout))


def scaled_as(product: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """product * scaling in dtype, in one kernel: the cast rides along with the multiplication."""
    if product.dtype == dtype:
        return product.mul_(scaling)
    return torch.mul(product, scaling, out=torch.empty_like(product, dtype=dtype))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's layer would compute in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def active_fused_adapter(layer) -> str | None:
    """The adapter a fused LoRA layer trains now, or None where PEFT's own forward must run."""
    adapters = layer.active_adapters
    if (not layer.training or len(adapters) != 1 or adapters[0] not in layer.fused_adapters
            or layer.disable_adapters or layer.merged):
        return None
    return adapters[0]


def fused_forward(self, x, *args, **kwargs):
    """Replaces a PEFT LoRA layer's forward while training; anything unusual goes to PEFT's own forward."""
    adapter = active_fused_adapter(self)
    if args or kwargs or adapter is None:
        return self.peft_forward(x, *args, **kwargs)
    base = self.fused_base
    return LoraLinear.apply(x, base, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                            self.scaling[adapter], self.fused_adapters[adapter], output_is_read(self))


def fusable(layer, base, adapter) -> bool:
    """Plain LoRA on a frozen linear or 4-bit base: no DoRA or other variant, no trained bias."""
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter, False):
        return False
    return not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))


def fusable_base(base) -> bool:
    """A plain linear layer or bitsandbytes' 4-bit one, quantized (8-bit and other kinds keep PEFT's forward)."""
    if type(base) is torch.nn.Linear:
        return True
    return type(base).__name__ == "Linear4bit" and getattr(base.weight, "quant_state", None) is not None


def fuse_lora_layers(model) -> int:
    """Route the model's LoRA linear layers through LoraLinear while training; returns how many.

    What can be fused is decided here, once (each check is Python the host would otherwise run on every call):
    the adapters per layer, with their dropout probability. Call it once the model is set for training.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and not hasattr(module, "peft_forward"):
            base = module.get_base_layer()
            if fusable_base(base):
                module.fused_base = base
                module.fused_adapters = {
                    adapter: dropout.p if isinstance(dropout := module.lora_dropout[adapter], torch.nn.Dropout) else 0.0
                    for adapter in module.lora_A if fusable(module, base, adapter)}
                module.peft_forward = module.forward
                module.forward = types.MethodType(fused_forward, module)
                count += 1
    return count
