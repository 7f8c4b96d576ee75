"""Why a lever is off for an architecture: the reasons the run's lever line prints, on the registry's real shapes."""

import pytest

from lora_cli.inspect_params import registry_config
from lora_cli.memory.layout import build_meta_model
from lora_cli.speed.coverage import off_reasons


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b", "mistral-7b", "qwen2.5-7b"])
def test_llama_style_families_and_qwen3_get_every_lever(name):
    assert off_reasons(build_meta_model(registry_config(name))) == {}


def test_gemma_keeps_off_what_its_geglu_mlp_post_norms_and_soft_capping_rule_out():
    reasons = off_reasons(build_meta_model(registry_config("gemma-2-2b")))
    assert set(reasons) == {"fused_mlp", "lean_recompute", "fused_loss"}
    assert "GeGLU" in reasons["fused_mlp"] and "soft-capping" in reasons["fused_loss"]


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_moe_keeps_the_fused_mlp_off_and_gets_cuda_graphs(name):
    reasons = off_reasons(build_meta_model(registry_config(name)))
    assert "MoE" in reasons["fused_mlp"] and "cuda_graphs" not in reasons


def test_the_lever_line_names_the_reasons_the_recipe_did_not_ask_for():
    from lora_cli.recipe import SpeedSection
    from lora_cli.speed.wiring import because

    reasons = {"fused_mlp": "GeGLU MLP", "fused_loss": "logit soft-capping"}
    assert because(reasons, SpeedSection()) == ("; off for this architecture: fused_mlp (GeGLU MLP), "
                                                "fused_loss (logit soft-capping)")
    assert because(reasons, SpeedSection(fused_mlp=False, fused_loss=False)) == ""
