"""`lora eval --tasks`: lm-evaluation-harness tasks on the model lora loaded (its HFLM class accepts a model object).

Built-in tasks read their datasets from the Hugging Face hub (or its cache); a task YAML file in lm-eval's own format
over a local file runs offline. Tasks are built before the model loads, so a missing package, an unknown task or
data that is not on the machine is a one-paragraph error before any weights are read.
"""

import functools
import logging
from pathlib import Path

from lora_cli.errors import LoraError, did_you_mean, first_line

INSTALL = "pip install 'lora-cli[eval]'  (or: pip install lm-eval)"


def split_tasks(tasks) -> list[str]:
    """--tasks a,b or a list (the recipe's eval.tasks): task names and task YAML paths."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [item.strip() for item in items if item.strip()]
    if not names:
        raise LoraError("--tasks: name at least one lm-evaluation-harness task or task YAML file.")
    return names


def load_tasks(names: list[str]) -> dict:
    """lm-eval's Task objects by name, their data read (from the hub cache or the YAML's local files)."""
    try:
        import lm_eval.tasks  # noqa: F401 (installed?)
    except ImportError:
        raise LoraError(
            f"--tasks runs lm-evaluation-harness, which is not installed. Install it with: {INSTALL}") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on default metric settings, for every task

    paths = [name for name in names if name.endswith((".yaml", ".yml"))]
    for path in paths:
        if not Path(path).is_file():
            raise LoraError(f"--tasks: the task file '{path}' does not exist.")
    manager = _task_manager(include_defaults=len(paths) < len(names))
    loaded = {}
    for name in names:
        spec = str(Path(name).resolve()) if name in paths else name
        try:
            loaded.update(manager.load([spec])["tasks"])
        except KeyError:
            hint = did_you_mean(name, manager.all_tasks)
            raise LoraError(f"--tasks: '{name}' is neither an lm-evaluation-harness task nor a task YAML file.{hint} "
                            "`lm-eval ls tasks` lists the built-in tasks.") from None
        except ConnectionError as e:
            raise LoraError(
                f"--tasks: the data of lm-eval task '{name}' is not on this machine and cannot be downloaded here "
                f"({first_line(e)}). Fetch it once where the network is, into the Hugging Face cache: HF_HUB_OFFLINE=0 "
                f"python -c \"from lm_eval.tasks import TaskManager; TaskManager().load(['{name}'])\"; or write a "
                "task YAML over a local file (docs/eval.md)."
            ) from None
        except (OSError, ValueError, TypeError) as e:
            raise LoraError(f"--tasks: lm-eval cannot build the task '{name}': {first_line(e)}") from None
    return loaded


@functools.cache
def _task_manager(include_defaults: bool):
    """Indexing lm-eval's thousands of built-in task files takes seconds: once a process, and not for task files."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def run_tasks(target, tasks: dict, limit: int | None, batch_size: int, use_adapter: bool = True) -> dict:
    """Each task's metrics ({'acc': 0.5, ...}, standard errors left out) and how many examples it scored."""
    import contextlib
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=batch_size)
    off = target.model.disable_adapter() if target.is_adapter and not use_adapter else contextlib.nullcontext()
    started = time.perf_counter()
    with off:
        # The tasks come built: a manager that indexes no task files, where simple_evaluate's own would index
        # lm-eval's built-in ones again for every model evaluated (16 s each on a 2-core CPU).
        output = lm_eval.simple_evaluate(model=model, tasks=list(tasks.values()), limit=limit, bootstrap_iters=0,
                                         log_samples=False, task_manager=_task_manager(include_defaults=False))
    seconds = round(time.perf_counter() - started, 2)
    results = {}
    for task, values in output["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and kind:
                metrics[metric if kind == "none" else f"{metric} ({kind})"] = value
        if "sample_len" in values:
            metrics["examples"] = values["sample_len"]
        results[task] = metrics
    return {"tasks": results, "seconds": seconds}
