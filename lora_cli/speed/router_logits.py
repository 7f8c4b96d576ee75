"""An MoE router's logits out of a reentrant checkpoint, with their gradient.

Why our own: the router's load-balancing loss (TRL adds it; fused_loss.router_loss) is computed from the router
logits transformers records while the model runs: a forward hook on each router (`_can_record_outputs`,
utils/output_capturing.py) appends them to the collector of the model's forward. OffloadedCheckpoint runs a layer's
forward without autograd, so the logits recorded there carried no gradient, and the load-balancing loss none through
the hidden states into the LoRA weights (transformers' own checkpointing, not reentrant, keeps it). The checkpoint
returns the logits recorded while its layer runs as outputs of its own, so autograd attaches its node to those very
tensors, the ones transformers holds, and its backward records the rerun's logits the same way to backpropagate
their gradients.

A layer replayed as a CUDA graph runs no hook: cuda_graphs.py records the logits its graph made (`replayed`).

Both read transformers' collector, not hooks of ours: the logits are those transformers records, from the modules
it hooks, and only where the model was asked for them (output_router_logits, in the config, where TRL sets it, or
in the call); a dense model records none, and its checkpoint returns what it did before.
"""

import contextlib

from transformers.utils import output_capturing

RECORDER_KEY = "router_logits"  # the _can_record_outputs key transformers records them under
# The collector transformers' recording hooks append to (5.17 to 5.25); a private name, so a release without it
# records nothing here: tests/speed/test_checkpointing.py checks the gradient.
ACTIVE_COLLECTOR = getattr(output_capturing, "_active_collector", None)


class RouterLogits:
    """The router logits one checkpointed layer's forward recorded, which its autograd Function returns after the
    layer's own output. Made while the model's forward runs, so it finds the list transformers records them in."""

    def __init__(self):
        collected = ACTIVE_COLLECTOR.get() if ACTIVE_COLLECTOR is not None else None
        self.records = collected.get(RECORDER_KEY) if collected else None  # None: the model records none now
        self.logits = []
        self.tuple_output = False  # whether the layer's own output is a tuple (flattened before the logits)

    @property
    def wanted(self) -> bool:
        return self.records is not None

    @contextlib.contextmanager
    def recording(self):
        """Keep the router logits transformers records while the layer runs in the model's forward."""
        start = len(self.records) if self.records is not None else 0
        yield
        if self.records is not None:
            self.logits += self.records[start:]

    def replayed(self, logits: list) -> None:
        """Keep, and record as transformers' hooks would have, the router logits a CUDA graph's replay made (no hook
        runs in a replay: cuda_graphs.py)."""
        self.records.extend(logits)
        self.logits += logits

    def function_outputs(self, output):
        """What the Function returns: the layer's output, then the router logits (the output alone without any)."""
        if not self.logits:
            return output
        self.tuple_output = isinstance(output, tuple)
        return (*output, *self.logits) if self.tuple_output else (output, *self.logits)

    def layer_output(self, outputs):
        """The layer's own output, out of the Function's outputs."""
        if not self.logits:
            return outputs
        own = outputs[:len(outputs) - len(self.logits)]
        return own if self.tuple_output else own[0]


@contextlib.contextmanager
def recorded_into(logits: list):
    """Append to logits the router logits of the layer run in the block, through transformers' hooks, which the
    model's forward installed: a rerun in the backward, after that forward and its collector are gone, or a CUDA
    graph's capture, whose tensors live in the graph's memory pool (cuda_graphs.py copies them out)."""
    token = ACTIVE_COLLECTOR.set({RECORDER_KEY: logits})
    try:
        yield
    finally:
        ACTIVE_COLLECTOR.reset(token)
