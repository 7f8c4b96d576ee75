"""`lora train` on a tiny random Llama: outputs, LoRA and QLoRA, each data format, masking and EOS, resume."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl
from lora_cli.errors import LoraError
from lora_cli.recipe import build_recipe
from lora_cli.train import train

CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]}
    for i in range(12)
]


def recipe_for(tmp_path, model_dir, data_path, *, training=None, out="out", **sections):
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(data_path)},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2,
                     "gradient_checkpointing": False, "max_length": 128, **(training or {})},
        "output_dir": str(tmp_path / out),
        **sections,
    }
    return build_recipe(raw, source="test.yaml")


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", CHATS)


def test_lora_run_writes_a_complete_loadable_output(tmp_path, tiny_llama, chats):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(tmp_path, tiny_llama, chats, training={"max_steps": 3, "learning_rate": 1e-2}, data={"train": str(chats), "eval": 0.25})
    summary = train(recipe)
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "recipe.yaml", "metrics.jsonl", "loss.png", "README.md", "data_audit.json"):
        assert (out / name).is_file(), name
    assert not (out / ".staging").exists()
    assert (out / "checkpoints").is_dir()
    assert summary["steps"] == 3 and summary["tokens_per_second"] > 0

    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["lora"]["r"] == 4 and resolved["training"]["max_steps"] == 3
    assert {"torch", "transformers", "peft", "trl"} <= set(resolved["versions"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval_loss" in m for m in metrics)
    assert "tiny-llama" in (out / "README.md").read_text() or str(tiny_llama) in (out / "README.md").read_text()

    # Plain PEFT loads it, and the trained adapter changes the model's output. On the device that trained: a GPU run
    # leaves Liger's kernels patched into transformers' Llama classes for the rest of the process (README, Tests).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).to(device)
    ids = torch.tensor([[1, 42, 99, 7, 1000]], device=device)
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out)(ids).logits
    assert (adapted - before).abs().max() > 1e-3


def test_qlora_run_on_cpu(tmp_path, tiny_llama, chats):
    recipe = recipe_for(tmp_path, tiny_llama, chats, quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                                   "bnb_4bit_use_double_quant": True})
    train(recipe)
    out = tmp_path / "out"
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["quantization"]["load_in_4bit"] is True
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and {t.split(".")[-1] for t in config["target_modules"]} >= {"q_proj", "down_proj"}


FORMATS = {
    "messages": CHATS[:6],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": f"Hello {i}."}]} for i in range(6)],
    "alpaca": [{"instruction": "Add the numbers.", "input": f"{i} and {i}", "output": str(2 * i)} for i in range(6)],
    "prompt_completion": [{"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(i + 1)))} for i in range(6)],
    "text": [{"text": f"Line number {i} of a plain text corpus."} for i in range(6)],
    "tokenized": [{"input_ids": list(range(100 + i, 140 + i)) + [2]} for i in range(6)],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_detected_masked_and_trains_the_eos(tmp_path, tiny_llama, fmt):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", FORMATS[fmt])
    result = train(recipe_for(tmp_path, tiny_llama, data), dry_run=True)
    audit = result["audit"]
    assert audit["format"] == fmt
    assert audit["eos_trained_share"] == 1.0  # pad and EOS are the same token here, and EOS is still trained
    if fmt in ("text", "tokenized"):
        assert audit["trained_token_share"] > 0.9
    else:
        assert audit["trained_token_share"] < 0.7  # the prompt is masked out of the loss
    assert "⟦" in audit["example"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_multi_turn_with_generation_markers_trains_every_assistant_turn(tmp_path, tiny_llama):
    from lora_cli.data import SIMPLE_CHAT_TEMPLATE

    turns = [{"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "first"},
                           {"role": "user", "content": "B?"}, {"role": "assistant", "content": "second"}]}] * 4
    data = write_jsonl(tmp_path / "multi.jsonl", turns)
    recipe = recipe_for(tmp_path, tiny_llama, data, data={"train": str(data), "chat_template": SIMPLE_CHAT_TEMPLATE})
    audit = train(recipe, dry_run=True)["audit"]
    example = audit["example"]
    assert example.count("⟦") == 2 and "⟦first" in example and "⟦second" in example


@pytest.mark.parametrize("template, fragments", [
    ("{{ broken", ["data.chat_template cannot be read", "template line 1"]),
    ("{% if messages[0].role != 'system' %}{{ raise_exception('the first message must be the system prompt') }}"
     "{% endif %}", ["data.chat_template failed on the training data", "the first message must be the system prompt"]),
], ids=["syntax", "raised"])
def test_a_chat_template_that_fails_is_a_lora_error(tmp_path, tiny_llama, chats, template, fragments):
    recipe = recipe_for(tmp_path, tiny_llama, chats, data={"train": str(chats), "chat_template": template})
    with pytest.raises(LoraError) as error:
        train(recipe, dry_run=True)
    assert all(fragment in str(error.value) for fragment in fragments), error.value


def test_truncation_that_removes_every_eos_is_refused(tmp_path, tiny_llama, chats):
    recipe = recipe_for(tmp_path, tiny_llama, chats, training={"max_length": 40})
    with pytest.raises(LoraError, match="never learn to stop.*max_length=40"):
        train(recipe, dry_run=True)


def test_unknown_target_module_lists_the_real_ones(tmp_path, tiny_llama, chats):
    recipe = recipe_for(tmp_path, tiny_llama, chats, lora={"target_modules": ["q_proj", "query_key_value"]})
    with pytest.raises(LoraError, match="query_key_value.*not a linear layer.*gate_proj.*q_proj"):
        train(recipe, dry_run=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, fragments",
    [
        ('{"messages": []}\n{"messages": [1, 2\n', ["line 2", "not valid JSON"]),
        ('{"question": "a", "answer": "b"}\n', ["cannot tell the format", "answer, question"]),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["line 1", "no assistant message"]),
        ('{"messages": [{"role": "pirate", "content": "hi"}]}\n', ["line 1", "role 'pirate'"]),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
         '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
         ["line 2", "only assistant message comes first", "roles are not swapped"]),
        ("\n\n", ["has no examples"]),
    ],
)
def test_bad_data_is_reported_with_its_line(tmp_path, tiny_llama, capsys, content, fragments):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_llama)}, "data": {"train": str(data)}}))
    result = run_cli(["train", recipe_path, "-o", tmp_path / "out"], capsys)
    assert result.code == 2 and "Traceback" not in result.err
    for fragment in ["data.train", *fragments]:
        assert fragment in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content", [
    ("chats.jsonl", '{"text": "hello world"}\n{"text": "again"}\n'),
    ("chats.csv", "text\nhello world\nagain\n"),
    ("chats.txt", "hello world\nagain\n"),
])
def test_files_with_a_byte_order_mark_read_as_without(tmp_path, name, content):
    """Windows editors and spreadsheet exports start UTF-8 files with a byte-order mark: the data are the same."""
    from lora_cli.data import load_data
    from lora_cli.recipe import DataSection

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    records, _, fmt = load_data(DataSection(train=str(path)))
    assert fmt == "text" and [r["text"] for r in records] == ["hello world", "again"]


def test_explicit_format_needs_its_columns(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}])
    recipe = recipe_for(tmp_path, tiny_llama, data, data={"train": str(data), "format": "alpaca"})
    with pytest.raises(LoraError, match="needs a 'output' column"):
        train(recipe, dry_run=True)


def test_resume_finishes_with_the_same_adapter(tmp_path, tiny_llama, chats):
    """An interrupted run resumed from its checkpoint ends where an uninterrupted run ends."""
    settings = {"max_steps": 4, "save_steps": 2, "learning_rate": 5e-3}
    straight = recipe_for(tmp_path, tiny_llama, chats, training=settings, out="straight")
    train(straight)
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")

    interrupted = recipe_for(tmp_path, tiny_llama, chats, training=settings, out="resumed")
    train(interrupted)
    out = tmp_path / "resumed"
    import shutil

    # Keep only what a run stopped after its first checkpoint would have left.
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    train(interrupted, resume=True)
    resumed = load_file(out / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert max((expected[k] - resumed[k]).abs().max().item() for k in expected) < 1e-4


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_llama, chats):
    with pytest.raises(LoraError, match="no checkpoint"):
        train(recipe_for(tmp_path, tiny_llama, chats), resume=True)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_lora_layers_train_the_same_adapter_as_peft(tmp_path, tiny_llama, chats, capsys, quantized):
    """lora train's default path (fused layers and MLPs) against `speed.fused_lora: false` (PEFT's forward): the
    same adapter.

    Without dropout, so both draw nothing random; tests/speed/test_lora_linear.py checks the dropout masks. In float32 on any
    device: in bf16 the two round differently, and Adam turns a near-zero gradient's sign into a full step."""
    if quantized and torch.cuda.is_available():
        pytest.skip("TRL keeps QLoRA adapters in bf16 on GPUs; tests/speed/ compares the fused layers there")
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"} if quantized else None
    from transformers import TrainerCallback

    from lora_cli.speed.fused_mlp import fused_mlp_forward

    class WatchMLPs(TrainerCallback):  # which forward the MLPs run in training (Liger's, set by the Trainer, or ours)
        def on_step_end(self, args, state, control, model=None, **kwargs):
            mlps.append([getattr(m.forward, "__func__", None) is fused_mlp_forward
                         for m in model.modules() if hasattr(m, "gate_proj")])

    adapters = {}
    for fused in (True, False):
        mlps = []
        recipe = recipe_for(tmp_path, tiny_llama, chats, out=f"fused-{fused}",
                            model={"name_or_path": str(tiny_llama), "dtype": "float32"},
                            training={"max_steps": 3, "learning_rate": 1e-2},
                            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                            speed={"fused_lora": fused}, quantization=quantization)
        train(recipe, callbacks=[WatchMLPs()])
        assert mlps == [[fused, fused]] * 3
        levers = "fused_lora=on (14 layers) fused_mlp=on (2)" if fused else "fused_lora=off (0 layers) fused_mlp=off"
        assert levers in capsys.readouterr().out
        adapters[fused] = load_file(tmp_path / f"fused-{fused}" / "adapter_model.safetensors")
    change = max(v.abs().max().item() for k, v in adapters[False].items() if "lora_B" in k)  # B starts at 0
    assert change > 1e-2
    assert max((adapters[True][k] - adapters[False][k]).abs().max().item() for k in adapters[False]) < 1e-3 * change


