"""`lora train`: recipe -> data -> base model -> LoraConfig + the method's TRL config -> its TRL trainer -> output folder.

Read top to bottom, `train()` is the whole run, for every method (sft, dpo, orpo, simpo, kto, grpo): the method's
data, config and trainer (methods/), the GPU levers (speed/), the data audit, then training. The output folder gets its adapter only when the run has finished (outputs.py). A checkpoint
counts only once it is complete, and --resume continues only the run that wrote it (checkpoints.py).
"""

import shutil
import time
from pathlib import Path

import datasets
from accelerate import PartialState

from lora_cli import methods
from lora_cli.adapters import lora_config
from lora_cli.checkpoints import (
    CHECKPOINTS,
    CompleteCheckpoints,
    check_resume,
    complete_checkpoints,
    remove_checkpoints_after,
    resume_note,
    run_identity,
    step_of,
)
from lora_cli.errors import LoraError
from lora_cli.evaluate.run import read_recipe_eval, run_recipe_eval
from lora_cli.library_fixes import fix_for_training
from lora_cli.memory.report import format_memory_plan
from lora_cli.models import hide_library_notices, load_base_for_recipe, pick_dtype
from lora_cli.outputs import finish, write_json
from lora_cli.reporting import drop_metrics_after
from lora_cli.speed.policy import check_memory_before_loading, step_memory_plan
from lora_cli.speed.step_overhead import trim_step_overhead
from lora_cli.speed.wiring import use_own_kernels
from lora_cli.trackers.run import attach_trackers


def train(recipe, resume: bool = False, overwrite: bool = False, force: bool = False, dry_run: bool = False,
          callbacks=()) -> dict:
    """Run a recipe; returns the summary (also printed). Raises LoraError for anything the user can fix.

    `callbacks` are extra transformers TrainerCallbacks, for Python callers such as the benchmarks.
    """
    quiet_libraries()
    out = Path(recipe.output_dir)
    check_output_dir(out, resume, overwrite, dry_run)
    method = methods.steps(recipe.method)
    train_records, eval_records, fmt = method.load_data(recipe)
    eval_inputs = read_recipe_eval(recipe.eval) if recipe.eval else None  # its files checked before training

    if recipe.distributed == "fsdp" and recipe.quantization and not recipe.quantization.bnb_4bit_quant_storage:
        # FSDP shards flat parameters of one dtype: 4-bit weights stored as the compute dtype can be sharded.
        recipe.quantization.bnb_4bit_quant_storage = str(pick_dtype(recipe.model.dtype)).removeprefix("torch.")
    memory = check_memory_before_loading(recipe)  # refuses here what would exhaust host or GPU memory
    model, tokenizer, model_path = load_base_for_recipe(recipe)  # with model.adapter attached, to keep training
    fix_for_training(model)
    prepared = method.prepare(train_records, eval_records, fmt, tokenizer, recipe)
    peft_config = None if recipe.model.adapter else lora_config(recipe.lora, model)
    args = method.trl_config(recipe, out, prepared, model)
    completion = CompleteCheckpoints(run_identity(recipe, train_records, eval_records), args)  # kill -9 safe saves
    out_existed = out.exists()
    process = PartialState()  # one process, or one of several under accelerate: only the main one writes
    try:
        trainer = method.build_trainer(model, tokenizer, args, prepared, peft_config, out, [completion, *callbacks],
                                       recipe)
        kernels = use_own_kernels(trainer, recipe, memory)
        trim_step_overhead(trainer, recipe.method)
        report = method.audit(trainer, prepared, args)
        if process.is_main_process:
            print(method.format_audit(report), flush=True)
        method.check_audit(report)
        attach_trackers(trainer, recipe, report, out)
        if process.is_main_process:
            print(f"method: {method_line(recipe)}", flush=True)
            print_trainable(trainer.model)
            print(f"precision and speed: bf16={args.bf16} fp16={args.fp16} gradient_checkpointing="
                  f"{args.gradient_checkpointing} use_liger_kernel={args.use_liger_kernel} "
                  f"packing={getattr(args, 'packing', False)} {kernels}")
            print(memory_plan_text(recipe, args, trainer.model), flush=True)
    finally:
        if process.is_main_process and (dry_run or not out_existed):
            remove_empty_folders(out)  # transformers creates the checkpoint folder up front
    if dry_run:
        print("Dry run: the recipe, data and model are valid; nothing was trained or written.")
        return {"dry_run": True, "audit": report}

    checkpoint = newest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise LoraError(f"--resume: there is no checkpoint in '{out / CHECKPOINTS}' to resume from (one that was "
                        "written completely).")
    if checkpoint is not None:
        changed = check_resume(checkpoint, completion.identity, trainer.model, force)
        if trainer.is_world_process_zero():
            removed = remove_checkpoints_after(checkpoint)
            drop_metrics_after(out / "metrics.jsonl", step_of(checkpoint))  # the steps after it are trained again
            print(resume_note(checkpoint, removed, changed), flush=True)
    if process.is_main_process:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "data_audit.json", report)
    process.wait_for_everyone()

    started = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    summary = finish(trainer, recipe, out, model_path, report, fmt, time.time() - started)
    if eval_inputs is not None and trainer.is_world_process_zero():
        del trainer, model  # lora eval loads the adapter from the output folder, as a user's `lora eval` would
        summary["eval"] = run_recipe_eval(recipe.eval, eval_inputs, out)
    return summary


