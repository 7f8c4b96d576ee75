"""Architectures that load and are counted but cannot train with the installed libraries, and why: a one-paragraph
error before training starts rather than a traceback in its first step. Each entry names the library at fault, so
that the entry goes when a release fixes it (tests/test_model_matrix.py fails then: it expects this error)."""

from lora_cli.errors import LoraError

CANNOT_TRAIN = {
    "llama4": "TRL's SFTTrainer reads `last_hidden_state` from the model's inner language model, and Llama 4's "
              "returns a causal-LM output without it",
    "llama4_text": "TRL's SFTTrainer reads `last_hidden_state` from the model's inner language model, and Llama 4's "
                   "returns a causal-LM output without it",
    "granitemoehybrid": "transformers' GraniteMoeHybrid reads `config.num_experts` in its training step, and its "
                        "config names that value num_local_experts",
}


def check_trainable(model) -> None:
    model_type = model.config.model_type
    if model_type in CANNOT_TRAIN:
        import transformers
        import trl

        raise LoraError(
            f"model.name_or_path: the {model_type} architecture cannot be fine-tuned with transformers "
            f"{transformers.__version__} and TRL {trl.__version__}: {CANNOT_TRAIN[model_type]}. lora inspect-params "
            "counts it; training waits for a release of those libraries that fixes it."
        )
