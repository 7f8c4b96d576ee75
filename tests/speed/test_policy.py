"""GPU defaults decided from the memory plan: checkpointing off when bf16 LoRA fits, on for QLoRA; the levers that
pin host memory chosen to fit it, or the run refused."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_cli.adapters import lora_parameter_count
from lora_cli.errors import LoraError
from lora_cli.inspect_params import registry_config
from lora_cli.memory.layout import layout_and_trained
from lora_cli.memory.lora_train import Offloading, lora_train_plan
from lora_cli.memory.plan import memory_plan
from lora_cli.memory.report import format_memory_plan
from lora_cli.recipe import LoraSection, SpeedSection
from lora_cli.speed.policy import HOST_MEMORY_ENV, HostMemory, choose_checkpointing, choose_offloading, host_memory

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


# Host memory: what offloading pins at long sequences (issue 27), against a given budget.

def qlora_row_at(config, tokens):
    """The Llama-3.1-8B shape's Layout, LoRA modules (all seven projections) and QLoRA row with checkpointing."""
    lay, trained = layout_and_trained(config, TARGETS)
    plan = memory_plan(config, 41_943_040, tokens, 1, TARGETS, 16, 0.0, False)
    return lay, trained, next(r for r in plan["rows"] if r["method"] == "qlora" and r["gradient_checkpointing"])


def choice_at(config, tokens, host_bytes, gpu_bytes=80 * GIB, monkeypatch=None, **speed):
    """policy.choose_offloading for a 1 x tokens QLoRA step, the host budget given as lora train takes it: the
    LORA_HOST_MEMORY_BYTES environment variable, read by host_memory()."""
    monkeypatch.setenv(HOST_MEMORY_ENV, str(host_bytes))
    lay, trained, row = qlora_row_at(config, tokens)
    return choose_offloading(lay, row, trained, 16, 0.0, tokens, SpeedSection(**speed), host_memory(), gpu_bytes)


def test_host_memory_reads_the_machine_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(HOST_MEMORY_ENV, raising=False)
    machine = host_memory()
    assert 0 < machine.available <= machine.total
    monkeypatch.setenv(HOST_MEMORY_ENV, str(3 * GIB))
    assert host_memory().available == 3 * GIB and host_memory().source == HOST_MEMORY_ENV


def test_a_container_limit_bounds_the_host_memory(tmp_path):
    """cgroup v2 (memory.max, memory.current), v1 (memory.limit_in_bytes, usage_in_bytes), and no limit."""
    proc, v2, v1, unlimited = (tmp_path / name for name in ("proc", "v2", "v1", "unlimited"))
    for folder in (proc, v2, v1 / "memory", unlimited):
        folder.mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       134217728 kB\nMemAvailable:   125829120 kB\n")  # 128, 120 GiB
    (v2 / "memory.max").write_text(f"{64 * GIB}\n")
    (v2 / "memory.current").write_text(f"{4 * GIB}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{32 * GIB}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{2 * GIB}\n")
    (unlimited / "memory.max").write_text("max\n")
    assert host_memory(proc, v2) == HostMemory(60 * GIB, 128 * GIB, 64 * GIB, "the container's limit less its use")
    assert host_memory(proc, v1).available == 30 * GIB
    assert host_memory(proc, unlimited) == HostMemory(120 * GIB, 128 * GIB)


def test_defaults_where_host_memory_has_room(llama8b, monkeypatch):
    """65,536 tokens on a 128 GiB machine (the issue's H100): everything offloaded, the host plan as measured there
    (77 GiB in use), the MLP tiled (its intermediates would be 5.2 GiB a layer)."""
    choice = choice_at(llama8b[0], 65_536, 120 * GIB, monkeypatch=monkeypatch)
    assert choice.offloading.host_layers == 32 and choice.offloading.attention and choice.offloading.tiled_mlp
    assert set(choice.reasons) == {"tiled_mlp"}
    assert choice.plan["host"]["total"] == pytest.approx(77.5 * GIB, rel=0.01)


def test_offload_attention_goes_first_when_the_host_overruns(llama8b, monkeypatch):
    """131,072 tokens, where the defaults pinned 99 GB and were killed (issue 27): the attention's 113 GiB do not
    fit 120 GiB, so it is recomputed, with the reason in the lever line; the layer inputs (32 GiB) stay on the host."""
    choice = choice_at(llama8b[0], 131_072, 120 * GIB, monkeypatch=monkeypatch)
    assert not choice.offloading.attention and choice.offloading.host_layers == 32
    assert choice.reasons["offload_attention"] == "host memory: needs 150.0 GiB, 108.0 available"
    assert choice.plan["host"]["total"] <= 0.9 * 120 * GIB


def test_layer_inputs_split_between_host_and_gpu(llama8b, monkeypatch):
    """With 16 GiB of host memory at 65,536 tokens: attention off, then as many layer inputs (0.5 GiB each) as fit
    beside the embedding (1 GiB) and the process (4 GiB) in 90% of it; the others stay on the GPU, which has room."""
    choice = choice_at(llama8b[0], 65_536, 16 * GIB, monkeypatch=monkeypatch)
    assert not choice.offloading.attention
    assert choice.offloading.host_layers == 18  # (14.4 - 5) GiB / 0.5 GiB
    assert choice.plan["host"]["total"] <= 0.9 * 16 * GIB
    assert choice.plan["gpu"]["layer_inputs"] == 14 * 65_536 * 4096 * 2
    assert choice.reasons["offload_activations"].startswith("18 of 32 layer inputs on the host")


