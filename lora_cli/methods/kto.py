"""KTO: completions labelled desirable or undesirable, unpaired (TRL's KTOTrainer). Preference pairs work too: TRL
splits each pair into a desirable and an undesirable completion.

As for DPO, the reference is the adapter disabled, or with model.adapter TRL's frozen copy of the adapter as loaded.
"""

from pathlib import Path

from trl import KTOTrainer

from lora_cli.methods import common


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks, recipe):
    return common.build(KTOTrainer, out, callbacks, prepared.chat_template_source, model=model, args=args,
                        train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer,
                        peft_config=peft_config)
