"""Offloaded checkpointing: a checkpointed decoder layer keeps its input in host memory, copied on a side stream.

Why our own: with activation checkpointing a decoder layer keeps only its input for the backward recomputation;
transformers can keep it in host memory (`offload`), but copies on the compute stream, which cost 16% of a QLoRA
step. `OffloadedCheckpoint` copies on a side stream while the layer computes and brings the input of the next
layer to recompute back while the current one runs its backward. The rerun skips what no backward reads (lean
recomputation, recomputation.py), replays CUDA graphs (cuda_graphs.py) and keeps the attention's saved tensors
instead of recomputing them (offloaded_attention.py) where those levers are on. Where neither memory has room for
every layer input (half a million tokens), some are not kept at all: the backward makes them again from the layer
before's (HostOffloader says how). An MoE layer's router logits come out of the checkpoint with their gradient, for
the load-balancing loss (router_logits.py).

Off with `speed.offload_activations: false`; tests/speed/test_checkpointing.py checks losses and gradients
against transformers' checkpointing.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from lora_cli.memory.lora_train import layer_input_places
from lora_cli.speed.cuda_graphs import GraphPool, LayerGraphs, call_signature
from lora_cli.speed.offloaded_attention import gradient_anchor, grown_host_buffer, install_saver, planned_room
from lora_cli.speed.recomputation import Recomputation, lean_recompute_supported, mark_unread_in_recompute
from lora_cli.speed.router_logits import RouterLogits, recorded_into


class HostOffloader:
    """Pinned host copies of checkpointed layer inputs, moved on a side stream so the compute stream never waits
    for the host link.

    Forward: each layer input is copied out while the layer computes; at the next layer the compute stream waits
    for that copy and the input is let go. Backward (last layer first): the input of the layer that recomputes
    next is brought back while the current one runs. Tensors already on the host (a CPU run, as in the tests) are
    kept as they are, and so are the inputs placed on the GPU (memory.lora_train.layer_input_places: speed/policy.py
    keeps them there where host memory has no room for them; the first layers' go to the host, whose backward comes
    last).

    Recomputed inputs (placed so where the GPU has no room for them either): a layer's input is the output of the
    layer before, so it keeps none. Its backward brings back the layer before's input, reruns that layer's forward
    without autograd to make its own (one more forward of a layer each), and keeps the input it ran from for the
    layer before's backward, which comes next. Only where the input is that output as the forward left it (an
    architecture may do something between its layers) and neither layer replays CUDA graphs or keeps its attention
    (offloaded_attention.py): otherwise the input is kept where it is.

    Host buffers of the exact size, one per layer, reused every step (offloaded_attention.grown_host_buffer): torch's
    caching host allocator rounds every pinned block up to a power of two, which at 500,000 tokens of the
    Llama-3.1-8B shape (3.8 GiB a layer input) would pin 8 GiB a layer. Where the memory plan's tokens a step are
    known (max_tokens), each is made that large at once (offloaded_attention.planned_room).

    Why the waits instead of `record_stream`: the allocator reuses a block recorded on another stream only once
    the GPU has passed the moment the host freed it. With CUDA graphs the host runs the forward pass many layers
    ahead of the GPU, so the layer inputs stayed allocated until the GPU caught up: 29 of them (0.91 GiB) at once
    for the Llama-3.1-8B QLoRA step (`BENCH_MEMORY=1 python benchmarks/speed.py --modes qlora`). With the compute
    stream waiting for each copy, every block is freed and reused in the compute stream's own order.
    """

    def __init__(self, max_tokens: int | None = None):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.max_tokens = max_tokens
        self.places: list[str] = []  # each checkpointed layer's, in order (set by offloaded_checkpointing)
        self.buffers: dict[int, torch.Tensor] = {}  # layer -> its pinned host buffer
        self.kept: dict[int, torch.Tensor] = {}  # inputs kept where they are
        self.on_host: dict[int, torch.Tensor] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.copying: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # inputs held until their copy is done
        self.attached: dict = {}  # key -> the layer's saved attention (offloaded_attention.SavedForward)
        self.recomputed: dict[int, object] = {}  # key -> the layer before's ctx (OffloadedCheckpoint), to rerun it
        self.offered: LayerOutput | None = None  # the output the next layer's input may be, until its save
        self.next_key = 0

    def place(self, key: int) -> str:
        return self.places[key % len(self.places)]

    def save(self, tensor: torch.Tensor, recomputable: bool) -> int:
        """Keep a layer's input for its backward; returns its key. recomputable: the layer may rerun the one before
        to make it (no CUDA graphs, no saved attention)."""
        key, self.next_key = self.next_key, self.next_key + 1
        offered, self.offered = self.offered, None
        if (self.place(key) == "recomputed" and recomputable and offered is not None
                and offered.ctx.key == key - 1 and offered.is_unchanged(tensor)):
            self.recomputed[key] = offered.ctx
            return key
        if tensor.device.type != "cuda" or self.place(key) != "host":
            self.kept[key] = tensor
            return key
        layer = key % len(self.places)
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

    def offer_output(self, ctx, output) -> None:
        """After a layer's forward (ctx: its OffloadedCheckpoint context): where the next layer's input is to be
        recomputed, hold on to this output, which that input should be, until the next layer's save."""
        if self.place(ctx.key + 1) == "recomputed":
            tensor = output[0] if isinstance(output, tuple) else output
            self.offered = LayerOutput(ctx, tensor, tensor._version)

    def load(self, key: int, device) -> torch.Tensor:
        if key in self.recomputed:
            before = self._take(key - 1, device)
            self.kept[key - 1] = before  # for the layer before's own backward, which comes next
            tensor = rerun_forward(self.recomputed.pop(key), before)
        else:
            tensor = self._take(key, device)
        self._prefetch_for(key - 1, device)  # the layer before this one recomputes next
        return tensor

    def attach(self, key: int, saved) -> None:
        """Bring saved's output back with the input of the layer under key (offloaded_attention.py)."""
        if saved is not None:
            self.attached[key] = saved

    def layer_done(self, key: int, device) -> None:
        """After a layer's forward. The last layer of a pass recomputes first, right after the loss: its input (the
        layer before's, where its own is recomputed) and attention output start back now, while the LM head
        computes, instead of when its backward asks for them (1.3 ms a step with the GPU idle, for the Llama-3.1-8B
        QLoRA step on an H100: BENCH_PROFILE=cuda BENCH_TRACE_DIR=... python benchmarks/speed.py --modes qlora)."""
        if (key + 1) % len(self.places) == 0:
            self._prefetch_for(key, device)

    def _host_buffer(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """The layer's pinned buffer, grown (never shrunk) to the tensor's size, viewed as the tensor."""
        count = tensor.numel() * tensor.element_size()
        room = planned_room(count, tensor.shape[:-1].numel(), self.max_tokens)
        buffer = grown_host_buffer(self.buffers, layer, count, self.stream, room)
        return buffer.view(tensor.dtype).view(tensor.shape)

    def take_attached(self, key: int):
        return self.attached.pop(key, None)

    def _release_copied(self) -> None:
        compute = torch.cuda.current_stream()
        for _, copied in self.copying:
            compute.wait_event(copied)
        self.copying.clear()

    def _take(self, key: int, device) -> torch.Tensor:
        """The input saved under key, on the device (waiting for it where it comes from the host)."""
        if key in self.kept:
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
        return tensor

    def _prefetch_for(self, key: int, device) -> None:
        """Start bringing back what the backward of the layer under key reads first from the host: its input, or for
        a recomputed input the input of the layer before, which it reruns."""
        if key in self.recomputed:
            key -= 1
        if key in self.on_host:
            self._prefetch(key, device)

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


@dataclass
class LayerOutput:
    """A checkpointed layer's output as its forward returned it, with the layer's ctx (OffloadedCheckpoint) to make
    it again; held, so that no other tensor can take its memory while the next layer's save compares."""

    ctx: object
    tensor: torch.Tensor
    version: int  # the tensor's version counter then: an in-place change since raises it

    def is_unchanged(self, tensor: torch.Tensor) -> bool:
        """Whether tensor is this output, not written since."""
        mine = self.tensor
        return (tensor.data_ptr() == mine.data_ptr() and tensor.shape == mine.shape and tensor.stride() == mine.stride()
                and tensor.dtype == mine.dtype and tensor._version == self.version)


@contextlib.contextmanager
def replaying(ctx):
    """The RNG and autocast state of the layer's forward (ctx: its OffloadedCheckpoint context), the caller's RNG
    state restored after."""
    enabled, dtype = ctx.autocast
    cuda = ctx.device.type == "cuda"
    with torch.random.fork_rng(devices=[ctx.device] if cuda else []), torch.autocast(ctx.device.type, dtype, enabled):
        torch.set_rng_state(ctx.rng[0])
        if cuda:
            torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
        yield


def rerun_forward(ctx, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's output made again from its input, as its forward made it: the same random draws (LoRA dropout),
    no autograd. Called from the next layer's backward before it sets Recomputation.active, so the layer runs whole
    (a lean rerun would skip the projection that makes the output)."""
    with replaying(ctx), torch.no_grad():
        output = ctx.run(hidden_states, *ctx.args)
    return output[0] if isinstance(output, tuple) else output


class OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of one decoder layer, its input kept on the host (as torch.utils.checkpoint with
    use_reentrant=True, which restores the RNG and autocast state the same way). transformers passes the hidden
    states as the only positional tensor; the other inputs (masks, rotary tables) need no gradient.

    An MoE layer's router logits, where the model records them, are outputs too, after the layer's own
    (router_logits.py): the load-balancing loss computed from them backpropagates through the rerun.

    anchor: offloaded_attention.gradient_anchor, for the first layer's input, cut from the embedding
    (input_of_first_layer)."""

    @staticmethod
    def forward(ctx, run, offloader, graphs, saver, router_logits, anchor, hidden_states, *args):
        ctx.run, ctx.offloader, ctx.graphs, ctx.args, ctx.device = run, offloader, graphs, args, hidden_states.device
        ctx.saver = saver
        ctx.router_outputs = 0  # how many router logits follow the layer's output (set once it has run)
        ctx.routed = router_logits.wanted  # whether the model records router logits in this pass
        ctx.input_requires_grad = hidden_states.requires_grad
        kind = hidden_states.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(ctx.device) if kind == "cuda" else None)
        plain = graphs is None and saver is None  # a rerun from the next layer's backward runs the layer as it is
        ctx.key = offloader.save(hidden_states, recomputable=plain)
        if saver is not None and not args:
            saver.begin(call_signature(run, hidden_states))  # None (nothing saved) for a call graphs cannot take
        try:
            with torch.no_grad():
                out = graphs.forward(run, hidden_states, router_logits) if graphs is not None and not args else None
                if out is None:
                    with router_logits.recording():
                        out = run(hidden_states, *args)
                    if graphs is not None:
                        graphs.learn_router_logits(run, hidden_states, router_logits)
            if plain:
                offloader.offer_output(ctx, out)
            ctx.router_outputs = len(router_logits.logits)
            if ctx.router_outputs:
                ctx.set_materialize_grads(False)  # None, not zeros, for logits the loss does not read
            return router_logits.function_outputs(out)
        finally:
            if saver is not None:
                offloader.attach(ctx.key, saver.finish())
            offloader.layer_done(ctx.key, ctx.device)

    @staticmethod
    def backward(ctx, *grads):
        # In a list the graphs empty once they have copied it: the input is not held through the replay.
        loaded = [ctx.offloader.load(ctx.key, ctx.device)]
        saved = ctx.offloader.take_attached(ctx.key)  # the layer's attention, kept instead of recomputed
        with replaying(ctx), torch.enable_grad():
            Recomputation.active = True
            try:
                graphed = (ctx.graphs is not None and not ctx.args and grads[0] is not None
                           and (grad_input := ctx.graphs.backward(ctx.run, loaded, grads, saved, ctx.routed))
                           is not None)
                if not graphed:
                    hidden_states = loaded[0].detach().requires_grad_(ctx.input_requires_grad)
                    if saved is not None and saved.graph is not None:
                        saved.output = saved.take_output(ctx.device)
                        ctx.saver.replaying = saved
                    rerun_logits = []
                    with recorded_into(rerun_logits) if ctx.router_outputs else contextlib.nullcontext():
                        outputs = ctx.run(hidden_states, *ctx.args)
            finally:
                Recomputation.active = False
                if saved is not None:
                    ctx.saver.replaying, saved.fetched = None, None
        if graphed:
            return (None, None, None, None, None, None, grad_input if ctx.input_requires_grad else None)
        outputs = (*(outputs if isinstance(outputs, tuple) else (outputs,)), *rerun_logits)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, None, None, None, None, hidden_states.grad, *(None for _ in ctx.args))


