"""What `lora eval` and a recipe's `eval:` section run: read the inputs, load each side once, measure, report.

Sides: the target; with --compare-base its base (an adapter's own base through PEFT's disable_adapter() on the same
weights, or for a model target the model --base names, loaded after the target is freed); and for an adapter trained
on top of another (`model.adapter` in its recipe.yaml) the starting adapter, loaded on its own with the base.
"""

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import LoraError

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class EvalRequest:
    data: str | None = None  # loss and perplexity on this dataset
    answers: str | None = None  # questions with expected answers
    match: str = "contains"  # the answers' match mode where a row names none
    tasks: list[str] = field(default_factory=list)  # lm-eval task names or task YAML files
    limit: int | None = None  # lm-eval: examples per task
    compare_base: bool = False
    base: str | None = None  # an adapter's base instead of its own; for a model target, the model to compare with
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def check(self) -> None:
        if not (self.data or self.answers or self.tasks):
            raise LoraError("lora eval needs something to measure: --data FILE (loss and perplexity), --answers FILE "
                            "(questions with expected answers) or --tasks T1,T2 (lm-evaluation-harness).")
        if self.batch_size < 1:
            raise LoraError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.max_new_tokens < 1:
            raise LoraError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}.")
        if self.limit is not None and (self.limit < 1 or not self.tasks):
            raise LoraError("--limit is the number of examples per lm-eval task: a positive number, with --tasks.")


@dataclass
class Inputs:
    """Everything read from the user's files, checked before any weights load."""

    loss_data: tuple | None = None  # (records, format)
    questions: list | None = None
    tasks: dict | None = None


def read_inputs(request: EvalRequest) -> Inputs:
    from lora_cli.evaluate import answers, harness, loss

    request.check()
    answers.check_match_mode(request.match, "--match")
    return Inputs(
        loss_data=loss.read_loss_data(request.data) if request.data else None,
        questions=answers.read_answers(request.answers, request.match) if request.answers else None,
        tasks=harness.load_tasks(harness.split_tasks(request.tasks)) if request.tasks else None,
    )


def saved_recipe(folder: Path) -> dict:
    """An adapter folder's recipe.yaml as written by lora train ({} for adapters made elsewhere)."""
    import yaml

    path = folder / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LoraError(f"{path} cannot be read: {e}.") from None
    return recipe if isinstance(recipe, dict) else {}


def starting_adapter(folder: Path) -> str | None:
    """The adapter a chained adapter was trained on top of: model.adapter in its recipe.yaml."""
    start = (saved_recipe(folder).get("model") or {}).get("adapter")
    if not start:
        return None
    for candidate in (Path(start).expanduser(), folder.parent / start):
        if candidate.is_dir():
            return str(candidate)
    raise LoraError(f"{folder / 'recipe.yaml'}: model.adapter names the starting adapter '{start}', which does not "
                    "exist here; --compare-base evaluates it too, so copy it back or leave out --compare-base.")


def evaluate(target: str, request: EvalRequest, inputs: Inputs | None = None) -> dict:
    """The report: each side's metrics under 'target', 'base' and, for chained adapters, 'start'."""
    from lora_cli.evaluate.report import add_changes
    from lora_cli.generate import target_kind

    is_adapter = target_kind(target) == "adapter"  # a TARGET that is no model fails here, before the inputs are read
    inputs = inputs or read_inputs(request)
    if request.compare_base and not is_adapter and not request.base:
        raise LoraError(f"--compare-base: '{target}' is a model, not an adapter, so it has no base of its own; name "
                        "the model to compare it with: --base NAME.")
    start = starting_adapter(Path(target).expanduser()) if is_adapter and request.compare_base else None
    trained_with = saved_recipe(Path(target).expanduser()) if is_adapter else {}
    max_length = (trained_with.get("training") or {}).get("max_length", 1024)  # the run's truncation, or TRL's default

    def measure(loaded, role: str, use_adapter: bool = True) -> dict:
        name = loaded.name if use_adapter else loaded.base
        _say(f"Measuring the {role} ({name}) ...")
        return measure_side(loaded, name, inputs, request, max_length, use_adapter)

    report = {}
    loaded = _load(target, request.base if is_adapter else None)
    report["target"] = measure(loaded, "target")
    if request.compare_base and not start and is_adapter:
        report["base"] = measure(loaded, "base", use_adapter=False)
    _free(loaded)
    if start:
        loaded = _load(start, request.base)
        report["start"] = measure(loaded, "starting adapter")
        report["base"] = measure(loaded, "base", use_adapter=False)
        _free(loaded)
    elif request.compare_base and not is_adapter:
        loaded = _load(request.base, None)
        report["base"] = measure(loaded, "base")
        _free(loaded)
    add_changes(report)
    report["inputs"] = {"data": request.data, "answers": request.answers, "tasks": list(request.tasks or []),
                        "limit": request.limit, "max_new_tokens": request.max_new_tokens,
                        "batch_size": request.batch_size, "loss_max_length": max_length}
    return report


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stderr: stdout is the report (--json)


def _load(name: str, base: str | None):
    from lora_cli.generate import load_target

    _say(f"Loading {name} ...")
    return load_target(name, base)


def _free(loaded) -> None:
    """Drop a loaded model before the next loads, so two never share the memory."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_side(loaded, name: str, inputs: Inputs, request: EvalRequest, max_length, use_adapter: bool) -> dict:
    from lora_cli.generate import Sampling

    side = {"model": name, "seconds": {}}
    if inputs.loss_data is not None:
        from lora_cli.evaluate.loss import data_loss

        records, fmt = inputs.loss_data
        result = data_loss(loaded, records, fmt, request.batch_size, max_length, use_adapter)
        side.update(loss=result["loss"], perplexity=result["perplexity"], tokens_scored=result["tokens"],
                    examples=result["examples"])
        side["seconds"]["loss"] = result["seconds"]
    if inputs.questions is not None:
        from lora_cli.evaluate.answers import answer_questions

        result = answer_questions(loaded, inputs.questions, request.batch_size,
                                  Sampling(max_new_tokens=request.max_new_tokens), use_adapter)
        side.update(accuracy=result["accuracy"], correct=result["correct"], questions=result["questions"],
                    answer_tokens=result["answer_tokens"], answers=result["rows"])
        side["seconds"]["answers"] = result["seconds"]
    if inputs.tasks is not None:
        from lora_cli.evaluate.harness import run_tasks

        result = run_tasks(loaded, inputs.tasks, request.limit, request.batch_size, use_adapter)
        side["tasks"] = result["tasks"]
        side["seconds"]["tasks"] = result["seconds"]
    return side


def _request_from_recipe(section) -> EvalRequest:
    return EvalRequest(data=section.data, answers=section.answers, match=section.match, tasks=section.tasks or [],
                       limit=section.limit, compare_base=section.compare_base, batch_size=section.batch_size,
                       max_new_tokens=section.max_new_tokens)


def read_recipe_eval(section) -> Inputs:
    """A recipe's eval section, read and checked before training starts."""
    return read_inputs(_request_from_recipe(section))


def run_recipe_eval(section, inputs: Inputs, out: Path) -> dict:
    """After lora train: lora eval on the new adapter; eval.json and a table in the model card, in the output folder."""
    from lora_cli.evaluate.report import add_to_model_card, format_table, write_json

    gc.collect()  # the trainer's model, released by the caller
    report = evaluate(str(out), _request_from_recipe(section), inputs)
    write_json(out / "eval.json", report)
    add_to_model_card(out / "README.md", report)
    print(format_table(report), flush=True)
    return report