def method_line(recipe) -> str:
    """What trains, against what: the line printed before training."""
    reference = {"dpo": True, "kto": True, "grpo": recipe.training.get("beta", 0) != 0}.get(recipe.method, False)
    start = f"continues the adapter {recipe.model.adapter}" if recipe.model.adapter else "a new adapter"
    line = f"{recipe.method}, {start}"
    if reference:
        line += (", against that adapter as loaded (frozen) as the reference" if recipe.model.adapter
                 else ", against the base (the adapter disabled) as the reference")
    if recipe.method in ("orpo", "simpo"):
        line += f" (no reference model; TRL's experimental {'ORPOTrainer' if recipe.method == 'orpo' else 'CPOTrainer'})"
    return line


def quiet_libraries() -> None:
    """Our progress bar and audit say what matters; the libraries' per-map bars and renaming notices do not."""
    datasets.disable_progress_bars()
    hide_library_notices()


def check_output_dir(out: Path, resume: bool, overwrite: bool, dry_run: bool) -> None:
    if resume and overwrite:
        raise LoraError("--resume and --overwrite contradict each other: resume continues the run, overwrite deletes it.")
    if out.exists() and not out.is_dir():
        raise LoraError(f"The output folder '{out}' is a file; set output_dir (or --output-dir) to a folder.")
    if dry_run or resume or overwrite:
        return
    if out.exists() and any(out.iterdir()):
        raise LoraError(
            f"The output folder '{out}' is not empty. Use --resume to continue the run in it, --overwrite to "
            "replace it, or --output-dir to write elsewhere."
        )


def remove_empty_folders(root: Path) -> None:
    """Remove root and the folders under it if they hold no file at all; never deletes a file."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def newest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that was completely written (see checkpoints.py); a partial one is never resumed."""
    complete = complete_checkpoints(out / CHECKPOINTS)
    return complete[-1] if complete else None


def memory_plan_text(recipe, args, peft_model) -> str:
    """lora inspect-params' memory plan for this recipe's step, its row marked (an estimate for GPUs)."""
    plan = step_memory_plan(peft_model, recipe, args)
    method = "qlora" if recipe.quantization and recipe.quantization.load_in_4bit else "lora"
    return format_memory_plan(plan, highlight=(method, bool(args.gradient_checkpointing)))


def print_trainable(model) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


