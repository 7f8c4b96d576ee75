"""The model matrix: a tiny random model of each architecture family trains with LoRA (QLoRA on a representative
subset, below), `lora merge` verifies and writes it, `lora generate` answers, and `lora inspect-params` counts it
exactly; mixture-of-experts models with the experts trained too; image-text checkpoints train their language model on
text from the same recipe.

Fast by construction: hidden 64, 2 layers, 4 experts, SmolLM2's tokenizer, 2 steps on 4 short chats, in this process.
Still, every family end to end takes minutes on a 2-core machine, so `make test` runs one family of each kind of layer
end to end and counts the others against PEFT (inspect-params on the real model); the whole matrix runs with

    LORA_TEST_MATRIX=all .venv/bin/python -m pytest tests/test_model_matrix.py
"""

import json
import os

import pytest
import torch
import yaml

from conftest import error_line, run_cli, write_jsonl
from lora_cli.experts import is_router
from tiny_models import FAMILIES, FAMILY, tiny_config

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(4)]
# The families trained end to end: every family of tiny_models.FAMILIES but the text-only halves of image-text models
# (the image-text checkpoint trains the same language model) and OLMo 2 (OLMo 3's layers less the sliding window);
# those are counted only. MoE families train with their experts (the default, experts off, is trained below).
COUNTED_ONLY = ["gemma3_text", "gemma4_text", "qwen3_5_text", "llama4_text", "olmo2"]
# QLoRA on the CPU costs several times LoRA's time, so it runs on one family of each kind of layer: Llama-style,
# MoE with the experts trained, Mamba hybrid, image-text.
QLORA_FAMILIES = ["qwen3", "qwen3_moe", "falcon_h1", "gemma3"]


def installed(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def cases(names):
    for name in names:
        family = FAMILY[name]
        marks = [] if installed(family.model_type) else [pytest.mark.skip(f"transformers has no {family.model_type}")]
        yield pytest.param(name, marks=marks, id=name)


TRAINED = [f.name for f in FAMILIES if f.name not in COUNTED_ONLY]
# One family of each kind of layer: Llama-style, q/k norms, MoE (routed experts as 3-D weights), Mamba hybrid,
# linear-attention hybrid in an image-text checkpoint, Gemma's GeGLU.
if os.environ.get("LORA_TEST_MATRIX") != "all":
    # Llama 4 and GraniteMoeHybrid train through lora_cli/library_fixes.py.
    END_TO_END = {"llama", "qwen3", "qwen3_moe", "gpt_oss", "falcon_h1", "qwen3_5", "gemma2", "llama4",
                  "granitemoehybrid"}
    COUNTED_ONLY = COUNTED_ONLY + [name for name in TRAINED if name not in END_TO_END]
    TRAINED = [name for name in TRAINED if name in END_TO_END]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """name -> a folder with the family's tiny random model, as its checkpoints are published (image-text ones whole)."""
    from lora_cli.multimodal import auto_class

    made = {}

    def make(name):
        if name not in made:
            config = tiny_config(FAMILY[name], tokenizer)
            torch.manual_seed(0)
            model = auto_class(config).from_config(config)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[name] = folder
        return made[name]

    return make


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", CHATS)


def write_recipe(path, model_dir, chats, out, quantized: bool, experts: bool):
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "target_experts": experts},
        "data": {"train": str(chats)},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 100,
                     "max_length": 48, "learning_rate": 1e-2},
        "output_dir": str(out),
    }
    if quantized:
        recipe["quantization"] = {"load_in_4bit": True}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def trained_line(out: str) -> tuple[int, int]:
    """PEFT's own count of the model lora train trained: its print_trainable_parameters line."""
    line = next(line for line in out.splitlines() if line.startswith("trainable params:"))
    trainable, total = (int(part.split(":")[1].split("||")[0].replace(",", "")) for part in line.split("||")[:2])
    return trainable, total


def train_and_count(name, model_dirs, chats, tmp_path, capsys, quantized: bool, experts: bool):
    from lora_cli.inspect_params import inspect_recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", model_dirs(name), chats, tmp_path / "adapter", quantized, experts)
    trained = run_cli(["train", recipe], capsys)
    assert trained.code == 0, trained.err[-3000:]
    assert "Done." in trained.out
    if FAMILY[name].moe:  # the lever line says why the MoE layers run without the fused MLP
        assert "fused_mlp (MoE" in trained.out
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bool(adapter_config.get("target_parameters")) == experts
    # inspect-params counts what PEFT counted on the model that trained (QLoRA's 4-bit weights count apart)
    report = inspect_recipe(recipe)
    trainable, total = trained_line(trained.out)
    assert report["ranks"][0]["trainable"] == trainable
    if not quantized:
        assert report["ranks"][0]["all"] == total
    assert not any(row["lora"] and is_router(row["module"]) for row in report["modules"])
    if experts:
        assert report["experts"]["lora"] and 0 < report["experts"]["trainable"] < trainable
    return tmp_path / "adapter"


