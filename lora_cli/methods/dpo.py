"""Preference pairs: DPO (TRL's DPOTrainer), and the reference-free pair methods built like it, ORPO and SimPO
(TRL 1.16's trl.experimental ORPOTrainer, and CPOTrainer with loss_type simpo).

No second copy of the model: TRL's DPOTrainer, given a PEFT model, scores the reference with the adapter disabled
(the base), and for a run that continues an adapter (model.adapter) with a frozen copy of that adapter as it was
loaded, which TRL adds as the adapter "ref". ORPO and SimPO need no reference at all.
"""

import importlib
from pathlib import Path

from lora_cli.methods import common

TRAINERS = {"dpo": ("trl", "DPOTrainer"), "orpo": ("trl.experimental.orpo", "ORPOTrainer"),
            "simpo": ("trl.experimental.cpo", "CPOTrainer")}


def trainer_class(method: str):
    """The method's TRL trainer (imported after its config, which silences trl.experimental's import warning)."""
    module, name = TRAINERS[method]
    return getattr(importlib.import_module(module), name)


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks, recipe):
    return common.build(trainer_class(recipe.method), out, callbacks, prepared.chat_template_source, model=model,
                        args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                        processing_class=tokenizer, peft_config=peft_config)
