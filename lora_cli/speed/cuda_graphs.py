"""CUDA graphs of checkpointed decoder layers: each layer's forward, and its recomputation with its backward,
replayed as one launch each.

Why: with activation checkpointing, the host launched a QLoRA step's kernels (a few hundred a layer, each behind
Python: transformers' layer, PEFT, Liger, the autograd engine) more slowly than an H100 ran them. With the GPU
timeline profiled (`BENCH_PROFILE=cuda python benchmarks/speed.py --modes qlora,qlora_nographs`, Llama-3.1-8B
shape), the GPU was busy 71% of two steps without graphs and 89% with them, for the same GPU time. A graph replays
a layer's kernels with no Python between them.

How: a layer is run as usual the first time it meets an input shape (that warms up Triton and cuBLAS); the second
time, its no-grad forward and its recomputation + backward are captured, once per layer and shape, and replayed
from then on. Every graph reads and writes a few static buffers shared by all layers of that shape (the layer
input, its output or input gradient, the output gradient, the rotary tables and masks), and all graphs share one
memory pool, so the graphs hold one layer's activations, not one per layer. Adapter gradients land in ordinary
tensors that become (or are added to) `.grad`, so zero_grad, gradient accumulation and the optimizer see them as
usual. Dropout draws the same masks as without graphs: a replay starts from the RNG state the caller sets, as the
eager recomputation does. An MoE layer's router logits (the load-balancing loss's input, router_logits.py), which
transformers' hooks record in an eager run but no hook records in a replay, are copied out of the forward graph
into static buffers and recorded for the model from there; their gradients go into the backward graph the same way.

Used only where that is safe: a single process (no DDP, FSDP or DeepSpeed, whose hooks run inside the backward),
layer inputs and keyword arguments that are tensors, tuples of tensors or plain values. Packed rows change their
length and sequence bounds every batch; varlen.FixedShapePackedBatches pads them to a few shapes first. When a
capture fails, the run goes on without graphs and says why. Off with `speed.cuda_graphs: false`.
"""

import contextlib
import functools
import sys

import torch

from lora_cli.speed.router_logits import recorded_into

MAX_SHAPES = 4  # graphs kept per layer; batches of more shapes than this run the others eagerly


class Unsupported(Exception):
    pass


def signature(value):
    """What must stay the same for a graph to be replayed: tensor shapes and dtypes, and plain values."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(signature(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    raise Unsupported(type(value).__name__)


def call_signature(run, hidden):
    """What must stay the same for a graph of a layer call to be replayed: the input's and the keyword arguments'
    signatures; None for a call graphs cannot take (only keywords get static copies)."""
    if not isinstance(run, functools.partial) or not all(isinstance(arg, torch.nn.Module) for arg in run.args):
        return None
    try:
        return signature(hidden), tuple(sorted((name, signature(value)) for name, value in run.keywords.items()))
    except Unsupported:
        return None


class Statics:
    """The static buffers the graphs of one input shape read and write."""

    def __init__(self, hidden: torch.Tensor, keywords: dict):
        self.hidden = torch.empty_like(hidden)  # the layer input (forward and recomputation)
        self.result = torch.empty_like(hidden)  # the layer output (forward) or the input's gradient (backward)
        self.grad = torch.empty_like(hidden)  # the output's gradient
        self.keywords = {name: self._like(value) for name, value in keywords.items()}
        self.sources: dict[str, object] = {}
        self.routed: dict[tuple, list[torch.Tensor]] = {}  # router logits' layouts -> their buffers

    def router_buffers(self, layouts: tuple) -> list[torch.Tensor]:
        """An MoE layer's router logits (what a forward graph copies out of its pool) or their gradients (what a
        backward graph reads): layers with the same layouts share them, as they share the others."""
        if layouts not in self.routed:
            self.routed[layouts] = [torch.empty(shape, dtype=dtype, device=self.hidden.device)
                                    for shape, dtype in layouts]
        return self.routed[layouts]

    @staticmethod
    def _like(value):
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value)
        if isinstance(value, (tuple, list)):
            return type(value)(Statics._like(item) for item in value)
        return value

    def load(self, keywords: dict) -> None:
        """Copy the call's tensors in. Every layer of a forward pass gets the same rotary tables and mask objects,
        so each is copied once a pass."""
        for name, value in keywords.items():
            if self.sources.get(name) is not value:
                _copy_into(self.keywords[name], value)
                self.sources[name] = value


def _copy_into(static, value) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (tuple, list)):
        for item, source in zip(static, value):
            _copy_into(item, source)


class GraphPool:
    """What all layers' graphs share: the memory pool, the static buffers per shape, and whether capture works."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.statics: dict = {}
        self.layers: list[LayerGraphs] = []
        self.broken: str | None = None

    def statics_for(self, key, hidden, keywords) -> Statics:
        if key not in self.statics:
            self.statics[key] = Statics(hidden, keywords)
        return self.statics[key]

    def fail(self, error: Exception) -> None:
        end_rng_capture_mode()
        self.broken = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        print(f"warning: CUDA graphs of the decoder layers are off for this run, their capture failed "
              f"({self.broken}); training goes on without them (speed.cuda_graphs: false skips the attempt).",
              file=sys.stderr, flush=True)


