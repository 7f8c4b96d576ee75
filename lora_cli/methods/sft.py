"""Supervised fine-tuning: TRL's SFTConfig from the recipe's training section, and its SFTTrainer.

TRL does the tokenizing, loss masking and packing; what lora sets by default, and why, is commented where it is set
(methods/common.py for what every method shares).
"""

from pathlib import Path

from trl import SFTTrainer

from lora_cli import data
from lora_cli.methods import common


def load_data(recipe):
    return data.load_data(recipe.data)


def prepare(train, evaluation, fmt, tokenizer, recipe):
    return data.prepare_for_trl(train, evaluation, fmt, tokenizer, recipe.data, recipe.training["seed"])


def trl_config(recipe, out: Path, prepared, model):
    """SFTConfig: the loss on the assistant's words where the chat template can mask them (data.py)."""
    return common.trl_config(recipe, out, model, assistant_only_loss=prepared.assistant_only_loss)


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks, recipe):
    return common.build(SFTTrainer, out, callbacks, prepared.chat_template_source, model=model, args=args,
                        train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer,
                        peft_config=peft_config)


def audit(trainer, prepared, args) -> dict:
    report = data.audit(trainer, prepared.train, args.max_length)
    report["chat_template_note"] = prepared.chat_template_note
    report["format"] = prepared.format
    return report


format_audit = data.format_audit
check_audit = data.check_audit
