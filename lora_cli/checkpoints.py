"""Checkpoints that survive kill -9, and a --resume that refuses to continue a different run.

Why our own code: transformers' Trainer writes checkpoint-N in place, file by file, and then deletes old
checkpoints (save_total_limit). A kill between two of those writes leaves a folder that looks like a checkpoint
but lacks its optimizer or holds a truncated file, and Trainer's resume would load it. So:

- After Trainer has written every file of checkpoint-N, we write `lora_complete.json` into it, last and atomically
  (a temporary name, then os.replace), listing each file with its size. A checkpoint counts only when its marker
  is there and every listed file has its recorded size. A kill between any two writes therefore leaves either a
  complete checkpoint or one that --resume ignores (and the next save deletes).
- Why a marker rather than writing checkpoint-N under a temporary name and renaming it: Trainer names the folder
  and writes into it itself (under DDP each process adds its own RNG state), so renaming would mean replacing
  Trainer's private `_save_checkpoint`. The marker needs only the public `on_save` callback.
- We take over save_total_limit: Trainer deletes old checkpoints before `on_save`, that is before the new one is
  marked, so with a limit of 1 a kill at that moment would leave no complete checkpoint. We delete only after
  the marker is written, and delete a checkpoint's marker before its files.

The marker also records what the run was (the resolved recipe and the data's fingerprint); --resume compares it,
and the checkpoint's adapter_config.json, with the run it is asked to continue.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from lora_cli.errors import LoraError
from lora_cli.recipe import EvalSection, SpeedSection

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, inside its output folder
MARKER = "lora_complete.json"
PREFIX = "checkpoint-"
# Settings that change how a run is watched or stored, not what it learns: --resume accepts a change to these.
# Everything else needs --resume --force; max_steps and num_train_epochs too, as they set the learning-rate
# schedule, so a resumed run with a new length is no longer the run that was started.
RESUME_MAY_DIFFER = (
    "output_dir", "training.logging_steps", "training.logging_first_step", "training.save_steps",
    "training.save_total_limit", "training.report_to", "training.run_name", "training.disable_tqdm",
    "training.eval_steps", "training.per_device_eval_batch_size", "training.dataloader_num_workers",
    # The speed section says how a step is computed, not what it computes (tests/speed/): switching a
    # lever may speed a resume up.
    *(f"speed.{field.name}" for field in dataclasses.fields(SpeedSection)),
    # What is measured once the adapter is written.
    *(f"eval.{field.name}" for field in dataclasses.fields(EvalSection)),
)
# adapter_config.json keys compared on --resume, under the recipe names a user edits.
ADAPTER_KEYS = {
    "r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "target_modules": "lora.target_modules",
    "bias": "lora.bias", "use_rslora": "lora.use_rslora", "use_dora": "lora.use_dora",
    "modules_to_save": "lora.modules_to_save",
}
# Changes that give the adapter other weights (shapes, layers): the checkpoint cannot be loaded, --force or not.
STRUCTURAL = ("lora.r", "lora.target_modules", "lora.use_dora", "lora.modules_to_save", "lora.bias")


def checkpoint_folders(folder: Path) -> list[Path]:
    """Every checkpoint-N folder, complete or not, in step order (none where the folder went away while listed)."""
    try:
        found = [p for p in Path(folder).glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    except FileNotFoundError:  # Python 3.11's glob checks that the folder is there, then lists it
        return []
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def read_marker(checkpoint: Path) -> dict | None:
    """The checkpoint's marker if the checkpoint is complete (every listed file there, at its size), else None."""
    try:
        marker = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files or marker.get("step") != step_of(checkpoint):
        return None
    for name, size in files.items():
        try:
            if (checkpoint / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def complete_checkpoints(folder: Path) -> list[Path]:
    return [p for p in checkpoint_folders(folder) if read_marker(p) is not None]


def write_atomically(path: Path, text: str) -> None:
    """Write a file so that it is either absent, the old version or the whole new one, whenever a kill lands."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def remove_checkpoint(checkpoint: Path) -> None:
    (checkpoint / MARKER).unlink(missing_ok=True)  # first, so a kill mid-delete leaves nothing that looks complete
    shutil.rmtree(checkpoint, ignore_errors=True)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written it, then keeps save_total_limit complete ones."""

    def __init__(self, identity: dict, args):
        self.identity = identity
        self.keep = args.save_total_limit
        args.save_total_limit = None  # we delete old checkpoints ourselves, after the new one is marked complete

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # under DDP every process writes its RNG state into the checkpoint
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir)
        checkpoint = folder / f"{PREFIX}{state.global_step}"
        if not checkpoint.is_dir():
            return
        files = {
            str(p.relative_to(checkpoint)): p.stat().st_size
            for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and not p.name.startswith(MARKER)
        }
        marker = {"step": state.global_step, "files": files, "run": self.identity}
        write_atomically(checkpoint / MARKER, json.dumps(marker, indent=1, default=str))
        self.rotate(folder, state.best_model_checkpoint)

    def rotate(self, folder: Path, best: str | None) -> None:
        complete = complete_checkpoints(folder)
        for checkpoint in checkpoint_folders(folder):
            if checkpoint not in complete:
                remove_checkpoint(checkpoint)  # left by a run that was stopped while writing it
        if not complete or not self.keep or self.keep <= 0:
            return
        protected = {complete[-1].resolve()} | ({Path(best).resolve()} if best else set())
        extra = len(complete) - max(self.keep, len(protected))
        for checkpoint in complete:
            if extra <= 0:
                break
            if checkpoint.resolve() not in protected:
                remove_checkpoint(checkpoint)
                extra -= 1