def end_rng_capture_mode() -> None:
    """A capture that CUDA invalidated (a host sync inside a layer, say) leaves torch's CUDA random generator in
    capture mode: torch ends that mode only when a capture ends well, and the next random op outside a capture
    raises 'Offset increment outside graph capture encountered unexpectedly', so the eager run that should go on
    would stop at its next dropout mask. A small capture that ends well ends the mode."""
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        torch.ones(1, device="cuda").add_(1)


class Entry:
    def __init__(self):
        self.forward: torch.cuda.CUDAGraph | None = None
        self.backward: torch.cuda.CUDAGraph | None = None
        self.params: list[torch.Tensor] = []
        self.sinks: list[torch.Tensor] = []  # where the backward graph adds each parameter's gradient
        self.router: list[torch.Tensor] = []  # the static router logits the forward graph writes
        self.replays_attention = False  # the backward graph reads the attention's saved output and tensors


class LayerGraphs:
    """The graphs of one checkpointed layer, one entry per input shape, captured the second time a shape comes."""

    def __init__(self, module: torch.nn.Module, shared: GraphPool, saver=None):
        self.module, self.shared, self.saver = module, shared, saver  # saver: offloaded_attention.AttentionSaver
        self.entries: dict = {}
        self.seen: dict = {}
        self.router_layouts: dict = {}  # key -> the shapes and dtypes of the router logits its eager run recorded
        shared.layers.append(self)

    @property
    def replaying(self) -> bool:
        return any(entry.forward and entry.backward for entry in self.entries.values())

    def _entry(self, run, hidden, kind: str, routed: bool):
        """The entry, static buffers, static run and router logits' layouts for this call, or None to run eagerly
        (first sighting, unsupported call). routed: whether the model records router logits in this pass."""
        if self.shared.broken is not None or not hidden.is_cuda or (key := self._key(run, hidden, routed)) is None:
            return None
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= MAX_SHAPES:
                return None
            self.seen[(key, kind)] = self.seen.get((key, kind), 0) + 1
            if self.seen[(key, kind)] < 2:
                return None  # warm-up: Triton compiles, cuBLAS picks its kernels, outside any capture
            entry = self.entries[key] = Entry()
        statics = self.shared.statics_for(key, hidden, run.keywords)
        statics.load(run.keywords)
        static_run = functools.partial(run.func, *run.args, **statics.keywords)
        return entry, statics, static_run, self.router_layouts.get(key, ())

    @staticmethod
    def _key(run, hidden, routed: bool):
        signature = call_signature(run, hidden)
        return None if signature is None else (signature, routed)

    def learn_router_logits(self, run, hidden: torch.Tensor, router_logits) -> None:
        """After an eager forward (router_logits.RouterLogits): the layouts of the router logits it recorded, for
        the static buffers of this call's graphs (made before a capture, outside the graphs' pool)."""
        if router_logits.wanted and hidden.is_cuda and (key := self._key(run, hidden, True)) is not None:
            self.router_layouts[key] = layouts_of(router_logits.logits)

    def forward(self, run, hidden: torch.Tensor, router_logits) -> torch.Tensor | None:
        """The layer's output without autograd (the checkpointed forward), or None to run it eagerly. An MoE layer's
        router logits (router_logits.RouterLogits) are copied out of the graph and recorded for the model."""
        found = self._entry(run, hidden, "forward", router_logits.wanted)
        if found is None:
            return None
        entry, statics, static_run, layouts = found
        statics.hidden.copy_(hidden)
        if entry.forward is None:
            buffers = statics.router_buffers(layouts)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.shared.pool, capture_error_mode="thread_local"), \
                        torch.no_grad(), _autocast_uncached(hidden):
                    recorded = []
                    with recorded_into(recorded) if router_logits.wanted else contextlib.nullcontext():
                        statics.result.copy_(_only_tensor(static_run(statics.hidden)))
                    for buffer, logits in zip(buffers, _as_learned(recorded, layouts)):
                        buffer.copy_(logits)
                    if self.saver is not None:
                        self.saver.join()  # the attention's copies to the host end inside the graph
            except Exception as error:  # noqa: BLE001 (any capture failure: fall back, say why)
                self.shared.fail(error)
                return None
            entry.forward, entry.router = graph, buffers
        entry.forward.replay()
        if entry.router:
            router_logits.replayed([buffer.clone() for buffer in entry.router])
        return statics.result.clone()  # the static buffer is the next layer's output as well

    def backward(self, run, loaded: list, grads: tuple, saved=None, routed: bool = False) -> torch.Tensor | None:
        """Recompute the layer from its input (loaded[0]) and backpropagate grads (the output's, then its router
        logits', None for those the loss did not read): adds the parameters' gradients to `.grad` and returns the
        input's gradient, or None to do it eagerly (from loaded[0], which may then be the static copy). The caller
        has set the RNG and autocast state of the forward. saved: the layer's attention kept on the host
        (offloaded_attention.SavedForward), if any; routed: whether the forward recorded router logits."""
        hidden = loaded[0]
        found = self._entry(run, hidden, "backward", routed)
        if found is None:
            return None
        entry, statics, static_run, layouts = found
        replays_attention = saved is not None and (entry.replays_attention if entry.backward
                                                   else saved.graph is not None)
        if entry.backward is not None and entry.replays_attention and not replays_attention:
            return None
        with torch.no_grad():  # the buffers stay out of the caller's autograd graph
            statics.hidden.copy_(hidden)
            loaded[0] = hidden = statics.hidden  # the loaded input's memory goes back before the replay
            statics.grad.copy_(grads[0])
            router_grads = statics.router_buffers(layouts)
            for buffer, grad in zip(router_grads, grads[1:]):  # None: a zero gradient, for a fixed graph
                if grad is None:
                    buffer.zero_()
                else:
                    buffer.copy_(grad)
            if replays_attention:  # the graph reads it first and writes the input's gradient over it last
                statics.result.copy_(saved.take_output(hidden.device))
        if entry.backward is None:
            if replays_attention:
                saved.output, self.saver.replaying = statics.result, saved
            entry.replays_attention = replays_attention
            if not self._capture_backward(entry, statics, static_run, hidden, routed, layouts):
                return None
        sinks = entry.sinks
        fresh = [sink for param, sink in zip(entry.params, sinks) if param.grad is not sink]
        if fresh:
            torch._foreach_zero_(fresh)  # the replay adds into the sinks
        entry.backward.replay()
        for param, sink in zip(entry.params, sinks):
            if param.grad is None:
                param.grad = sink
            elif param.grad is not sink:
                param.grad.add_(sink)
        return statics.result.clone()

    def _capture_backward(self, entry, statics, static_run, hidden, routed: bool, layouts: tuple) -> bool:
        """The backward graph adds each parameter's gradient into a sink of ordinary memory, never into the pool:
        the pool's memory is reused by every graph, and a gradient must outlive the next replay (gradient
        accumulation runs forward graphs between backward ones). The rerun's router logits, where the forward
        recorded some (of these layouts), are backpropagated with their gradients' static buffers."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        sinks = [torch.zeros_like(p) for p in params]
        kept = [p.grad for p in params]
        for param, sink in zip(params, sinks):
            param.grad = sink  # so the captured backward adds into it in place
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.shared.pool, capture_error_mode="thread_local"):
                layer_input = statics.hidden.detach().requires_grad_(True)
                rerun = []
                with torch.enable_grad(), _autocast_uncached(hidden), \
                        recorded_into(rerun) if routed else contextlib.nullcontext():
                    out = _only_tensor(static_run(layer_input))
                router_grads = statics.router_buffers(layouts)
                torch.autograd.backward([out, *_as_learned(rerun, layouts)], [statics.grad, *router_grads],
                                        inputs=[layer_input, *params])
                statics.result.copy_(layer_input.grad)
            replaced = [p for p, sink in zip(params, sinks) if p.grad is not sink]
            if replaced:
                raise Unsupported(f"the backward replaced the gradient of {len(replaced)} parameters instead of "
                                  "adding to it")
        except Exception as error:  # noqa: BLE001 (any capture failure: fall back, say why)
            self.shared.fail(error)
            return False
        finally:
            for param, grad in zip(params, kept):
                param.grad = grad
        entry.params, entry.sinks = params, sinks
        entry.backward = graph
        return True


def layouts_of(tensors: list) -> tuple:
    """The shapes and dtypes of tensors: what a static buffer for each is made from (Statics.router_buffers)."""
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def _as_learned(logits: list, layouts: tuple) -> list:
    """The router logits a capture recorded, where they are the ones the eager run recorded."""
    found = layouts_of(logits)
    if found != layouts:
        raise Unsupported(f"the layer recorded router logits {found} in the capture, {layouts} in its eager run")
    return logits


def _only_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    raise Unsupported(f"the layer returns {type(out).__name__}, not a tensor")


def _autocast_uncached(hidden):
    """The caller's autocast state without its cast cache (a capture must not keep casts made outside it)."""
    kind = hidden.device.type
    return torch.autocast(kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind), cache_enabled=False)
