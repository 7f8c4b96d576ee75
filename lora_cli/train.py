"""`lora train`: recipe -> data -> base model -> LoraConfig + SFTConfig -> TRL's SFTTrainer -> output folder.

Read top to bottom, `train()` is the whole run. The output folder gets its adapter only when the run has
finished: the final files are written to a staging folder and renamed into place, adapter last. A checkpoint
counts only once it is complete, and --resume continues only the run that wrote it (checkpoints.py).
"""

import os
import shutil
import time
from pathlib import Path

from accelerate import PartialState
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from lora_cli import data as data_mod
from lora_cli.checkpoints import (
    CompleteCheckpoints,
    check_resume,
    complete_checkpoints,
    remove_checkpoints_after,
    resume_note,
    run_identity,
    step_of,
)
from lora_cli import trackers
from lora_cli.errors import LoraError
from lora_cli.evaluate.run import read_recipe_eval, run_recipe_eval
from lora_cli.models import has_accelerator, hide_library_notices, load_base_for_recipe, pick_dtype
from lora_cli.reporting import drop_metrics_after
from lora_cli.speed import gpu_speed_defaults, step_memory_plan, trim_step_overhead, use_own_kernels

FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json")  # renamed into place last, in this order
CHECKPOINTS = "checkpoints"


def train(recipe, resume: bool = False, overwrite: bool = False, force: bool = False, dry_run: bool = False,
          callbacks=()) -> dict:
    """Run a recipe; returns the summary (also printed). Raises LoraError for anything the user can fix.

    `callbacks` are extra transformers TrainerCallbacks, for Python callers such as the benchmarks.
    """
    quiet_libraries()
    out = Path(recipe.output_dir)
    check_output_dir(out, resume, overwrite, dry_run)
    train_records, eval_records, fmt = data_mod.load_data(recipe.data)
    eval_inputs = read_recipe_eval(recipe.eval) if recipe.eval else None  # its files checked before training

    if recipe.distributed == "fsdp" and recipe.quantization and not recipe.quantization.bnb_4bit_quant_storage:
        # FSDP shards flat parameters of one dtype: 4-bit weights stored as the compute dtype can be sharded.
        recipe.quantization.bnb_4bit_quant_storage = str(pick_dtype(recipe.model.dtype)).removeprefix("torch.")
    model, tokenizer, model_path = load_base_for_recipe(recipe)
    prepared = data_mod.prepare_for_trl(train_records, eval_records, fmt, tokenizer, recipe.data, recipe.training["seed"])
    peft_config = lora_config(recipe.lora, model)
    args = sft_config(recipe, out, prepared.assistant_only_loss, model)
    completion = CompleteCheckpoints(run_identity(recipe, train_records, eval_records), args)  # kill -9 safe saves
    out_existed = out.exists()
    process = PartialState()  # one process, or one of several under accelerate: only the main one writes
    try:
        trainer = build_trainer(model, tokenizer, args, prepared, peft_config, out, [completion, *callbacks])
        kernels = use_own_kernels(trainer, recipe)
        trim_step_overhead(trainer)
        report = data_mod.audit(trainer, prepared.train, args.max_length)
        report["chat_template_note"] = prepared.chat_template_note
        report["format"] = fmt
        if process.is_main_process:
            print(data_mod.format_audit(report), flush=True)
        data_mod.check_audit(report)
        trackers.attach(trainer, recipe, report, out)
        if process.is_main_process:
            print_trainable(trainer.model)
            print(f"precision and speed: bf16={args.bf16} fp16={args.fp16} gradient_checkpointing="
                  f"{args.gradient_checkpointing} use_liger_kernel={args.use_liger_kernel} packing={args.packing} {kernels}")
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
        _write_json(out / "data_audit.json", report)
    process.wait_for_everyone()

    started = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    summary = finish(trainer, recipe, out, model_path, report, fmt, time.time() - started)
    if eval_inputs is not None and trainer.is_world_process_zero():
        del trainer, model  # lora eval loads the adapter from the output folder, as a user's `lora eval` would
        summary["eval"] = run_recipe_eval(recipe.eval, eval_inputs, out)
    return summary


def quiet_libraries() -> None:
    """Our progress bar and audit say what matters; the libraries' per-map bars and renaming notices do not."""
    import datasets

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


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules matches), lm_head excluded."""
    import torch

    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    names.discard("lm_head")
    return sorted(names)


def lora_config(section, model):
    """PEFT's LoraConfig from the recipe, with target modules checked against the loaded model."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    available = linear_module_names(model)
    targets = section.target_modules
    model_type = model.config.model_type
    if targets is None and model_type not in DEFAULT_TARGETS:
        raise LoraError(
            f"lora.target_modules: PEFT has no default target modules for the '{model_type}' architecture; "
            f"set lora.target_modules to all-linear or a list from the model's linear layers: {', '.join(available)}."
        )
    if isinstance(targets, list):
        missing = [t for t in targets if t not in available]
        if missing:
            raise LoraError(
                f"lora.target_modules: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a linear "
                f"layer of this model. Its linear layers are: {', '.join(available)} (or write all-linear)."
            )
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        bias=section.bias,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        modules_to_save=section.modules_to_save,
        task_type="CAUSAL_LM",
    )


