"""Our own code for three hot spots of a LoRA step on a GPU, where the libraries' generic code costs time.

1. Fused LoRA linear layers. For every adapted layer PEFT runs the base layer, clones its output (4-bit), casts
   the input to the adapter's dtype, applies dropout, two small matmuls, a scale and an add: each a kernel of its
   own over the full activation, plus bitsandbytes' and PEFT's Python per call. Profiled on an H100 (Llama-3.1-8B
   shape, `BENCH_PROFILE=1 python benchmarks/speed.py`), those elementwise kernels took about 30% of the GPU time
   of a step, and the GPU idled while Python launched them. `LoraLinear` below computes
   out = x W^T + s (drop(x) A^T) B^T with the adapter added in place into the base output, and its backward
   computes the three gradients with matmuls only, dequantizing 4-bit weights to bitsandbytes' exact values (in
   one Triton kernel on GPUs, `dequantize_nf4`). (Writing the adapter's product first and letting the base
   matmul accumulate onto it was measured 23% slower on an H100: cuBLAS picks slower kernels for a large matmul
   that adds into its output.)
   PEFT's modules, state dict and saving are untouched: only their forward is replaced while training.

2. Offloaded checkpointing. With activation checkpointing a decoder layer keeps only its input for the backward
   recomputation; transformers can keep it in host memory (`offload`), but copies on the compute stream, which
   cost 16% of a QLoRA step. `OffloadedCheckpoint` copies on a side stream while the layer computes and brings
   the input of the next layer to recompute back while the current one runs its backward. The rerun skips what
   no backward reads (lean recomputation, below).

3. Variable-length attention for packed rows, and packed batches of fixed shapes for CUDA graphs (section 3).

Each has a recipe key to turn it off (speed.fused_lora, speed.offload_activations, speed.lean_recompute,
speed.varlen_attention), and tests/test_kernels.py and tests/test_packing.py check losses and gradients against
the libraries' path.
"""

import functools
import inspect
import types

import torch


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


# NF4 dequantization in one kernel. bitsandbytes takes three launches for a double-quantized weight (its block
# scales, their offset, the weight), each behind Python and ctypes: on an H100 the host needed 50-110 us between
# them, so the GPU idled through the attention projections of every QLoRA layer (BENCH_PROFILE=cuda). A QLoRA step
# dequantizes each weight three times (forward, recomputation, backward): 672 times for the Llama-3.1-8B shape.
# Same arithmetic as bitsandbytes (float32 products, rounded once to the output dtype); tests/test_kernels.py
# checks the result is identical.
@functools.cache
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@functools.cache
def _nf4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_nf4_kernel(packed, scales, scales2, code2, offset, lut, out, n_bytes, n_values, n_blocks,
                              BLOCKS: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr):
        # A program takes whole quantization blocks, a block a row: each block's scale is decoded once, not once a
        # byte (three loads a byte with double quantization). On an H200 a 14,336 x 4,096 weight took 50 us that
        # way and takes 40 us now (3.7 TB/s; benchmarks/results/2026-12-04-h200-nf4-before-after.txt). A table of
        # value pairs, one load a byte instead of two, was slower (2026-12-04-h200-nf4-pair-table.txt).
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