def fingerprint(records) -> str:
    """sha256 of the converted examples: changes when the data does, not when the file moves."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()[:16]


def flatten(value, prefix: str = "") -> dict:
    """{'lora': {'r': 16}} -> {'lora.r': 16}, leaving out None values."""
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat
    return {} if value is None else {prefix[:-1]: value}


def run_identity(recipe, train_records, eval_records) -> dict:
    """What a checkpoint must share with the run that resumes it, as flat dotted keys (JSON values).

    The lora section is left out here: the checkpoint's own adapter_config.json is compared instead. The data files'
    paths are left out too: their contents are compared, by fingerprint.
    """
    flat = flatten(recipe.to_dict())
    flat = {k: v for k, v in flat.items() if not k.startswith("lora.") and k not in RESUME_MAY_DIFFER}
    flat.pop("data.train", None)
    if isinstance(recipe.data.eval, str):
        flat.pop("data.eval", None)
    flat["data.train contents"] = fingerprint(train_records)
    if eval_records is not None:
        flat["data.eval contents"] = fingerprint(eval_records)
    return json.loads(json.dumps(flat, default=str))


def adapter_identity(config: dict) -> dict:
    found = {}
    for key, label in ADAPTER_KEYS.items():
        value = config.get(key)
        if isinstance(value, (list, tuple, set)):
            # PEFT records all-linear as full module paths: compare the layer names a recipe would list.
            value = sorted({str(v).split(".")[-1] for v in value}) if key == "target_modules" else sorted(value)
        if value is not None:
            found[label] = value
    return json.loads(json.dumps(found, default=str))


def _show(value) -> str:
    if value is None:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value)


def differences(before: dict, now: dict, limit: int = 10) -> list[str]:
    changed = [f"{k}: {_show(before.get(k))} -> {_show(now.get(k))}"
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    if len(changed) > limit:
        changed = changed[:limit] + [f"and {len(changed) - limit} more"]
    return changed


def check_resume(checkpoint: Path, identity: dict, model, force: bool) -> list[str]:
    """Raise unless the checkpoint was saved by the run being resumed (or force); returns what differs."""
    marker = read_marker(checkpoint) or {}
    try:
        saved_adapter = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved_adapter = {}
    live = getattr(model, "peft_config", {}).get("default")
    before = {**marker.get("run", {}), **adapter_identity(saved_adapter)}
    now = {**identity, **adapter_identity(live.to_dict() if live is not None else {})}
    changed = differences(before, now)
    structural = [line for line in changed if line.split(":")[0] in STRUCTURAL]
    if force and structural:
        raise LoraError(
            f"--resume --force: {checkpoint} holds an adapter of another shape, so it cannot be loaded: "
            f"{'; '.join(structural)}. Undo the change, or train into a new --output-dir."
        )
    if changed and not force:
        raise LoraError(
            f"--resume: {checkpoint} was saved by a run with other settings, so resuming would not continue that run. "
            f"What changed (checkpoint -> now): {'; '.join(changed)}. Undo the change, train into a new --output-dir, "
            "or pass --resume --force to continue the run with the new settings."
        )
    return changed


def remove_checkpoints_after(checkpoint: Path) -> list[str]:
    """Before resuming from the newest complete checkpoint: the newer ones are incomplete, so they go.

    Left in place, Trainer would write the same step into one of them, file by file, under its old marker.
    """
    newer = [p for p in checkpoint_folders(checkpoint.parent) if step_of(p) > step_of(checkpoint)]
    for folder in newer:
        remove_checkpoint(folder)
    return [p.name for p in newer]


def resume_note(checkpoint: Path, removed: list[str], changed: list[str]) -> str:
    """The line printed when a run resumes: from where, what it dropped, and what --force let through."""
    note = f"Resuming from {checkpoint}."
    if removed:
        them = "them" if len(removed) > 1 else "it"
        note += f" Removed {', '.join(removed)}: incomplete, the run was stopped while writing {them}."
    if changed:
        note += f" --force: continuing although these settings changed: {'; '.join(changed)}."
    return note
