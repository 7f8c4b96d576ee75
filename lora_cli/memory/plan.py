"""The memory plan of one training step: the plain stack's rows for each method, and lora train's own step on a GPU
(memory_plan, from a config); the step each training method runs (method_step)."""

from lora_cli.memory.device import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GIB
from lora_cli.memory.layout import LayerModule, Layout, layout_and_trained
from lora_cli.memory.lora_train import default_offloading, lora_train_plan
from lora_cli.memory.plain_stack import METHODS, method_row
from lora_cli.recipe import config_default


def plan_for_layout(lay: Layout, lora_trainable: int, trained: list[LayerModule], rank: int, dropout: float, dora: bool,
                    seq_len: int, batch_size: int) -> dict:
    rows = [
        method_row(lay, method, checkpointing, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)
        for method in METHODS
        for checkpointing in (True, False)
    ]
    tokens = seq_len * batch_size
    lora_train = {row["method"]: lora_train_plan(lay, row, trained, rank, tokens,
                                                 default_offloading(lay, row["method"], trained, dropout, tokens))
                  for row in rows if row["method"] != "full" and row["gradient_checkpointing"]}
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "rank": rank,
        "lora_trainable": lora_trainable,
        "lora_dropout": dropout,
        "rows": rows,
        # What lora train's offloaded checkpointing (speed/checkpointing.py, on GPUs) keeps in host memory instead: each
        # decoder layer's bf16 input. Measured: QLoRA 7.37 -> 6.56 GiB on the Llama-3.1-8B shape (plan: 1.0 GiB).
        "offloaded": lay.layers * batch_size * seq_len * lay.hidden * 2,
        # lora train's own step on a GPU with its default levers, GPU and host memory (lora_train_plan)
        "lora_train": lora_train,
        "assumptions": (
            "peak = torch.cuda.max_memory_allocated of a TRL SFTTrainer step: bf16 autocast, AdamW, SDPA, "
            "TRL's chunked LM head; LoRA adapters fp32 (PEFT), QLoRA adapters bf16 (TRL); full fine-tuning keeps "
            f"fp32 weights. device = peak x {1 + ALLOCATOR_SLACK:g} + {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context."
        ),
    }


def memory_plan(config, lora_trainable: int, seq_len: int = 2048, batch_size: int = 1, lora_modules=None,
                rank: int = 16, dropout: float = 0.0, dora: bool = False) -> dict:
    """The memory plan for training this config (a transformers config) with lora_trainable adapter parameters.

    lora_modules: the target module names as in a recipe, "all-linear" for every Linear of a decoder layer, or
    None for PEFT's default for the architecture. Returns a JSON-serialisable dict; format_memory_plan prints it.
    """
    lay, trained = layout_and_trained(config, lora_modules)
    return plan_for_layout(lay, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)


PAIR_METHODS = ("dpo", "orpo", "simpo")
GRPO_PROMPT_TOKENS = 512  # prompt tokens planned before GRPO's completions, where no data says (--seq-len overrides)


def method_step(method: str, value) -> tuple[int, int, str]:
    """(sequences a step runs with gradients, tokens each, what they are in words) for a method's training step;
    value(name) gives a training setting (the recipe's, else the method's default).

    DPO, ORPO and SimPO forward the chosen and the rejected completion of every pair (one batch of both); KTO one
    completion per example (its KL estimate's mismatched completions go through without gradients, so they keep no
    activations); GRPO per_device_train_batch_size completions, num_generations of them per prompt. Reference passes
    run without gradients and keep nothing for the backward.
    """
    batch = value("per_device_train_batch_size")
    if method == "grpo":
        completion = value("max_completion_length")
        groups = value("num_generations")
        return batch, GRPO_PROMPT_TOKENS + completion, (
            f"{batch} completions ({groups} per prompt) of up to {completion} tokens after a prompt of up to "
            f"{GRPO_PROMPT_TOKENS}")
    seq_len = value("max_length") or 1024
    if method in PAIR_METHODS:
        return 2 * batch, seq_len, f"the chosen and the rejected completion of {batch} pairs"
    return batch, seq_len, f"{batch} {'labelled completions' if method == 'kto' else 'examples'}"


def recipe_value(recipe):
    """value(name) for method_step: the recipe's training setting, else the method's default."""
    return lambda name: recipe.training[name] if name in recipe.training else config_default(recipe.method, name)