@pytest.mark.parametrize("name", cases(TRAINED))
def test_family_trains_merges_generates_and_is_counted(name, model_dirs, chats, tmp_path, capsys):
    adapter = train_and_count(name, model_dirs, chats, tmp_path, capsys, False, FAMILY[name].moe)
    merged = run_cli(["merge", adapter, tmp_path / "merged"], capsys)
    assert merged.code == 0, merged.err[-3000:]
    assert "largest logit difference from the unmerged adapter" in merged.out
    answer = run_cli(["generate", tmp_path / "merged", "--prompt", "What is 2 plus 2?", "--max-new-tokens", "4"],
                     capsys)
    assert answer.code == 0, answer.err[-3000:]  # a random model may end its answer at once: no text asserted


@pytest.mark.parametrize("name", cases(QLORA_FAMILIES))
def test_family_trains_with_qlora_and_is_counted(name, model_dirs, chats, tmp_path, capsys):
    train_and_count(name, model_dirs, chats, tmp_path, capsys, True, FAMILY[name].moe)


@pytest.mark.parametrize("name", cases(["qwen3_moe", "deepseek_v3", "llama4_text"]))
def test_moe_defaults_train(name, model_dirs, chats, tmp_path, capsys):
    """all-linear with the default dropout: the experts' ParamWrapper refused it. Llama 4's text-only model: its
    backbone is found through library_fixes.py."""
    train_and_count(name, model_dirs, chats, tmp_path, capsys, False, False)


@pytest.mark.parametrize("name", cases(COUNTED_ONLY))
def test_inspect_params_counts_what_peft_counts_on_the_real_model(name, model_dirs):
    from peft import get_peft_model

    from lora_cli.adapters import lora_config, lora_parameter_count
    from lora_cli.inspect_params import inspect_params
    from lora_cli.models import load_model
    from lora_cli.recipe import LoraSection

    folder = model_dirs(name)
    report = inspect_params(str(folder), [4], target="all-linear")
    real = load_model(str(folder), torch.float32)
    section = LoraSection(r=4, target_modules="all-linear")
    planned = lora_parameter_count(real, section)  # the memory policy's count, from the model before PEFT wraps it
    peft_model = get_peft_model(real, lora_config(section, real))
    assert peft_model.get_nb_trainable_parameters() == (report["ranks"][0]["trainable"], report["ranks"][0]["all"])
    assert planned == report["ranks"][0]["trainable"]


@pytest.mark.parametrize("name", cases(["gemma3", "gemma4"]))
def test_named_modules_of_an_image_text_model_get_lora_in_its_language_model_only(name, model_dirs):
    """PEFT matches q_proj in the vision tower too: Gemma 3's got adapters text never trains, Gemma 4's (wrappers of a
    Linear) made PEFT refuse the model."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_cli.adapters import lora_config, lora_parameter_count
    from lora_cli.inspect_params import inspect_params
    from lora_cli.models import load_model
    from lora_cli.recipe import LoraSection

    folder = model_dirs(name)
    real = load_model(str(folder), torch.float32)
    section = LoraSection(r=4, target_modules=["q_proj", "v_proj"])
    planned = lora_parameter_count(real, section)
    peft_model = get_peft_model(real, lora_config(section, real))
    assert planned == peft_model.get_nb_trainable_parameters()[0]  # the vision tower's q_proj and v_proj not counted
    wrapped = [n for n, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)]
    assert wrapped and all(".language_model.layers." in n for n in wrapped), wrapped
    row = inspect_params(str(folder), [4], target="q_proj,v_proj")["ranks"][0]
    assert peft_model.get_nb_trainable_parameters() == (row["trainable"], row["all"])


def test_image_text_checkpoint_keeps_its_vision_tower_and_trains_only_the_language_model(model_dirs, chats, tmp_path,
                                                                                        capsys):
    from safetensors import safe_open

    model_dir = model_dirs("qwen3_5")
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dir, chats, tmp_path / "adapter", False, False)
    assert run_cli(["train", recipe], capsys).code == 0
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all("language_model" in n for n in names), names[:4]
    assert run_cli(["merge", tmp_path / "adapter", tmp_path / "merged"], capsys).code == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:
        assert any(n.startswith("model.visual.") for n in weights.keys())


def test_experts_with_dropout_is_refused_naming_both_keys(model_dirs, chats, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dirs("qwen3_moe"), chats, tmp_path / "adapter", False, True)
    result = run_cli(["train", recipe, "--set", "lora.dropout=0.1"], capsys)
    line = error_line(result)
    assert "lora.dropout" in line and "lora.target_experts" in line


def test_experts_on_a_dense_model_is_refused(model_dirs, chats, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dirs("qwen3"), chats, tmp_path / "adapter", False, True)
    line = error_line(run_cli(["train", recipe], capsys))
    assert "lora.target_experts" in line and "qwen3" in line


def test_shared_expert_names_that_peft_gives_to_the_experts_are_refused(model_dirs, chats, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dirs("deepseek_v3"), chats, tmp_path / "adapter", False,
                          False)
    line = error_line(run_cli(["train", recipe, "--set", "lora.target_modules=[q_a_proj, gate_proj, up_proj]"], capsys))
    assert "deepseek_v3" in line and "gate_proj" in line and "target_experts" in line