def input_of_first_layer(hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's input, detached where it is the leaf that the input embedding's hook made require grad
    (transformers' and PEFT's enable_input_require_grads, which torch's reentrant checkpointing needs): its gradient
    reaches no weight, and the autograd graph's reference to it kept the embedding output on the GPU the whole step,
    and its gradient from the first layer's backward on: a hidden-wide tensor each (4 GiB at 524,288 tokens of the
    Llama-3.1-8B shape). Where the embedding itself trains, its output is no leaf and stays as it is."""
    if hidden_states.requires_grad and hidden_states.grad_fn is None:
        return hidden_states.detach()
    return hidden_states


def offloaded_checkpointing(model, cuda_graphs: bool = False, lean_recompute: bool = False,
                            offload_attention: bool = False, host_layers: int | None = None,
                            recomputed_layers: int = 0, max_tokens: int | None = None):
    """Make every checkpointed decoder layer keep its input on the host (only host_layers layers', when given: the
    others keep theirs on the GPU), but recomputed_layers layers, whose input the backward makes again from the
    layer before's (memory.lora_train.layer_input_places says which); with cuda_graphs (on a GPU) run as CUDA graphs
    (cuda_graphs.py), with lean_recompute rerun without its last projection where the architecture allows
    (LLAMA_STYLE_MODEL_TYPES), with offload_attention its attention kept on the host too where it can be
    (offloaded_attention.py); max_tokens: the memory plan's tokens a step, which the host buffers are made for at
    once; returns how many layers, and the graphs' shared pool (None without graphs).

    transformers' layers call `self._gradient_checkpointing_func(layer_call, hidden_states, ...)` when
    checkpointing is on, so setting that function on them is the whole switch (after the Trainer has turned
    checkpointing on: the caller does this when training begins).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    offloader = HostOffloader(max_tokens)
    pool = GraphPool() if cuda_graphs and torch.cuda.is_available() else None
    accumulate_stream = torch.cuda.Stream() if pool else None  # offloaded_attention.install_saver says why

    def checkpoint_with(graphs, saver):
        def checkpoint(run, hidden_states, *args, **kwargs):
            router_logits = RouterLogits()
            outputs = OffloadedCheckpoint.apply(run, offloader, graphs, saver, router_logits,
                                                gradient_anchor(hidden_states), input_of_first_layer(hidden_states),
                                                *args)
            return router_logits.layer_output(outputs)
        return checkpoint

    lean = lean_recompute and lean_recompute_supported(model)
    installed = {}
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            saver = install_saver(module, offloader.stream, offload_attention, accumulate_stream, max_tokens)
            module._gradient_checkpointing_func = checkpoint_with(LayerGraphs(module, pool, saver) if pool else None,
                                                                  saver)
            installed[module] = module._gradient_checkpointing_func
            mark_unread_in_recompute(module, lean)
    layers = len(installed)
    offloader.places = layer_input_places(layers, layers if host_layers is None else host_layers, recomputed_layers)
    keep_through_reenabling(model, installed)
    return layers, pool


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
