"""The memory plan at long sequences (lora_cli/memory/lora_train.py): what it counts against what the code keeps, and that no
L x L tensor is made on the paths lora train uses."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from torch.utils._python_dispatch import TorchDispatchMode

from lora_cli.inspect_params import registry_config
from lora_cli.memory.device import GIB
from lora_cli.memory.layout import layout_and_trained
from lora_cli.memory.lora_train import (Offloading, attention_host_bytes, default_offloading, layer_input_places,
                                        lora_train_plan, loss_chunk_rows, mlp_intermediate_bytes)
from lora_cli.memory.plan import memory_plan
from lora_cli.speed.varlen import varlen_mask

LENGTH = 1024


def tiny_config(**changes):
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       attn_implementation="sdpa", **changes)


class SquareTensors(TorchDispatchMode):
    """Records the shape of every tensor an operation makes that has two dimensions of the sequence's length."""

    def __init__(self, length):
        super().__init__()
        self.length, self.found = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and list(tensor.shape).count(self.length) >= 2:
                self.found.append((str(func), tuple(tensor.shape)))
        return out


def test_an_unpadded_row_makes_no_square_tensor():
    """A training step of an unpadded row (what lora train gives SDPA at batch 1, as TRL's collator makes it: an
    attention mask of ones) makes no L x L tensor: no mask (SDPA's is_causal), no attention matrix (its fused
    kernel), in the forward and the backward."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 512, (1, LENGTH))
    with SquareTensors(LENGTH) as watch:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert watch.found == []


def test_packed_rows_get_no_mask_on_the_varlen_path():
    """Packed rows (positions restarting, no attention mask): SDPA's mask function builds a block-diagonal L x L
    mask, which the varlen path (speed/varlen.py) never reads; its mask function gives none on a GPU. With padding,
    or a sliding window, SDPA's mask stays."""
    config = tiny_config()
    embeds = torch.zeros(1, LENGTH, 8)
    positions = torch.cat([torch.arange(LENGTH // 2), torch.arange(LENGTH // 2)])[None]
    sdpa = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                              position_ids=positions)
    assert tuple(sdpa.shape) == (1, 1, LENGTH, LENGTH)  # what the varlen path does without varlen_mask
    options = dict(batch_size=1, q_length=LENGTH, kv_length=LENGTH, allow_is_causal_skip=False, config=config)
    assert varlen_mask(attention_mask=None, device=torch.device("cuda"), **options) is None
    padded = torch.ones(1, LENGTH, dtype=torch.bool)
    padded[0, -3:] = False
    assert varlen_mask(attention_mask=padded, device=torch.device("cpu"), **options).shape == (1, 1, LENGTH, LENGTH)
    windowed = dict(options, config=tiny_config(sliding_window=128))
    assert varlen_mask(attention_mask=None, device=torch.device("cpu"), **windowed) is not None


def offloaded_tiny_llama(max_tokens=None):
    """A tiny Llama with LoRA r=8 on every projection (fp32 on the CPU), its attention offloaded, and its plan's
    Layout and trained modules."""
    from peft import LoraConfig, get_peft_model

    from lora_cli.speed.checkpointing import offloaded_checkpointing
    from lora_cli.speed.lora_linear import fuse_lora_layers

    config = tiny_config()
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear")).train()
    fuse_lora_layers(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    offloaded_checkpointing(model, lean_recompute=True, offload_attention=True, max_tokens=max_tokens)
    return model, *layout_and_trained(config, "all-linear")


def test_offloaded_attention_keeps_what_the_plan_counts(tmp_path):
    """attention_host_bytes against the host buffers speed/offloaded_attention.py fills for a tiny Llama's layer (fp32
    on the CPU, which saves the same tensors as bf16 on a GPU: q and k after RoPE, v, SDPA's output and log-sum-exp,
    each projection's r-wide product, the layer's attention output), at two lengths."""
    model, lay, trained = offloaded_tiny_llama()
    for length in (64, 256):
        ids = torch.randint(0, 512, (1, length))
        loss = model(input_ids=ids, labels=ids).loss
        for layer in model.get_base_model().model.layers:
            saver = layer.self_attn.attention_saver
            saved = next(reversed(saver.forwards.values()))
            kept = sum(host.numel() for host in saved.hosts) + saved.output_host.numel()
            assert kept == attention_host_bytes(lay, trained, 8, 4, length, compute_bytes=4)
        loss.backward()


def test_attention_buffers_for_the_planned_tokens_are_what_the_plan_counts():
    """Given the plan's tokens a step (256), a row of 64 tokens makes the host buffers as large as the plan counts
    at 256, so that no longer row grows them (a packed row's length changes from step to step)."""
    model, lay, trained = offloaded_tiny_llama(max_tokens=256)
    ids = torch.randint(0, 512, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in model.get_base_model().model.layers:
        buffers = layer.self_attn.attention_saver.buffers.values()
        assert sum(buffer.numel() for buffer in buffers) == attention_host_bytes(lay, trained, 8, 4, 256,
                                                                                 compute_bytes=4)


def test_the_loss_chunk_is_bounded():
    """Liger's chunk at 4,096 tokens of the Llama-3 vocabulary (1,024 rows), bounded to 1 GiB of logits at long
    sequences where Liger's grows with the tokens."""
    assert loss_chunk_rows(128_256, 4096, 4096) == 1024
    assert loss_chunk_rows(128_256, 4096, 524_288) * 128_256 * 2 <= GIB
    assert loss_chunk_rows(49_152, 64, 100) == 2  # Liger's: 100 rows over 96 chunks of a tiny hidden size


def test_long_sequence_plan_of_the_llama_8b_shape():
    """At 524,288 tokens every hidden-wide bf16 tensor is 4 GiB: the layer inputs (128 GiB in all) cannot all wait
    in a 128 GiB host, the attention's saved tensors (14 GiB a layer) even less; the tiled MLP keeps the GPU's
    share of a layer's backward to tens of GiB, where the whole MLP's intermediates alone would be 42 GiB."""
    config = registry_config("llama-3.1-8b")
    plan = memory_plan(config, 41_943_040, 524_288, 1, "all-linear", 16, 0.0, False)
    qlora = plan["lora_train"]["qlora"]
    assert qlora["levers"]["tiled_mlp"] and qlora["levers"]["host_layers"] == 32
    assert qlora["host"]["layer_inputs"] == 128 * GIB
    assert 14 * GIB < qlora["host"]["attention"] / 32 < 14.2 * GIB
    lay, _ = layout_and_trained(config, "all-linear")
    assert mlp_intermediate_bytes(lay, 524_288) == 42 * GIB
    assert qlora["gpu"]["mlp"] < 14 * GIB
    assert not default_offloading(lay, "qlora", [], 0.0, 2048).tiled_mlp  # short sequences keep the MLP whole


def test_recomputed_layer_inputs_are_every_other_one_from_the_last():
    """Each recomputed input is rerun from the kept input of the layer before, so no two are adjacent; the other
    layers' inputs go to the host first layer first, the rest stay on the GPU."""
    assert layer_input_places(4, 1, 2) == ["host", "recomputed", "gpu", "recomputed"]
    assert layer_input_places(4, 4, 0) == ["host"] * 4
    places = layer_input_places(32, 27, 1)
    assert places[:27] == ["host"] * 27 and places[27:] == ["gpu"] * 4 + ["recomputed"]
    stored = [layer for layer, place in enumerate(layer_input_places(32, 13, 16)) if place != "recomputed"]
    assert stored == list(range(0, 32, 2))
    with pytest.raises(ValueError):
        layer_input_places(5, 0, 3)


def test_recomputed_layer_inputs_take_no_memory():
    """A recomputed layer input is held neither on the GPU through the step nor on the host: the GPU plan of the
    Llama-3.1-8B shape at 524,288 tokens drops by one 4 GiB input for each, the host plan is the same."""
    config = registry_config("llama-3.1-8b")
    plan = memory_plan(config, 41_943_040, 524_288, 1, "all-linear", 16, 0.0, False)
    lay, trained = layout_and_trained(config, "all-linear")
    row = next(r for r in plan["rows"] if r["method"] == "qlora" and r["gradient_checkpointing"])
    split = Offloading(**{**plan["lora_train"]["qlora"]["levers"], "host_layers": 13, "attention": False})
    plans = [lora_train_plan(lay, row, trained, 16, 524_288, dataclasses.replace(split, recomputed_layers=count))
             for count in (0, 5)]
    assert plans[0]["gpu"]["layer_inputs"] - plans[1]["gpu"]["layer_inputs"] == 5 * 4 * GIB
    assert plans[0]["gpu"]["peak"] - plans[1]["gpu"]["peak"] == 5 * 4 * GIB
    assert plans[0]["host"] == plans[1]["host"]
