"""Supervised fine-tuning: TRL's SFTConfig from the recipe's training section, and its SFTTrainer.

TRL does the tokenizing, loss masking and packing; what lora sets by default, and why, is commented where it is set.
"""

from pathlib import Path

import jinja2
import torch
from transformers import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from lora_cli.checkpoints import CHECKPOINTS
from lora_cli.data import template_error
from lora_cli.divergence import StopOnNonFiniteWeights
from lora_cli.errors import LoraError
from lora_cli.models import has_accelerator, pick_dtype
from lora_cli.reporting import ProgressAndMetrics
from lora_cli.speed.policy import gpu_speed_defaults


def sft_config(recipe, out: Path, assistant_only_loss: bool, model):
    """SFTConfig from the recipe's training section; precision follows the hardware unless the recipe says."""
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
    # Trainer does for PEFT models), and speed/checkpointing.py's offloaded checkpointing, reentrant, requires that.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    # The Trainer's NaN filter reads every step's loss back from the device, a sync that leaves a GPU idle while
    # the next step's Python runs. A NaN loss shows as NaN in the log instead, and StopOnNonFiniteWeights stops the run.
    kwargs.setdefault("logging_nan_inf_filter", False)
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise LoraError(f"training: TRL's SFTConfig rejects these options: {' '.join(str(e).split())}") from None


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks=()):
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
