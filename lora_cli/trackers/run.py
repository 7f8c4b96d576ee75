"""A run's trackers: TensorBoard writes into the output folder (output_dir/tensorboard) rather than under the
checkpoints, and each tracker gets the resolved recipe (the integrations log only the trainer's arguments) and
lora's own figures: tokens/s and peak memory at every logged step, and the data audit's numbers once at the start.
"""

import os
import time

import yaml
from transformers import TrainerCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, TensorBoardCallback

from lora_cli.checkpoints import flatten
from lora_cli.reporting import TokenRate, peak_memory_gib


def attach_trackers(trainer, recipe, audit: dict, out) -> None:
    """Point the trainer's tracker integrations at the output folder and give them the recipe and our figures."""
    callbacks = trainer.callback_handler.callbacks
    integrations = [c for c in callbacks if isinstance(c, tuple(INTEGRATION_TO_CALLBACK.values()))]
    if not integrations:
        return
    for callback in integrations:
        if isinstance(callback, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            callback.logging_dir = str(out / "tensorboard")
    # Before the integrations, so that our figures join each log call they make (a separate call would count as a
    # step of its own in trackers that number their own steps, such as Trackio).
    callbacks.insert(callbacks.index(integrations[0]), RunFigures(integrations, recipe.to_dict(), audit))


def audit_figures(audit: dict) -> dict:
    """The data audit's numbers."""
    figures = {f"examples_{k}": v for k, v in audit["examples"].items()}
    figures.update({f"tokens_{k}": v for k, v in audit["tokens"].items()})
    for key in ("truncated", "eos_lost_to_truncation", "eos_trained_share", "trained_token_share"):
        figures[key] = audit[key]
    return figures


class RunFigures(TrainerCallback):
    """Adds tokens/s and peak memory to every log with a loss, before the integrations log it; at the first log,
    when the integrations have started their runs, gives each the resolved recipe and the data audit."""

    def __init__(self, integrations, recipe: dict, audit: dict):
        self.integrations, self.recipe, self.audit = integrations, recipe, audit
        self.rate = TokenRate()
        self.described = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if not self.described:
            self.described = True
            for callback in self.integrations:
                self.describe(callback, state.global_step)
        per_second = self.rate.update(logs, time.time())
        if "loss" in logs:
            peak, kind = peak_memory_gib()
            logs[f"peak_{kind.lower()}_gib"] = round(peak, 3)
            if per_second is not None:
                logs["tokens_per_second"] = round(per_second, 1)

    def describe(self, callback, step: int) -> None:
        """The recipe and the audit where each tracker keeps a run's settings (TensorBoard: text and scalars)."""
        kind = type(callback).__name__
        settings = flatten({"recipe": self.recipe, "data_audit": audit_figures(self.audit)})
        if kind == "TensorBoardCallback" and callback.tb_writer is not None:
            text = yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True)
            callback.tb_writer.add_text("recipe", "\n".join("    " + line for line in text.splitlines()), step)
            for name, value in audit_figures(self.audit).items():
                callback.tb_writer.add_scalar(f"data_audit/{name}", value, step)
        elif kind == "TrackioCallback":
            callback._trackio.config.update(settings, allow_val_change=True)
        elif kind == "WandbCallback" and callback._wandb.run is not None:
            callback._wandb.config.update(settings, allow_val_change=True)
        elif kind == "MLflowCallback" and callback._ml_flow.active_run() is not None:
            callback._ml_flow.log_dict({"recipe": self.recipe, "data_audit": self.audit}, "lora_recipe.json")
