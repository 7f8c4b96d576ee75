"""A run whose adapter weights stop being finite (a NaN or inf loss) stops with a LoraError that says what to
change, before a checkpoint with those weights is written.
"""

from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_cli.checkpoints import complete_checkpoints
from lora_cli.errors import LoraError


class StopOnNonFiniteWeights(TrainerCallback):
    """Stops the run when the adapter weights stop being finite (a NaN/inf loss), before a bad checkpoint is saved.

    Trainer saves after on_step_end, so checking here keeps every saved checkpoint finite. The check waits for the
    device, so it runs only on the steps that log, evaluate or save and on the last one: weights that are no longer
    finite stay so (NaN spreads through every later update), and between those steps nothing is written.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        if not (control.should_log or control.should_evaluate or control.should_save
                or control.should_training_stop or state.global_step >= state.max_steps):
            return
        # The largest |value| of each tensor in one fused call (finite unless a NaN or an inf is there), then a
        # single finiteness test: one device sync.
        norms = torch._foreach_norm([p.detach() for _, p in self.named], ord=float("inf"))
        if torch.isfinite(torch.stack(norms)).all():
            return
        name = next(name for (name, _), norm in zip(self.named, norms) if not torch.isfinite(norm))
        raise LoraError(diverged_message(state.global_step, args, name))


def diverged_message(step: int, args, name: str) -> str:
    checkpoints = complete_checkpoints(Path(args.output_dir))  # all finite: this check runs before each save
    kept = f"The last good checkpoint is {checkpoints[-1]}" if checkpoints else "No checkpoint had been saved yet"
    return (
        f"Training stopped at step {step}: the loss became NaN or infinite (the adapter weight {name} is no longer "
        f"finite). {kept}; the adapter was not written. Usual fixes: lower training.learning_rate (now "
        f"{args.learning_rate:g}), keep training.max_grad_norm at 1.0 or lower, compute in float32 "
        "(model.dtype: float32, or quantization.bnb_4bit_compute_dtype: float32), and check the data for empty or "
        "extremely long examples."
    )
