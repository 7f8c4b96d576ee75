"""Fixes on a loaded model for library bugs that stop training on an architecture: each is the smallest change that
lets the libraries' own code run, names the bug, and goes when a release fixes it (tests/test_model_matrix.py
trains these families end to end, so a fix that stops working fails there).

- TRL 1.16's fused LM head (SFTTrainer's chunked log-probabilities) adds the router's load-balancing loss with
  `config.num_experts`; Llama 4's and GraniteMoeHybrid's configs call it `num_local_experts` (AttributeError in the
  first step). The value is copied to the name TRL reads (our fused loss checks the model's count against it).
- The fused LM head runs the model's backbone through `model.base_model`, found by `base_model_prefix`.
  transformers' Llama4ForCausalLM names its backbone `language_model` but holds it as `model`, and
  Llama4ForConditionalGeneration has none: `base_model` is then the whole model, whose output has no
  `last_hidden_state` (AttributeError). Both are pointed at the text backbone, Llama4TextModel.
"""

BACKBONE = "text_backbone"  # the attribute base_model finds on an image-text Llama 4


def fix_for_training(model) -> None:
    """Apply the module docstring's fixes that concern this model (in place; nothing is saved with them)."""
    text_config = model.config.get_text_config()
    if hasattr(text_config, "num_local_experts") and not hasattr(text_config, "num_experts"):
        text_config.num_experts = text_config.num_local_experts
    if model.config.model_type == "llama4_text":
        model.base_model_prefix = "model"
    elif model.config.model_type == "llama4":
        # A plain attribute, not a registered submodule: the backbone stays listed once, under language_model.
        object.__setattr__(model, BACKBONE, model.language_model.model)
        model.base_model_prefix = BACKBONE
