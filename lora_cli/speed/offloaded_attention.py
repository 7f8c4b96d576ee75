"""A checkpointed layer's attention kept in host memory instead of recomputed (`speed.offload_attention`).

Why: with activation checkpointing a layer's backward first reruns its forward. In a QLoRA step the attention half
of that rerun (the q, k, v and o projections with their NF4 dequantization and adapters, RoPE and the attention
kernel) was about 0.9 ms a layer on an H100 for the Llama-3.1-8B shape at 4,096 tokens: about 29 ms of a 363 ms
step (an estimate from the GPU profile of `BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora`). What its
backward reads (q and k after RoPE, v, the attention output and its log-sum-exp: about 80 MB a layer there) fits
through the host link beside the layer input, and there is no GPU memory to keep it instead.

How: in the checkpointed forward (checkpointing.OffloadedCheckpoint, run without autograd) the attention module runs
with autograd on, and every tensor its backward saves goes to pinned host memory on the side stream through
saved-tensor hooks; its output goes there too. The rerun does not run the module: `AttentionReplay` hands out the
output, brought back one layer ahead (checkpointing.HostOffloader), and its backward runs the saved autograd graph,
whose tensors come back on the side stream while the layer's MLP reruns. The graph is the libraries' own (the fused LoRA layers,
Liger's or transformers' RoPE, SDPA or varlen attention), so the gradients are the ones recomputation gives.

A layer keeps a saved forward per call signature and its pinned host buffers, shared, reused every step, so
CUDA graphs (cuda_graphs.py) capture the copies as well. Used where lora_linear.py fuses all four projections
(PEFT's 4-bit path keeps its input outside the hooks' reach) and nothing in the attention draws random numbers (LoRA
dropout 0: the rerun would skip the draws and shift the MLP's dropout masks); other layers recompute as before.
tests/speed/test_offloaded_attention.py checks loss and gradients against recomputation.
"""

import collections

import torch

from lora_cli.speed.cuda_graphs import MAX_SHAPES, Unsupported
from lora_cli.speed.recomputation import Recomputation

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Entry(torch.autograd.Function):
    """The saved graph's input. On the way back it hands its gradient to the saved forward: a leaf tensor would
    keep the module input's memory alive until the backward."""

    @staticmethod
    def forward(ctx, hidden, anchor, saved):
        ctx.saved = saved
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved.input_grad = grad
        return None, None, None


class Exit(torch.autograd.Function):
    """The saved graph's end without the output's memory: an empty tensor whose backward passes on the gradient
    the rerun was given for the output."""

    @staticmethod
    def forward(ctx, output, saved):
        ctx.saved = saved
        return output.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return ctx.saved.output_grad, None