def sft_config(recipe, out: Path, assistant_only_loss: bool, model):
    """SFTConfig from the recipe's training section; precision follows the hardware unless the recipe says."""
    import torch
    from trl import SFTConfig

    kwargs = dict(recipe.training)
    kwargs["output_dir"] = str(out / CHECKPOINTS)
    kwargs.setdefault("assistant_only_loss", assistant_only_loss)
    compute_dtype = pick_dtype(recipe.model.dtype)
    # TRL turns bf16 autocast on by default; on a CPU (fp32 unless the recipe says) that is about 15x slower.
    kwargs.setdefault("bf16", compute_dtype == torch.bfloat16)
    if not has_accelerator():
        kwargs.setdefault("fp16", False)
        kwargs.setdefault("dataloader_pin_memory", False)
        kwargs.setdefault("use_cpu", True)  # also what makes several CPU processes (torchrun) train as one, on gloo
    else:
        kwargs.setdefault("fp16", compute_dtype == torch.float16)
        for key, value in gpu_speed_defaults(model, recipe, kwargs).items():
            kwargs.setdefault(key, value)
    kwargs.setdefault("disable_tqdm", True)  # our own progress bar replaces it
    # Every adapter weight takes part in every step, so DDP need not search the graph for unused ones (the
    # Trainer does for PEFT models), and kernels.py's offloaded checkpointing, reentrant, requires that.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    # The Trainer's NaN filter reads every step's loss back from the device, a sync that leaves a GPU idle while
    # the next step's Python runs. A NaN loss shows as NaN in the log instead, and StopOnNonFiniteWeights stops the run.
    kwargs.setdefault("logging_nan_inf_filter", False)
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise LoraError(f"training: TRL's SFTConfig rejects these options: {' '.join(str(e).split())}") from None


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks=()):
    import jinja2
    from trl import SFTTrainer

    from lora_cli.reporting import ProgressAndMetrics

    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[ProgressAndMetrics(out / "metrics.jsonl"), StopOnNonFiniteWeights(), *callbacks],
        )
    except ValueError as e:  # TRL's checks of option combinations, phrased for users already
        raise LoraError(f"training: {' '.join(str(e).split())}") from None
    except jinja2.TemplateError as e:  # TRL applies the chat template to every example here
        raise LoraError(template_error(e, prepared.chat_template_source)) from None
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; our progress bar shows them
    trainer.remove_callback(ProgressCallback)
    if getattr(model, "is_loaded_in_4bit", False) and not has_accelerator():
        # TRL casts QLoRA adapters to bf16 (the paper's GPU recipe); on a CPU bf16 matmuls are far slower than fp32.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def template_error(error, source: str) -> str:
    import jinja2

    message = " ".join(str(error.message or error).split()).rstrip(".")
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"{source} cannot be read: {message} (template line {error.lineno})."
    return (f"{source} failed on the training data: {message}. Check that the conversations have the roles and "
            "order this template expects, or set data.chat_template.")


class StopOnNonFiniteWeights(TrainerCallback):
    """Stops the run when the adapter weights stop being finite (a NaN/inf loss), before a bad checkpoint is saved.

    Trainer saves after on_step_end, so checking here keeps every saved checkpoint finite. The check waits for the
    device, so it runs only on the steps that log, evaluate or save and on the last one: weights that are no longer
    finite stay so (NaN spreads through every later update), and between those steps nothing is written.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        import torch

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


def memory_plan_text(recipe, args, peft_model) -> str:
    """lora inspect-params' memory plan for this recipe's step, its row marked (an estimate for GPUs)."""
    from lora_cli.inspect import format_memory_plan

    plan = step_memory_plan(peft_model, recipe, args)
    method = "qlora" if recipe.quantization and recipe.quantization.load_in_4bit else "lora"
    return format_memory_plan(plan, highlight=(method, bool(args.gradient_checkpointing)))


def print_trainable(model) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def portable_base_name(recipe, model_path: str) -> str:
    """What adapter_config.json records as the base: the hub id for the embedded model, else as resolved."""
    from lora_cli.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME

    name = recipe.model.name_or_path
    if name.lower() == EMBEDDED_NAME or name == EMBEDDED_HUB_ID:
        return EMBEDDED_HUB_ID
    return model_path


def finish(trainer, recipe, out: Path, model_path: str, report: dict, fmt: str, wall: float) -> dict:
    """Write the adapter and everything beside it; only the main process writes."""
    from lora_cli import reporting

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
    base_name = portable_base_name(recipe, model_path)
    _set_base_name(staging / "adapter_config.json", base_name)  # after saving: PEFT would look the name up
    _write_recipe(staging / "recipe.yaml", recipe)
    _write_json(staging / "train_summary.json", {k: v for k, v in summary.items() if k != "metrics"})
    reporting.plot_losses(records, staging / "loss.png")
    (staging / "README.md").write_text(reporting.model_card(recipe, base_name, summary, report), encoding="utf-8")
    for path in sorted(staging.iterdir(), key=lambda p: FINAL_FILES.index(p.name) if p.name in FINAL_FILES else -1):
        os.replace(path, out / path.name)
    staging.rmdir()
    print(reporting.format_summary(summary), flush=True)
    return summary


def _set_base_name(config_path: Path, base_name: str) -> None:
    import json

    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("lora-cli", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _write_recipe(path: Path, recipe) -> None:
    import yaml

    resolved = recipe.to_dict()
    resolved["versions"] = library_versions()
    path.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _write_json(path: Path, value) -> None:
    import json

    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable), encoding="utf-8")


def _jsonable(value):
    return str(value)
