"""Which trackers `training.report_to` may name, and whether each is installed: a tracker that is not is a recipe
error (file, line, the command that installs it) before any weights load, instead of transformers' RuntimeError
from inside the trainer. Imports nothing of lora_cli above errors.py: the recipe's validation runs it.
"""

import importlib.util
import sys

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
            return (f"names '{name}', which is not a tracker transformers reports to.{did_you_mean(name, INTEGRATION_TO_CALLBACK)} "
                    f"Trackers: {', '.join(INTEGRATION_TO_CALLBACK)} (or none).")
        if not any(_installed(module) for module in MODULES.get(name, (name,))):
            install = INSTALL.get(name, f"pip install {MODULES.get(name, (name,))[0]}")
            return (f"names {name}, which is not installed, so the run could not report to it. Install it with: "
                    f"{install}; or leave it out of training.report_to.")
    return None
