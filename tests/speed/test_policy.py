"""GPU defaults decided from the memory plan: checkpointing off when bf16 LoRA fits, on for QLoRA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_cli.adapters import lora_parameter_count
from lora_cli.inspect_params import registry_config
from lora_cli.memory import format_memory_plan, memory_plan
from lora_cli.recipe import LoraSection
from lora_cli.speed.policy import choose_checkpointing

GIB = 2**30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama8b():
    """The Llama-3.1-8B shape on the meta device, its LoRA size and its memory plan at batch 2 x 2048."""
    config = registry_config("llama-3.1-8b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraSection(r=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    trainable = lora_parameter_count(model, lora)
    plan = memory_plan(config, trainable, 2048, 2, TARGETS, 16, 0.0, False)
    return config, trainable, plan


def test_adapter_size_matches_peft(llama8b):
    assert llama8b[1] == 41_943_040  # PEFT's count for r=16 on all seven projections (test_inspect checks PEFT)


def test_bf16_lora_drops_recomputation_only_when_it_fits(llama8b):
    _, _, plan = llama8b
    assert choose_checkpointing(plan, 80 * GIB, False) == {"gradient_checkpointing": False}  # an H100
    assert choose_checkpointing(plan, 24 * GIB, False) == {}  # a 24 GB card keeps TRL's checkpointing


def test_qlora_keeps_checkpointing(llama8b):
    _, _, plan = llama8b
    assert choose_checkpointing(plan, 141 * GIB, True) == {}


def test_plan_names_what_offloading_moves_to_the_host(llama8b):
    """Each layer's bf16 input; the H100 measured 7.37 -> 6.56 GiB for QLoRA, the plan says 1.0 GiB less."""
    _, _, plan = llama8b
    assert plan["offloaded"] == 32 * 2 * 2048 * 4096 * 2
    assert "1.00 GiB less on the rows with checkpointing on" in format_memory_plan(plan)
