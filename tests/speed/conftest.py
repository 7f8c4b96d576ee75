"""Fixtures of the lever tests: tiny random MoE models, saved once a session."""

import functools

import pytest
import torch

from tiny_models import FAMILY


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A saved tiny random MoE model of a family (tests/tiny_models.py) with its router logits asked for, as TRL asks
    for them, and its load-balancing loss in the loss weighted 1 (Qwen3-MoE's and Mixtral's 0.001 would leave its
    gradient within the tolerance)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    @functools.cache
    def saved(name: str, layers: int = 2):
        family = FAMILY[name]
        config = AutoConfig.for_model(family.model_type, **{**family.config, "num_hidden_layers": layers},
                                      vocab_size=1024, pad_token_id=0, output_router_logits=True,
                                      router_aux_loss_coef=1.0)
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp(f"{name}-{layers}")
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        return out

    return saved