def gradient_anchor(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor that requires grad, on like's device: given to an autograd Function beside an input that may
    need no gradient (the first layer's, checkpointing.input_of_first_layer), it makes the Function's outputs
    require grad, so that its backward runs for the adapters inside."""
    return like.new_empty(0).requires_grad_()


class AttentionReplay(torch.autograd.Function):
    """The attention module in the rerun: its saved output, and as backward, its saved graph's (anchor:
    gradient_anchor)."""

    @staticmethod
    def forward(ctx, hidden, anchor, saved):
        ctx.saved = saved
        return saved.output.detach()

    @staticmethod
    def backward(ctx, grad):
        return ctx.saved.backward(grad), None, None


class SavedForward:
    """One layer's saved attention for one input shape: host copies of the storages its backward reads, reused
    every step (fixed addresses for CUDA graphs), and the state of the forward in flight."""

    def __init__(self, stream, host_buffer):
        self.stream = stream  # the host copies' side stream (HostOffloader's), None on a CPU
        self.host_buffer = host_buffer  # AttentionSaver.host_buffer
        self.hosts: list[torch.Tensor] = []  # pinned bytes of each saved storage
        self.output_host: torch.Tensor | None = None
        self.output_layout = None
        self.fresh = False  # set by a forward that ran in Python (not a graph replay)
        self.frozen = False  # a CUDA graph has the host buffers' addresses: they stay
        self.graph = None  # (end of the saved graph, anchor) from that forward, until its backward
        self.pending: list[torch.Tensor] = []  # device storages being copied out
        self.output = None  # the output back on the device, for the rerun
        self.fetched = None  # (bytes, ready event) of the output brought back ahead
        self.loaded: list[torch.Tensor] = []
        self.loaded_ready = None
        self.replay_input = None
        self.input_grad = self.output_grad = None

    # Forward: copy out.
    def run(self, forward, hidden, args, kwargs, kept: set):
        """Run the attention with autograd on, its saved tensors copied out; returns the module's outputs."""
        index_of: dict[int, int] = {}
        input_ptr = hidden.untyped_storage().data_ptr()
        tokens, length = hidden.shape[:-1].numel(), hidden.shape[-2]

        def pack(tensor):
            storage = tensor.untyped_storage()
            layout = (tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())
            if storage.data_ptr() == input_ptr:
                return ("input", layout)  # the rerun has the same input: nothing to copy
            if isinstance(tensor, torch.nn.Parameter) or storage.data_ptr() in kept or storage.nbytes() == 0:
                return ("kept", tensor)  # alive anyway: weights, the call's other inputs (rotary tables, masks)
            if storage.data_ptr() not in index_of:
                index_of[storage.data_ptr()] = len(index_of)
                per_token = length in tensor.shape or tokens in tensor.shape  # (batch, length, ...) or flattened rows
                self._copy_out(len(index_of) - 1, storage, tokens if per_token else 0)
            return ("host", index_of[storage.data_ptr()], layout)

        # On the input's device: a CPU tensor in the saved graph sent its backward through the engine's CPU queue,
        # whose stream (the legacy one) cannot wait for a CUDA graph capture.
        anchor = gradient_anchor(hidden)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            outputs = forward(Entry.apply(hidden, anchor, self), *args, **kwargs)
            end = Exit.apply(outputs[0], self)
        if len(index_of) != len(self.hosts):
            if self.frozen:
                raise Unsupported("the attention saved other tensors than under its CUDA graph")
            del self.hosts[len(index_of):]
        output = outputs[0].detach()
        self.output_host = self._copy_out(None, output.untyped_storage(), tokens)
        self.output_layout = (output.dtype, output.size(), output.stride(), output.storage_offset())
        self.graph, self.fresh = (end, anchor), True
        return (output, *outputs[1:])

    def _copy_out(self, index, storage, tokens: int) -> torch.Tensor:
        """tokens: how many tokens the storage holds a row of, 0 where it is no per-token tensor (planned_room)."""
        device_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        before = self.output_host if index is None else (self.hosts[index] if index < len(self.hosts) else None)
        if self.frozen:  # the CUDA graph copies to the addresses it captured
            if before is None or before.numel() != device_bytes.numel():
                raise Unsupported("the attention saved other tensors than under its CUDA graph")
            host = before
        else:
            host = self.host_buffer(index, device_bytes.numel(), tokens)
        if index is not None:
            self.hosts[index:index + 1] = [host]
        # Held until the copies end: also keeps its address from being reused by a later saved tensor meanwhile.
        self.pending.append(device_bytes)
        if self.stream is None:
            host.copy_(device_bytes)
            return host
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written
        with torch.cuda.stream(self.stream):
            host.copy_(device_bytes, non_blocking=True)
        return host

    def finish_forward(self) -> None:
        """The compute stream waits for the copies (at the end of the layer, so they overlap its MLP), then lets
        the device storages go: in stream order, as HostOffloader does for the layer inputs."""
        if self.pending and self.stream is not None:
            done = torch.cuda.Event()
            done.record(self.stream)
            torch.cuda.current_stream().wait_event(done)
        self.pending.clear()

    # Backward: bring back.
    def fetch_output(self, device) -> None:
        """Bring the output back on the side stream (called one layer ahead, by HostOffloader's prefetch)."""
        if self.stream is None:
            self.fetched = (self.output_host, None)
            return
        device_bytes = torch.empty(self.output_host.shape, dtype=torch.uint8, device=device)
        self.stream.wait_stream(torch.cuda.current_stream())  # the block's earlier use is over
        with torch.cuda.stream(self.stream):
            device_bytes.copy_(self.output_host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.fetched = (device_bytes, ready)

    def take_output(self, device) -> torch.Tensor:
        if self.fetched is None:
            self.fetch_output(device)
        (device_bytes, ready), self.fetched = self.fetched, None
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)
        return _view(device_bytes, self.output_layout)

    def replay(self, hidden: torch.Tensor) -> torch.Tensor:
        """The module's output in the rerun, differentiable through the saved graph; starts bringing back what
        that graph saved."""
        self.replay_input = hidden.detach()
        if self.stream is None:
            self.loaded = self.hosts
        else:
            self.loaded = [torch.empty(host.shape, dtype=torch.uint8, device=hidden.device) for host in self.hosts]
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for device_bytes, host in zip(self.loaded, self.hosts):
                    device_bytes.copy_(host, non_blocking=True)
                self.loaded_ready = torch.cuda.Event()
                self.loaded_ready.record()
        return AttentionReplay.apply(hidden, gradient_anchor(hidden), self)

    def _unpack(self, packed):
        kind, *rest = packed
        if kind == "kept":
            return rest[0]
        if kind == "input":
            return _view(self.replay_input, rest[0])
        self._wait_loaded()
        index, layout = rest
        return _view(self.loaded[index], layout)

    def _wait_loaded(self) -> None:
        if self.loaded_ready is not None:
            torch.cuda.current_stream().wait_event(self.loaded_ready)
            self.loaded_ready = None

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        (end, _), self.graph = self.graph, None
        self.output_grad = grad
        torch.autograd.backward(end, end.new_empty(0))  # the adapters' gradients accumulate as usual
        self._wait_loaded()  # joins the side stream even when nothing was read from it
        grad_input = self.input_grad
        self.loaded, self.replay_input, self.input_grad, self.output_grad, self.output = [], None, None, None, None
        if not self.frozen:  # views of the saver's buffers: held, they would keep a buffer it has since grown
            self.hosts, self.output_host = [], None
        return grad_input


def grown_host_buffer(buffers: dict, key, count: int, stream, room: int = 0) -> torch.Tensor:
    """count bytes of buffers[key], a host buffer grown (never shrunk) to the most bytes asked of it, or to room
    bytes where more (planned_room), so that steps of changing lengths reuse it; pinned where a side stream copies
    to and from it, whose copies from the old buffer end before it goes."""
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < count:
        if buffer is not None and stream is not None:
            torch.cuda.current_stream().synchronize()
            stream.synchronize()
        buffer = buffers[key] = host_bytes(max(count, room), pinned=stream is not None)
    return buffer[:count]


def planned_room(count: int, tokens: int, max_tokens: int | None) -> int:
    """Bytes to pin for count bytes of a per-token tensor of tokens tokens where a step holds up to max_tokens (the
    memory plan's batch x length, which its host terms count): packed rows change their length from step to step,
    and buffers grown to each new longest row were pinned anew each time, tens of GiB at 32,768 tokens of the
    Llama-3.1-8B shape. count where not known (no plan, or not a per-token tensor: tokens 0)."""
    if not max_tokens or not tokens or tokens >= max_tokens or count % tokens:
        return count
    return count // tokens * max_tokens


def host_bytes(count: int, pinned: bool) -> torch.Tensor:
    """Host memory for saved tensors, pinned outside torch's caching host allocator: a copy into memory of that
    allocator records an event, which the allocator later queries, also from the DataLoader's pin-memory thread;
    one queried while a CUDA graph capture was recording it invalidated the capture (`lora train`, H100)."""
    import weakref

    buffer = torch.empty(count, dtype=torch.uint8)
    if pinned and count:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(buffer.data_ptr(), count, 0)) != 0:
            raise RuntimeError(f"could not pin {count} bytes of host memory for the offloaded attention")
        weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return buffer


