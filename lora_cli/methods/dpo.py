"""Preference pairs: DPO (TRL's DPOTrainer), and the reference-free pair methods built like it, ORPO and SimPO
(TRL 1.16's trl.experimental ORPOTrainer, and CPOTrainer with loss_type simpo).

No second copy of the model: TRL's DPOTrainer, given a PEFT model, scores the reference with the adapter disabled
(the base), and for a run that continues an adapter (model.adapter) with a frozen copy of that adapter as it was
loaded, which TRL adds as the adapter "ref". ORPO and SimPO need no reference at all.
"""

import importlib
from pathlib import Path

import torch

from lora_cli.methods import common

TRAINERS = {"dpo": ("trl", "DPOTrainer"), "orpo": ("trl.experimental.orpo", "ORPOTrainer"),
            "simpo": ("trl.experimental.cpo", "CPOTrainer")}


class CountsPairTokens:
    """Token counting for ORPO's and CPO's trainers, which count none (TRL 1.16's trl.experimental), so `lora train`
    reported 0 tok/s for ORPO and SimPO. Counted as DPOTrainer counts: the attention masks of each pair's chosen and
    rejected rows, prompt included, summed over processes; kept on the device between logged steps (no host sync a
    step), logged as num_tokens for the progress line and kept in _total_train_tokens for the summary."""

    _unlogged_tokens = 0  # a device tensor once a step has counted
    _total_train_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            self._unlogged_tokens = self._unlogged_tokens + tokens
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs, start_time=None):
        if not any(key.startswith("eval_") for key in logs):
            unlogged = torch.as_tensor(self._unlogged_tokens, device=self.accelerator.device)
            counted = int(self.accelerator.reduce(unlogged, reduction="sum"))
            self._total_train_tokens += counted
            self._unlogged_tokens = 0
            logs["num_tokens"] = self._total_train_tokens
        return super().log(logs, start_time)


def trainer_class(method: str):
    """The method's TRL trainer (imported after its config, which silences trl.experimental's import warning)."""
    module, name = TRAINERS[method]
    trl_trainer = getattr(importlib.import_module(module), name)
    return trl_trainer if method == "dpo" else type(name, (CountsPairTokens, trl_trainer), {})


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks, recipe):
    return common.build(trainer_class(recipe.method), out, callbacks, prepared.chat_template_source, model=model,
                        args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                        processing_class=tokenizer, peft_config=peft_config)
