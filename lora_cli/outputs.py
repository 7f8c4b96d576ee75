"""The output folder of a run: the adapter and everything beside it, written so that a folder with an adapter is
always a finished run. The files go to a staging folder first and are renamed into place, the adapter last
(FINAL_FILES); only the main process writes.
"""

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from lora_cli import reporting
from lora_cli.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME

FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json")  # renamed into place last, in this order
REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a continued adapter


def portable_base_name(recipe, model_path: str) -> str:
    """What adapter_config.json records as the base: the hub id for the embedded model, else as resolved."""
    name = recipe.model.name_or_path
    if name.lower() == EMBEDDED_NAME or name == EMBEDDED_HUB_ID:
        return EMBEDDED_HUB_ID
    return model_path


def finish(trainer, recipe, out: Path, model_path: str, report: dict, fmt: str, wall: float) -> dict:
    """Write the adapter and everything beside it; only the main process writes."""
    state = trainer.state
    records = reporting.read_metrics(out / "metrics.jsonl")
    peak, peak_kind = reporting.peak_memory_gib()
    tokens = trainer._total_train_tokens if hasattr(trainer, "_total_train_tokens") else 0
    summary = {
        "output_dir": str(out),
        "steps": state.global_step,
        "wall_seconds": wall,
        "tokens": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "peak_gib": peak,
        "peak_kind": peak_kind,
        "final": reporting.final_losses(records),
        "data_format": fmt,
        "metrics": records,
    }
    staging = out / ".staging"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    trainer.accelerator.wait_for_everyone()
    # Every process takes part (FSDP gathers the sharded adapter here); only the main one writes.
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return summary
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml says the same, safely
    # TRL's frozen reference copy of a continued adapter (methods/dpo.py) is saved as a second adapter; the start
    # adapter's own folder holds it already.
    shutil.rmtree(staging / REFERENCE_ADAPTER, ignore_errors=True)
    base_name = portable_base_name(recipe, model_path)
    _set_base_name(staging / "adapter_config.json", base_name)  # after saving: PEFT would look the name up
    _write_recipe(staging / "recipe.yaml", recipe)
    write_json(staging / "train_summary.json", {k: v for k, v in summary.items() if k != "metrics"})
    reporting.plot_losses(records, staging / "loss.png", recipe.method)
    (staging / "README.md").write_text(reporting.model_card(recipe, base_name, summary, report), encoding="utf-8")
    for path in sorted(staging.iterdir(), key=lambda p: FINAL_FILES.index(p.name) if p.name in FINAL_FILES else -1):
        os.replace(path, out / path.name)
    staging.rmdir()
    print(reporting.format_summary(summary), flush=True)
    return summary


def _set_base_name(config_path: Path, base_name: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def library_versions() -> dict:
    found = {}
    for name in ("lora-cli", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _write_recipe(path: Path, recipe) -> None:
    resolved = recipe.to_dict()
    resolved["versions"] = library_versions()
    path.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable), encoding="utf-8")


def _jsonable(value):
    return str(value)