def test_packed_run_trains_and_audits_the_unpacked_examples(tmp_path, tiny_llama, chats, capsys):
    """training.packing: true (TRL's padding-free bfd packing) through lora train: the audit still sees examples."""
    train(recipe_for(tmp_path, tiny_llama, chats, training={"packing": True, "max_steps": 2}))
    out = capsys.readouterr().out
    varlen = "on" if torch.cuda.is_available() else "off"  # varlen flash attention is for GPUs
    assert "packing=True" in out and f"varlen_attention={varlen}" in out
    audit = json.loads((tmp_path / "out" / "data_audit.json").read_text())
    assert audit["examples"]["train"] == len(CHATS) and audit["eos_lost_to_truncation"] == 0
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")


def test_steps_start_in_training_mode_without_gradients_after_evaluation(tmp_path, tiny_llama, chats):
    """speed.trim_step_overhead skips the Trainer's per-step walks over the model (train(), zero_grad()): with an
    evaluation between steps, every step still starts with no gradient left over and trains with all modules in
    training mode, and the evaluation runs with all of them in eval mode."""
    from transformers import TrainerCallback

    seen = {"steps": [], "eval": []}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen["steps"].append([all(p.grad is None for p in model.parameters())])

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # after the backward
            seen["steps"][-1].append(all(m.training for m in model.modules()))

        def on_prediction_step(self, args, state, control, model=None, **kwargs):
            seen["eval"].append(not any(m.training for m in model.modules()))

    evals = write_jsonl(tmp_path / "eval.jsonl", CHATS[:4])
    recipe = recipe_for(tmp_path, tiny_llama, chats, data={"train": str(chats), "eval": str(evals)},
                        training={"max_steps": 3, "eval_strategy": "steps", "eval_steps": 1},
                        lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"})
    train(recipe, callbacks=[Watch()])
    assert seen["steps"] == [[True, True]] * 3
    assert len(seen["eval"]) >= 3 and all(seen["eval"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's fused linear cross-entropy runs on a GPU")
@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_fused_loss_trains_trls_adapter(tmp_path, tiny_llama, capsys, packing):
    """The LM head and loss through Liger's fused linear cross-entropy log TRL's losses, accuracy and token counts
    and train the adapter TRL's own fused LM head trains (`speed.fused_loss: false`), on rows of varied lengths
    (padded) and packed, with an eval split (which keeps TRL's path)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"input_ids": list(range(10 + i, 10 + i + 10 + (i * 23) % 50))}
                                                 for i in range(48)])
    runs = {}
    for fused in (True, False):
        recipe = recipe_for(tmp_path, tiny_llama, rows, out=f"fused-{fused}",
                            data={"train": str(rows), "eval": 0.25},
                            training={"max_steps": 5, "learning_rate": 0.5, "optim": "sgd",  # updates follow
                                      "gradient_checkpointing": True, "packing": packing,  # the gradients closely
                                      "max_length": 64, "eval_strategy": "steps", "eval_steps": 5},
                            quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                            speed={"fused_loss": fused})
        train(recipe)
        assert f"fused_loss={'on' if fused else 'off'}" in capsys.readouterr().out
        out = tmp_path / f"fused-{fused}"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "loss" in m]
        runs[fused] = (steps, [m["eval_loss"] for m in metrics if "eval_loss" in m],
                       load_file(out / "adapter_model.safetensors"))
    (fused_steps, fused_eval, fused_adapter), (trl_steps, trl_eval, trl_adapter) = runs[True], runs[False]
    assert len(fused_steps) == len(trl_steps) == 5
    for ours, theirs in zip(fused_steps, trl_steps):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=2e-3)
        assert ours["mean_token_accuracy"] == pytest.approx(theirs["mean_token_accuracy"], abs=0.05)
        assert ours["num_tokens"] == theirs["num_tokens"]
    assert fused_eval == pytest.approx(trl_eval, rel=2e-3)
    change = max(v.abs().max().item() for k, v in trl_adapter.items() if "lora_B" in k)
    assert change > 1e-3
    assert max((fused_adapter[k] - trl_adapter[k]).abs().max().item() for k in trl_adapter) < 2e-2 * change


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("dropout", "packing"), [(0.0, False), (0.1, False), (0.0, True)],
                         ids=["no-dropout", "dropout", "packed"])
def test_cuda_graphs_train_the_same_adapter(tmp_path, tiny_llama, capsys, dropout, packing):
    """QLoRA with checkpointing, the GPU default path: layers replayed as CUDA graphs, their attention kept in host
    memory (without dropout), train the adapter that `speed.cuda_graphs: false, speed.offload_attention: false`
    trains; on fixed-length rows, and on packed rows of varied lengths (padded to one shape for the graphs, left as
    TRL makes them without)."""
    lengths = [10 + (i * 23) % 50 for i in range(48)] if packing else [64] * 24
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"input_ids": list(range(10 + i, 10 + i + n))}
                                                 for i, n in enumerate(lengths)])
    adapters = {}
    for graphs in (True, False):
        recipe = recipe_for(tmp_path, tiny_llama, rows, out=f"graphs-{graphs}",
                            training={"max_steps": 5, "learning_rate": 1e-2, "gradient_checkpointing": True,
                                      "packing": packing, "max_length": 64},
                            lora={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"},
                            speed={"cuda_graphs": graphs, "offload_attention": graphs},
                            quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
        train(recipe)
        out = capsys.readouterr()
        assert f"cuda_graphs={'on' if graphs else 'off'}" in out.out and "capture failed" not in out.err
        kept = "on (2)" if graphs and not dropout else "off (0)"
        assert f"offload_attention={kept}" in out.out
        assert ("CUDA graphs: 2 of 2 decoder layers replayed" in out.out) == graphs
        adapters[graphs] = load_file(tmp_path / f"graphs-{graphs}" / "adapter_model.safetensors")
    change = max(v.abs().max().item() for k, v in adapters[False].items() if "lora_B" in k)
    assert change > 1e-2
    assert max((adapters[True][k] - adapters[False][k]).abs().max().item() for k in adapters[False]) < 1e-3 * change