class HostOffloader:
    """Pinned host copies of checkpointed layer inputs, moved on a side stream so the compute stream never waits
    for the host link.

    Forward: each layer input is copied out while the layer computes; at the next layer the compute stream waits
    for that copy and the input is let go. Backward (last layer first): the input of the layer that recomputes
    next is brought back while the current one runs. Tensors already on the host (a CPU run, as in the tests) are
    kept as they are.

    Why the waits instead of `record_stream`: the allocator reuses a block recorded on another stream only once
    the GPU has passed the moment the host freed it. With CUDA graphs the host runs the forward pass many layers
    ahead of the GPU, so the layer inputs stayed allocated until the GPU caught up: 29 of them (0.91 GiB) at once
    for the Llama-3.1-8B QLoRA step (`BENCH_MEMORY=1 python benchmarks/speed.py --modes qlora`). With the compute
    stream waiting for each copy, every block is freed and reused in the compute stream's own order.
    """

    def __init__(self):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.on_host: dict[int, torch.Tensor] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.copying: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # inputs held until their copy is done
        self.attached: dict = {}  # key -> the layer's saved attention (offloaded_attention.SavedForward)
        self.next_key = 0
        self.layers = 0  # checkpointed layers a forward pass saves, in order (set by offloaded_checkpointing)

    def save(self, tensor: torch.Tensor) -> int:
        key, self.next_key = self.next_key, self.next_key + 1
        if tensor.device.type != "cuda":
            self.on_host[key] = tensor
            return key
        self._release_copied()
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.copying.append((tensor, copied))
        self.on_host[key] = host
        return key

    def load(self, key: int, device) -> torch.Tensor:
        if device.type != "cuda":
            return self.on_host.pop(key)
        self._release_copied()
        compute = torch.cuda.current_stream()
        if key in self.prefetched:
            tensor, ready = self.prefetched.pop(key)
            compute.wait_event(ready)
        else:
            compute.wait_stream(self.stream)  # the copy to the host has finished
            tensor = self.on_host[key].to(device, non_blocking=True)
        del self.on_host[key]
        if key - 1 in self.on_host:  # the layer before this one recomputes next
            self._prefetch(key - 1, device)
        return tensor

    def attach(self, key: int, saved) -> None:
        """Bring saved's output back with the input of the layer under key (offloaded_attention.py)."""
        if saved is not None:
            self.attached[key] = saved

    def layer_done(self, key: int, device) -> None:
        """After a layer's forward. The last layer of a pass recomputes first, right after the loss: its input and
        attention output start back now, while the LM head computes, instead of when its backward asks for them
        (1.3 ms a step with the GPU idle, for the Llama-3.1-8B QLoRA step on an H100: BENCH_PROFILE=cuda
        BENCH_TRACE_DIR=... python benchmarks/speed.py --modes qlora)."""
        if device.type == "cuda" and self.layers and (key + 1) % self.layers == 0 and key in self.on_host:
            self._prefetch(key, device)

    def take_attached(self, key: int):
        return self.attached.pop(key, None)

    def _release_copied(self) -> None:
        compute = torch.cuda.current_stream()
        for _, copied in self.copying:
            compute.wait_event(copied)
        self.copying.clear()

    def _prefetch(self, key: int, device) -> None:
        host = self.on_host[key]
        # Allocated on the compute stream, where it is used and freed; the side stream only writes it.
        tensor = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream())  # the block's earlier use is over
        with torch.cuda.stream(self.stream):
            tensor.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.prefetched[key] = (tensor, ready)
        if key in self.attached:
            self.attached[key].fetch_output(device)


class Recomputation:
    """Whether OffloadedCheckpoint is rerunning a layer for its backward (set and read in the autograd thread)."""

    active = False


# Lean recomputation. A checkpointed layer is rerun only for the tensors its backward saves, and in a Llama-style
# decoder layer (`hidden = residual + mlp.down_proj(...)`) nothing saved depends on down_proj's output: its own
# backward needs only its input, and the residual add needs no values. So the rerun skips that projection's
# dequantization and matmul: 27% of a layer's weights and matmul work for the Llama-3.1-8B shape. Only
# architectures whose layers end that way (with a norm after the MLP, as in Gemma 2 and OLMo 2, the output is
# read), and only where down_proj is a fused LoRA layer.
# Decoder layers `h = x + attn(norm(x)); out = h + mlp.down_proj(silu(gate_proj(n)) * up_proj(n)), n = norm(h)`:
# the shape lean recomputation and fused_mlp.py rely on.
LLAMA_STYLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def lean_recompute_supported(model) -> bool:
    return model.config.model_type in LLAMA_STYLE_MODEL_TYPES


def output_is_read(layer) -> bool:
    """Whether anything reads the layer's output in this call: not in a lean rerun of a layer marked unread."""
    return not (Recomputation.active and getattr(layer, "unread_in_recompute", False))


def mark_unread_in_recompute(layer, lean: bool) -> None:
    projection = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if hasattr(projection, "fused_adapters"):
        projection.unread_in_recompute = lean


class OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of one decoder layer, its input kept on the host (as torch.utils.checkpoint with
    use_reentrant=True, which restores the RNG and autocast state the same way). transformers passes the hidden
    states as the only positional tensor; the other inputs (masks, rotary tables) need no gradient."""

    @staticmethod
    def forward(ctx, run, offloader, graphs, saver, hidden_states, *args):
        from lora_cli.graphs import call_signature

        ctx.run, ctx.offloader, ctx.graphs, ctx.args, ctx.device = run, offloader, graphs, args, hidden_states.device
        ctx.saver = saver
        ctx.input_requires_grad = hidden_states.requires_grad
        kind = hidden_states.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(ctx.device) if kind == "cuda" else None)
        ctx.key = offloader.save(hidden_states)
        if saver is not None and not args:
            saver.begin(call_signature(run, hidden_states))  # None (nothing saved) for a call graphs cannot take
        try:
            with torch.no_grad():
                if graphs is not None and not args and (out := graphs.forward(run, hidden_states)) is not None:
                    return out
                return run(hidden_states, *args)
        finally:
            if saver is not None:
                offloader.attach(ctx.key, saver.finish())
            offloader.layer_done(ctx.key, ctx.device)

    @staticmethod
    def backward(ctx, *grads):
        # In a list the graphs empty once they have copied it: the input is not held through the replay.
        loaded = [ctx.offloader.load(ctx.key, ctx.device)]
        saved = ctx.offloader.take_attached(ctx.key)  # the layer's attention, kept instead of recomputed
        enabled, dtype = ctx.autocast
        cuda = ctx.device.type == "cuda"
        with torch.random.fork_rng(devices=[ctx.device] if cuda else []), torch.enable_grad(), \
                torch.autocast(ctx.device.type, dtype, enabled):
            torch.set_rng_state(ctx.rng[0])
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            Recomputation.active = True
            try:
                graphed = (ctx.graphs is not None and not ctx.args and grads[0] is not None
                           and (grad_input := ctx.graphs.backward(ctx.run, loaded, grads[0], saved)) is not None)
                if not graphed:
                    hidden_states = loaded[0].detach().requires_grad_(ctx.input_requires_grad)
                    if saved is not None and saved.graph is not None:
                        saved.output = saved.take_output(ctx.device)
                        ctx.saver.replaying = saved
                    outputs = ctx.run(hidden_states, *ctx.args)
            finally:
                Recomputation.active = False
                if saved is not None:
                    ctx.saver.replaying, saved.fetched = None, None
        if graphed:
            return (None, None, None, None, grad_input if ctx.input_requires_grad else None)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, None, None, hidden_states.grad, *(None for _ in ctx.args))


def offloaded_checkpointing(model, cuda_graphs: bool = False, lean_recompute: bool = False,
                            offload_attention: bool = False):
    """Make every checkpointed decoder layer keep its input on the host, with cuda_graphs (on a GPU) run as CUDA
    graphs (graphs.py), with lean_recompute rerun without its last projection where the architecture allows
    (LLAMA_STYLE_MODEL_TYPES), with offload_attention its attention kept on the host too where it can be
    (offloaded_attention.py); returns how many layers, and the graphs' shared pool (None without graphs).

    transformers' layers call `self._gradient_checkpointing_func(layer_call, hidden_states, ...)` when
    checkpointing is on, so setting that function on them is the whole switch (after the Trainer has turned
    checkpointing on: the caller does this when training begins).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lora_cli.graphs import GraphPool, LayerGraphs
    from lora_cli.offloaded_attention import install_saver

    offloader = HostOffloader()
    pool = GraphPool() if cuda_graphs and torch.cuda.is_available() else None
    accumulate_stream = torch.cuda.Stream() if pool else None  # offloaded_attention.install_saver says why

    def checkpoint_with(graphs, saver):
        def checkpoint(run, hidden_states, *args, **kwargs):
            return OffloadedCheckpoint.apply(run, offloader, graphs, saver, hidden_states, *args)
        return checkpoint

    lean = lean_recompute and lean_recompute_supported(model)
    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            saver = install_saver(module, offloader.stream, offload_attention, accumulate_stream)
            module._gradient_checkpointing_func = checkpoint_with(LayerGraphs(module, pool, saver) if pool else None,
                                                                  saver)
            mark_unread_in_recompute(module, lean)
            count += 1
    offloader.layers = count
    return count, pool


