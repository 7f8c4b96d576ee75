"""Training methods: one module per method building its TRL config and trainer from the recipe (sft.py, dpo.py for
DPO, ORPO and SimPO, kto.py, grpo.py), and `steps(method)`, the functions train.py runs for a recipe's method: its
data (data.py for SFT, preference_data.py for the others), its config and trainer, and its audit."""

from dataclasses import dataclass
from typing import Callable

from lora_cli import preference_data
from lora_cli.methods import common, dpo, grpo, kto, sft

TRAINER_MODULES = {"sft": sft, "dpo": dpo, "orpo": dpo, "simpo": dpo, "kto": kto, "grpo": grpo}


@dataclass
class MethodSteps:
    load_data: Callable  # (recipe) -> (train records, eval records or None, format)
    prepare: Callable  # (train, eval, format, tokenizer, recipe) -> prepared data
    trl_config: Callable  # (recipe, out, prepared, model) -> the TRL config
    build_trainer: Callable  # (model, tokenizer, args, prepared, peft_config, out, callbacks, recipe) -> trainer
    audit: Callable  # (trainer, prepared, args) -> report
    format_audit: Callable  # (report) -> text
    check_audit: Callable  # (report) -> None, or LoraError


def steps(method: str) -> MethodSteps:
    module = TRAINER_MODULES[method]
    if method == "sft":
        return MethodSteps(sft.load_data, sft.prepare, sft.trl_config, sft.build_trainer, sft.audit,
                           sft.format_audit, sft.check_audit)
    return MethodSteps(
        load_data=lambda recipe: preference_data.load_data(recipe.data, method, recipe.rewards),
        prepare=lambda train, evaluation, fmt, tokenizer, recipe: preference_data.prepare(
            train, evaluation, fmt, tokenizer, recipe.data, recipe.training["seed"]),
        trl_config=lambda recipe, out, prepared, model: common.trl_config(recipe, out, model),
        build_trainer=module.build_trainer,
        audit=lambda trainer, prepared, args: preference_data.audit(trainer, method, prepared, getattr(args, "max_length", None)),
        format_audit=preference_data.format_audit,
        check_audit=preference_data.check_audit,
    )
