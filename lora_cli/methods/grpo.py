"""GRPO: TRL's GRPOTrainer generates num_generations completions a prompt (with transformers, or vLLM where
`training.use_vllm` asks for it), scores them with the recipe's reward functions (rewards.py) and trains on their
advantages within each prompt's group.

TRL's default beta is 0 (no KL term, no reference pass); with beta > 0 the reference is the adapter disabled, or
with model.adapter TRL's frozen copy of it, as for DPO.
"""

from pathlib import Path

from accelerate import PartialState
from trl import GRPOTrainer

from lora_cli.methods import common
from lora_cli.rewards import load_reward_functions


def build_trainer(model, tokenizer, args, prepared, peft_config, out: Path, callbacks, recipe):
    say = print if PartialState().is_main_process else (lambda *a, **k: None)
    rewards = load_reward_functions(recipe.rewards, say=lambda line: say(line, flush=True))
    return common.build(GRPOTrainer, out, callbacks, prepared.chat_template_source, model=model, args=args,
                        reward_funcs=rewards, train_dataset=prepared.train, eval_dataset=prepared.eval,
                        processing_class=tokenizer, peft_config=peft_config)