# 3. Variable-length attention for packed rows. With padding-free packing (training.packing) transformers gives
# SDPA a block-diagonal mask, and SDPA then runs a masked kernel over whole rows: packed QLoRA ran at 45% of the
# fixed-length rate on an H100. torch's varlen flash attention takes the sequence bounds instead and computes
# only the blocks inside each sequence. transformers' own varlen path needs the flash-attn package, which is
# not installable everywhere; this one needs only torch.
VARLEN_ATTENTION = "lora_varlen"


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """A transformers attention function: varlen flash attention for packed rows (the sequence bounds TRL's
    padding-free collator computes on the host, which reach every layer as keyword arguments), SDPA for anything
    else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or not query.is_cuda or dropout > 0 or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    out = _varlen_call(*flat, cu_seq_lens_q, max_length_q, scaling)
    return out.view(batch, length, heads, dim), None


class FixedShapePackedBatches:
    """TRL's padding-free collator, with every batch of one shape, so CUDA graphs (graphs.py) replay packed rows.

    TRL flattens a batch of packed rows into one row of however many tokens they hold, and gives the varlen
    kernel the sequence starts and the longest sequence: all change from batch to batch. Here the row is padded to
    `tokens` (batch size x max_length) with filler sequences (labels -100, none longer than `longest`), the starts
    are padded with empty sequences to a count that is a power of two (a few shapes in all), and the longest is
    always `longest`, a bound no sequence exceeds.
    """

    def __init__(self, collator, tokens: int, longest: int):
        self.collator, self.tokens, self.longest = collator, tokens, longest

    def __call__(self, examples):
        batch = self.collator(examples)
        length = batch["input_ids"].shape[1]
        if "cu_seq_lens_q" not in batch or length > self.tokens:
            return batch
        fill = self.tokens - length
        fillers = [min(self.longest, fill - at) for at in range(0, fill, self.longest)]
        starts = batch["cu_seq_lens_q"][:-1].tolist() + [length + sum(fillers[:i]) for i in range(len(fillers))]
        if fill:
            batch["input_ids"] = torch.cat([batch["input_ids"],
                                            batch["input_ids"].new_full((1, fill), self.collator.pad_token_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, fill), -100)], 1)
            batch["position_ids"] = torch.cat([batch["position_ids"], *(torch.arange(n)[None] for n in fillers)], 1)
        count = max(16, 1 << (len(starts) - 1).bit_length())
        cu = torch.tensor(starts + [self.tokens] * (count + 1 - len(starts)), dtype=torch.int32)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = self.longest
        if "seq_idx" in batch:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(count, dtype=torch.int32), cu.diff())[None]
        return batch


@functools.cache
def _varlen_options() -> frozenset:
    """The keyword options of this torch's varlen_attn (2.11 has scale and window_size, 2.13 also enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_call(query, key, value, cu, longest, scaling):
    """torch.nn.attention.varlen.varlen_attn, causal, across the torch versions that spell its options apart."""
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options()
    kwargs = {"scale": scaling} if "scale" in options else {}
    kwargs.update({"is_causal": True} if "is_causal" in options else {"window_size": (-1, 0)})
    # Grouped-query attention: the flash kernel takes fewer key/value heads as they are (torch 2.11 without a flag,
    # later releases with enable_gqa). Repeating them instead made attention 1.5x slower on an H100 (forward and
    # backward of the Llama-3.1-8B shape, 4,096 packed tokens: 1.50 ms against 1.03 ms, benchmarks/probe.py).
    if key.shape[1] != query.shape[1] and "enable_gqa" in options:
        kwargs["enable_gqa"] = True
    return varlen_attn(query, key, value, cu, cu, longest, longest, **kwargs)


def varlen_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def use_varlen_attention(model) -> bool:
    """Route the model's SDPA attention through varlen_attention (registered once with transformers); the mask
    stays SDPA's, so rows that are not packed run exactly as before."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    configs = [module.config for module in model.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation")]
    if not configs or any(config._attn_implementation != "sdpa" for config in configs):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    for config in configs:
        config._attn_implementation = VARLEN_ATTENTION
    return True