def capturing_now() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _view(tensor, layout) -> torch.Tensor:
    dtype, size, stride, offset = layout
    flat = tensor if tensor.dtype == dtype else tensor.view(dtype)
    return flat.as_strided(size, stride, offset)


def _storages(value, found: set) -> set:
    if isinstance(value, torch.Tensor):
        found.add(value.untyped_storage().data_ptr())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _storages(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _storages(item, found)
    return found


class AttentionSaver:
    """The saved forwards of one attention module, one per layer call signature (cuda_graphs.call_signature), and the
    pinned host buffers they use.

    The buffers are shared by every signature, one a saved storage's place, grown (never shrunk) to the most bytes
    saved there: packed rows change their sequence count from batch to batch, so their calls have several
    signatures, and a buffer set per signature pinned another few GB of host memory each time (measured: packed
    QLoRA fell from 97% to 64% of the fixed-length rate). Packed long documents also change the row's length (TRL
    packs whole documents into at most max_length tokens), and buffers of each exact size were pinned anew every
    step: the likely cause of packed documents running at 21% of the fixed-length rate with 78 GiB of host memory
    against 39, at 32,768 tokens of the Llama-3.1-8B shape (row 2026-12-07-h100-af9fe47 of
    benchmarks/results/results.csv; the grown buffers are not measured there yet). Where the memory plan's tokens a
    step are known (max_tokens), a per-token buffer is made that large at once, so a longer row later grows none
    (planned_room). Sharing is safe: a layer has one forward at a time waiting for its backward. Once a CUDA graph
    has captured copies to a buffer's address, a longer call gets a buffer of its own instead of growing that one,
    which is kept for the graph."""

    def __init__(self, stream, max_tokens: int | None = None):
        self.stream = stream
        self.max_tokens = max_tokens
        self.forwards: collections.OrderedDict = collections.OrderedDict()
        self.captured: set = set()  # signatures whose forward a CUDA graph captured: kept
        self.buffers: dict = {}  # place -> pinned host buffer
        self.retired: list = []  # buffers a captured graph copies to, outgrown by a longer call since
        self.key = None  # the signature of the layer call running now (set by OffloadedCheckpoint)
        self.replaying: SavedForward | None = None  # the saved forward the rerun replays
        self.accumulators: list = []  # the adapters' AccumulateGrad nodes, held (install_saver says why)

    def begin(self, key) -> None:
        self.key = key

    def join(self) -> None:
        """End the copies of the forward running now (inside a CUDA graph capture, before it ends)."""
        saved = self.forwards.get(self.key)
        if saved is not None and saved.fresh:
            saved.finish_forward()

    def finish(self) -> SavedForward | None:
        """The saved forward of the layer call that just ran: one that ran in Python, or a CUDA graph replay of a
        captured one (its copies are in the graph); None when the attention was not saved."""
        key, self.key = self.key, None
        saved = self.forwards.get(key)
        if saved is None:
            return None
        if saved.fresh:
            saved.fresh = False
            saved.finish_forward()
            return saved
        if key in self.captured:
            saved.graph = None  # a replay: only the captured backward can use what it saved
            return saved
        return None

    def save(self, forward, hidden, args, kwargs):
        key = self.key
        saved = self.forwards.get(key)
        capturing = capturing_now()
        if saved is None:
            if capturing:
                return forward(hidden, *args, **kwargs)
            saved = self.forwards[key] = SavedForward(self.stream, self.host_buffer)
            self._evict()
        self.forwards.move_to_end(key)
        try:
            outputs = saved.run(forward, hidden, args, kwargs, _storages((args, kwargs), set()))
        except Unsupported:
            if capturing:
                raise  # the capture fails, and the run goes on without graphs
            saved.finish_forward()
            self.key = None  # not saved: the rerun recomputes this layer's attention
            return forward(hidden, *args, **kwargs)
        if capturing:
            self.captured.add(key)
            saved.frozen = True
        return outputs

    def host_buffer(self, place, count: int, tokens: int) -> torch.Tensor:
        """count bytes of the pinned buffer for the place-th saved storage (None: the output), a per-token one of
        tokens tokens (0: not per token)."""
        buffer = self.buffers.get(place)
        if buffer is None or buffer.numel() < count:
            if capturing_now():  # its eager run before made the buffers it needs: these are other tensors
                raise Unsupported("the attention saved other tensors than under its CUDA graph")
            if buffer is not None and self.captured:  # a graph copies to this address: a new buffer, this one kept
                self.retired.append(self.buffers.pop(place))  # (held: its pinning ends when it is collected)
        return grown_host_buffer(self.buffers, place, count, self.stream, planned_room(count, tokens, self.max_tokens))

    def _evict(self) -> None:
        """Eager runs of many shapes (padded batches without graphs) keep a few."""
        while len(self.forwards) > MAX_SHAPES + 1:
            stale = next((key for key in self.forwards if key not in self.captured), None)
            if stale is None:
                break
            del self.forwards[stale]


def offloaded_attention_forward(self, hidden_states, *args, **kwargs):
    """Replaces an attention module's forward while training with offloaded checkpointing."""
    saver = self.attention_saver
    if saver is None:
        return self.unsaved_forward(hidden_states, *args, **kwargs)
    if Recomputation.active and saver.replaying is not None:
        saved, saver.replaying = saver.replaying, None
        return saved.replay(hidden_states), None
    if saver.key is not None and self.training and not torch.is_grad_enabled():  # the checkpointed forward
        return saver.save(self.unsaved_forward, hidden_states, args, kwargs)
    return self.unsaved_forward(hidden_states, *args, **kwargs)


def attention_of(layer):
    """The layer's attention module when its attention can be offloaded: all four projections fused LoRA layers
    without dropout, no attention dropout."""
    attention = getattr(layer, "self_attn", None)
    projections = [getattr(attention, name, None) for name in PROJECTIONS]
    if not all(hasattr(p, "fused_adapters") for p in projections) or getattr(attention, "attention_dropout", 0):
        return None
    if any(p > 0 for projection in projections for p in projection.fused_adapters.values()):
        return None
    return attention


def offloadable_attentions(model) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(attention_of(module) is not None for module in model.modules()
               if isinstance(module, GradientCheckpointingLayer))


def install_saver(layer, stream, enabled: bool, accumulate_stream=None,
                  max_tokens: int | None = None) -> AttentionSaver | None:
    """Give the layer's attention a fresh saver, or take it away; returns it (None where not offloaded). max_tokens:
    the memory plan's tokens a step (AttentionSaver).

    accumulate_stream (with CUDA graphs): a side stream the adapters' gradients are added on. An autograd node runs
    its backward on the stream it was made on, and a parameter's AccumulateGrad node, made when the parameter first
    enters a graph, is reused by later graphs while it lives. Those of the attention's adapters, made by the eager
    first step on the default (legacy) stream, lived on into the step whose backward was captured (`lora train`,
    tiny Llama, H100), and CUDA refuses to let the legacy stream wait for a capture: the capture failed. So they
    are made here on a side stream, which may join a capture (the autograd engine joins it back), and held."""
    import types

    attention = attention_of(layer)
    if attention is None:
        return None
    if not hasattr(attention, "unsaved_forward"):
        attention.unsaved_forward = attention.forward
        attention.forward = types.MethodType(offloaded_attention_forward, attention)
    attention.attention_saver = AttentionSaver(stream, max_tokens) if enabled else None
    if enabled and accumulate_stream is not None:
        with torch.cuda.stream(accumulate_stream), torch.enable_grad():
            attention.attention_saver.accumulators = [p.view_as(p).grad_fn.next_functions[0][0]
                                                      for p in attention.parameters() if p.requires_grad]
    return attention.attention_saver
