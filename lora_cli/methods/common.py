"""What every method's trainer shares: the TRL config's defaults lora sets (precision by hardware, the GPU levers'
library settings, no tqdm), and the set-up once TRL has built a trainer (our callbacks instead of TRL's printers,
QLoRA adapters in fp32 on a CPU). Each method module (sft.py, dpo.py, kto.py, grpo.py) calls these.
"""

from pathlib import Path

import jinja2
import torch
from transformers import PrinterCallback, ProgressCallback

from lora_cli.checkpoints import CHECKPOINTS
from lora_cli.data import template_error
from lora_cli.divergence import StopOnNonFiniteWeights
from lora_cli.errors import LoraError
from lora_cli.models import has_accelerator, pick_dtype
from lora_cli.recipe import METHOD_CONFIGS, trl_config_class
from lora_cli.reporting import ProgressAndMetrics
from lora_cli.speed.policy import gpu_speed_defaults


def trl_config(recipe, out: Path, model, **method_defaults):
    """The method's TRL config from the recipe's training section; precision follows the hardware unless the recipe
    says. method_defaults are the method module's own, below the recipe's keys."""
    kwargs = {**method_defaults, **recipe.training}
    kwargs["output_dir"] = str(out / CHECKPOINTS)
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
    name = METHOD_CONFIGS[recipe.method][1]
    try:
        return trl_config_class(recipe.method)(**kwargs)
    except (ValueError, TypeError) as e:
        raise LoraError(f"training: TRL's {name} rejects these options: {' '.join(str(e).split())}") from None


def build(trainer_class, out: Path, callbacks, chat_template_source: str, **trainer_kwargs):
    """TRL's trainer with lora's callbacks, its option errors and template errors turned into LoraErrors."""
    callbacks = [ProgressAndMetrics(out / "metrics.jsonl"), StopOnNonFiniteWeights(), *callbacks]
    try:
        trainer = trainer_class(callbacks=callbacks, **trainer_kwargs)
    except ValueError as e:  # TRL's checks of option combinations, phrased for users already
        raise LoraError(f"training: {' '.join(str(e).split())}") from None
    except jinja2.TemplateError as e:  # TRL applies the chat template to every example here
        raise LoraError(template_error(e, chat_template_source)) from None
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; our progress bar shows them
    trainer.remove_callback(ProgressCallback)
    model = trainer.model
    if getattr(model, "is_loaded_in_4bit", False) and not has_accelerator():
        # TRL casts QLoRA adapters to bf16 (the paper's GPU recipe); on a CPU bf16 matmuls are far slower than fp32.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer
