"""Experiment trackers from the recipe (`training.report_to`): transformers' own integrations do the logging; we add
what they leave out.

- A tracker that is not installed is a recipe error (file, line, the command that installs it) before any weights
  load, instead of transformers' RuntimeError from inside the trainer.
- TensorBoard writes into the output folder (output_dir/tensorboard) rather than under the checkpoints.
- Each tracker gets the resolved recipe (the integrations log only the trainer's arguments) and lora's own figures:
  tokens/s and peak memory at every logged step, and the data audit's numbers once at the start.
"""

import importlib.util
import os
import sys

from transformers import TrainerCallback

from lora_cli.errors import did_you_mean

# report_to names whose package is not the name itself, and how each is installed.
MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "azure_ml": ("azureml",), "flyte": ("flytekit",),
           "kubeflow": ("kfp",)}
INSTALL = {"tensorboard": "pip install 'lora-cli[tensorboard]'", "trackio": "pip install 'lora-cli[trackio]'",
           "wandb": "pip install wandb (then wandb login, or WANDB_MODE=offline)", "mlflow": "pip install mlflow"}


def requested(report_to) -> list[str]:
    """The tracker names a report_to value asks for ('all' and 'none' are transformers' own)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name not in ("none", "all")]


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def report_to_problem(report_to) -> str | None:
    """Why training.report_to cannot work here (an unknown or missing tracker), or None."""
    names = requested(report_to)
    if not names:
        return None
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            hint = did_you_mean(name, INTEGRATION_TO_CALLBACK)
            return (f"names '{name}', which is not a tracker transformers reports to.{hint} "
                    f"Trackers: {', '.join(INTEGRATION_TO_CALLBACK)} (or none).")
        if not any(_installed(module) for module in MODULES.get(name, (name,))):
            install = INSTALL.get(name, f"pip install {MODULES.get(name, (name,))[0]}")
            return (f"names {name}, which is not installed, so the run could not report to it. Install it with: "
                    f"{install}; or leave it out of training.report_to.")
    return None


def attach(trainer, recipe, audit: dict, out) -> None:
    """Point the trainer's tracker integrations at the output folder and give them the recipe and our figures."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, TensorBoardCallback

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
        from lora_cli.reporting import TokenRate

        self.integrations, self.recipe, self.audit = integrations, recipe, audit
        self.rate = TokenRate()
        self.described = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        from lora_cli.reporting import peak_memory_gib

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
        import yaml

        kind = type(callback).__name__
        from lora_cli.checkpoints import flatten

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