@pytest.mark.parametrize("tokens,host_gib,gpu_gib,host_layers,recomputed", [
    (500_000, 120, 79.1, 27, 3),  # the goal: 120 GiB of host memory, an idle H100 80GB's free memory
    (524_288, 120, 79.1, 25, 6),
    (489_152, 64, 80, 14, 16),  # the most there can be: every other layer
])
def test_recomputed_layer_inputs_where_the_gpu_cannot_hold_the_rest(llama8b, monkeypatch, tokens, host_gib, gpu_gib,
                                                                   host_layers, recomputed):
    """Where the host holds only some layer inputs (3.8 GiB each at 500,000 tokens) and the GPU cannot hold the
    rest (at 500,000 tokens the 5 left would need 90.9 GiB), the fewest layer inputs that let it are recomputed in
    the backward from the layer before's: no memory on either side for them, so the GPU plan drops by exactly those
    inputs."""
    choice = choice_at(llama8b[0], tokens, host_gib * GIB, int(gpu_gib * GIB), monkeypatch)
    chosen = choice.offloading
    assert (chosen.host_layers, chosen.recomputed_layers, chosen.attention) == (host_layers, recomputed, False)
    assert choice.plan["gpu"]["device"] <= gpu_gib * GIB and choice.plan["host"]["total"] <= 0.9 * host_gib * GIB
    layer_input = tokens * 4096 * 2
    assert choice.plan["gpu"]["layer_inputs"] == (32 - host_layers - recomputed) * layer_input
    lay, trained, row = qlora_row_at(llama8b[0], tokens)
    split_alone = lora_train_plan(lay, row, trained, 16, tokens, dataclasses.replace(chosen, recomputed_layers=0))
    one_fewer = lora_train_plan(lay, row, trained, 16, tokens, dataclasses.replace(
        chosen, recomputed_layers=recomputed - 1, host_layers=min(32 - recomputed + 1, host_layers)))
    assert split_alone["gpu"]["peak"] - choice.plan["gpu"]["peak"] == recomputed * layer_input
    assert split_alone["host"] == choice.plan["host"]
    assert one_fewer["gpu"]["device"] > gpu_gib * GIB
    on_gpu = ", the rest on the GPU" if host_layers + recomputed < 32 else ""
    assert choice.reasons["offload_activations"].startswith(
        f"{host_layers} of 32 layer inputs on the host, {recomputed} recomputed in the backward from the layer "
        f"before{on_gpu} (host memory: all need ")


def test_refused_before_loading_when_neither_memory_can_take_the_rest(llama8b, monkeypatch):
    """524,288 tokens with 32 GiB of host memory and an 80 GB GPU: even with every other layer input recomputed, the
    split the host allows leaves more on the GPU than it has: a LoraError with both memories' numbers, the longest
    length that fits and the settings to change."""
    with pytest.raises(LoraError) as refused:
        choice_at(llama8b[0], 524_288, 32 * GIB, monkeypatch=monkeypatch)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("524,288 tokens a step need more memory than this machine has: with the inputs of 5 "
                              "of 32 layers in host memory")
    assert ("16 recomputed in the backward from the layer before (the most there can be) and the other 11 on the GPU"
            in message)
    assert "28.8 GiB of host memory" in message and "80.0 GiB are free" in message
    for setting in ("training.max_length", "training.per_device_train_batch_size", HOST_MEMORY_ENV,
                    "speed.offload_activations: false"):
        assert setting in message
    fits = int(message.split("about ")[2].split(" tokens")[0].replace(",", ""))
    assert 65_536 < fits < 524_288
    choice_at(llama8b[0], fits, 32 * GIB, monkeypatch=monkeypatch)  # the length it names trains
    with pytest.raises(LoraError):
        choice_at(llama8b[0], fits + 1024, 32 * GIB, monkeypatch=monkeypatch)


def test_the_recipe_keys_turn_levers_off(llama8b, monkeypatch):
    choice = choice_at(llama8b[0], 65_536, 120 * GIB, monkeypatch=monkeypatch, offload_attention=False,
                       tiled_mlp=False, offload_activations=False)
    assert choice.offloading == Offloading(host_layers=0, attention=False, embedding=True, tiled_mlp=False)
    assert choice.reasons == {}


@pytest.mark.parametrize("config, settings, step", [
    ("llama3-qlora.yaml", ["training.max_length=4096", "training.per_device_train_batch_size=2"], (2, 4096)),
    ("llama3-dpo-qlora.yaml",
     ["model.adapter=null", "training.max_length=4096", "training.per_device_train_batch_size=2"], (4, 4096)),
    ("qwen-grpo-math.yaml", ["training.max_completion_length=256", "training.per_device_train_batch_size=4"],
     (4, 512 + 256)),
])
def test_the_check_before_loading_plans_the_methods_step(config, settings, step):
    """The step the memory check plans (planned_step): DPO's chosen and rejected completions of every pair, GRPO's
    completions after their prompts, as inspect-params counts them; it planned max_length x batch for every method,
    half of what a DPO step holds."""
    from lora_cli.recipe import load_recipe
    from lora_cli.speed.policy import planned_step

    recipe = load_recipe(f"configs/{config}", settings)
    assert planned_step(recipe, recipe.training) == step
