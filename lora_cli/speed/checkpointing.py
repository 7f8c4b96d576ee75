"""Offloaded checkpointing: a checkpointed decoder layer keeps its input in host memory, copied on a side stream.

Why our own: with activation checkpointing a decoder layer keeps only its input for the backward recomputation;
transformers can keep it in host memory (`offload`), but copies on the compute stream, which cost 16% of a QLoRA
step. `OffloadedCheckpoint` copies on a side stream while the layer computes and brings the input of the next
layer to recompute back while the current one runs its backward. The rerun skips what no backward reads (lean
recomputation, recomputation.py), replays CUDA graphs (cuda_graphs.py) and keeps the attention's saved tensors
instead of recomputing them (offloaded_attention.py) where those levers are on.

Off with `speed.offload_activations: false`; tests/speed/test_checkpointing.py checks losses and gradients
against transformers' checkpointing.
"""

import torch
import torch.utils.checkpoint

from lora_cli.speed.cuda_graphs import GraphPool, LayerGraphs, call_signature
from lora_cli.speed.offloaded_attention import host_bytes, install_saver
from lora_cli.speed.recomputation import Recomputation, lean_recompute_supported, mark_unread_in_recompute


class HostOffloader:
    """Pinned host copies of checkpointed layer inputs, moved on a side stream so the compute stream never waits
    for the host link.

    Forward: each layer input is copied out while the layer computes; at the next layer the compute stream waits
    for that copy and the input is let go. Backward (last layer first): the input of the layer that recomputes
    next is brought back while the current one runs. Tensors already on the host (a CPU run, as in the tests) are
    kept as they are, and so are the inputs of the layers from host_layers on (speed/policy.py keeps them on the
    GPU where host memory has no room for them: the first layers' go to the host, whose backward comes last).

    Host buffers of the exact size, one per layer, reused every step (offloaded_attention.host_bytes): torch's
    caching host allocator rounds every pinned block up to a power of two, which at 500,000 tokens of the
    Llama-3.1-8B shape (3.8 GiB a layer input) would pin 8 GiB a layer.

    Why the waits instead of `record_stream`: the allocator reuses a block recorded on another stream only once
    the GPU has passed the moment the host freed it. With CUDA graphs the host runs the forward pass many layers
    ahead of the GPU, so the layer inputs stayed allocated until the GPU caught up: 29 of them (0.91 GiB) at once
    for the Llama-3.1-8B QLoRA step (`BENCH_MEMORY=1 python benchmarks/speed.py --modes qlora`). With the compute
    stream waiting for each copy, every block is freed and reused in the compute stream's own order.
    """

    def __init__(self, host_layers: int | None = None):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.host_layers = host_layers  # None: every layer's input goes to the host
        self.buffers: dict[int, torch.Tensor] = {}  # layer -> its pinned host buffer
        self.kept: dict[int, torch.Tensor] = {}  # inputs kept where they are
        self.on_host: dict[int, torch.Tensor] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.copying: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # inputs held until their copy is done
        self.attached: dict = {}  # key -> the layer's saved attention (offloaded_attention.SavedForward)
        self.next_key = 0
        self.layers = 0  # checkpointed layers a forward pass saves, in order (set by offloaded_checkpointing)

    def save(self, tensor: torch.Tensor) -> int:
        key, self.next_key = self.next_key, self.next_key + 1
        layer = key % self.layers if self.layers else key
        if tensor.device.type != "cuda" or (self.host_layers is not None and layer >= self.host_layers):
            self.kept[key] = tensor
            return key
        self._release_copied()
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written
        host = self._host_buffer(layer, tensor)
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.copying.append((tensor, copied))
        self.on_host[key] = host
        return key

    def load(self, key: int, device) -> torch.Tensor:
        if key in self.kept:
            if device.type == "cuda" and key - 1 in self.on_host:
                self._prefetch(key - 1, device)
            return self.kept.pop(key)
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

    def _host_buffer(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """The layer's pinned buffer, grown (never shrunk) to the tensor's size, viewed as the tensor."""
        count = tensor.numel() * tensor.element_size()
        buffer = self.buffers.get(layer)
        if buffer is None or buffer.numel() < count:
            if buffer is not None:  # copies from the old buffer may still run
                torch.cuda.current_stream().synchronize()
                self.stream.synchronize()
            buffer = self.buffers[layer] = host_bytes(count, pinned=True)
        return buffer[:count].view(tensor.dtype).view(tensor.shape)

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


class OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of one decoder layer, its input kept on the host (as torch.utils.checkpoint with
    use_reentrant=True, which restores the RNG and autocast state the same way). transformers passes the hidden
    states as the only positional tensor; the other inputs (masks, rotary tables) need no gradient."""

    @staticmethod
    def forward(ctx, run, offloader, graphs, saver, hidden_states, *args):
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
                            offload_attention: bool = False, host_layers: int | None = None):
    """Make every checkpointed decoder layer keep its input on the host (only the first host_layers layers', when
    given: the others keep theirs on the GPU), with cuda_graphs (on a GPU) run as CUDA graphs (cuda_graphs.py),
    with lean_recompute rerun without its last projection where the architecture allows (LLAMA_STYLE_MODEL_TYPES),
    with offload_attention its attention kept on the host too where it can be (offloaded_attention.py); returns
    how many layers, and the graphs' shared pool (None without graphs).

    transformers' layers call `self._gradient_checkpointing_func(layer_call, hidden_states, ...)` when
    checkpointing is on, so setting that function on them is the whole switch (after the Trainer has turned
    checkpointing on: the caller does this when training begins).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    offloader = HostOffloader(host_layers)
    pool = GraphPool() if cuda_graphs and torch.cuda.is_available() else None
    accumulate_stream = torch.cuda.Stream() if pool else None  # offloaded_attention.install_saver says why

    def checkpoint_with(graphs, saver):
        def checkpoint(run, hidden_states, *args, **kwargs):
            return OffloadedCheckpoint.apply(run, offloader, graphs, saver, hidden_states, *args)
        return checkpoint

    lean = lean_recompute and lean_recompute_supported(model)
    installed = {}
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            saver = install_saver(module, offloader.stream, offload_attention, accumulate_stream)
            module._gradient_checkpointing_func = checkpoint_with(LayerGraphs(module, pool, saver) if pool else None,
                                                                  saver)
            installed[module] = module._gradient_checkpointing_func
            mark_unread_in_recompute(module, lean)
    offloader.layers = len(installed)
    keep_through_reenabling(model, installed)
    return len(installed), pool


def keep_through_reenabling(model, installed: dict) -> None:
    """TRL's DPO, KTO and GRPO trainers turn checkpointing off around every reference or generation pass and on
    again (trl.models.utils.disable_gradient_checkpointing), and turning it on sets transformers' checkpoint function
    on every layer: from the second step on, the layers would checkpoint without this module. So the model's
    switch gives each layer its installed function back whenever it turns checkpointing on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._offloaded_checkpoint_functions = installed  # the newest installation (a later call replaces it)
    if getattr(base, "_set_gradient_checkpointing_unkept", None) is not None:
        return
    base._set_gradient_checkpointing_unkept = base._set_gradient_checkpointing

    def set_gradient_checkpointing(enable=True, gradient_checkpointing_func=torch.utils.checkpoint.checkpoint,
                                   every_n_layers=1):
        base._set_gradient_checkpointing_unkept(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func,
                                                every_n_layers=every_n_layers)
        if enable:
            for module, function in base._offloaded_checkpoint_functions.items():
                module._gradient_checkpointing_func = function

    base._set_gradient_checkpointing = set_gradient_checkpointing
