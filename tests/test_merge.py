"""lora merge: parity with PEFT's unmerged adapter (LoRA, and QLoRA in both modes), a learned fact surviving the
merge, the EOS check, atomic writing and the errors a user can hit. Adapters are made with PEFT on the tiny Llama."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

PROBE = "Hello there! Tell me about the weather in Paris, please."


def write_recipe(folder: Path, name_or_path: str, quantized: bool = False) -> None:
    """recipe.yaml as lora train writes it next to an adapter."""
    quantization = None
    if quantized:
        quantization = {
            "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "auto", "bnb_4bit_quant_storage": None,
        }
    recipe = {
        "model": {"name_or_path": name_or_path, "dtype": "auto", "attn_implementation": None,
                  "trust_remote_code": False, "use_safetensors": True},
        "quantization": quantization,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data.jsonl", "format": "auto"},
        "training": {"learning_rate": 1e-2},
        "output_dir": str(folder),
        "distributed": None,
        "versions": {},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")


def load_base(base_dir: Path, quantized: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=config,
                                                device_map={"": "cpu"})


def make_adapter(base_dir: Path, folder: Path, quantized: bool = False, seed: int = 1) -> Path:
    """A LoRA adapter on every linear layer with random lora_B, so it changes the logits (a fresh one does not)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir, quantized), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    write_recipe(folder, str(base_dir), quantized)
    return folder


def probe_logits(model, base_dir: Path, text: str = PROBE):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base_dir)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def peft_logits(base_dir: Path, adapter: Path, quantized: bool = False, enabled: bool = True):
    """Plain PEFT, unmerged: the reference a merge must reproduce."""
    from contextlib import nullcontext

    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir, quantized), str(adapter)).eval()
    with nullcontext() if enabled else model.disable_adapter():
        return probe_logits(model, base_dir)


def dequantized_peft_logits(base_dir: Path, adapter: Path):
    """PEFT, unmerged, on the float32 base with every 4-bit layer's weight replaced by its NF4 values, quantized as
    loading with bitsandbytes does (blocks of 64, double quantization): the model a QLoRA adapter trained on,
    computed in float32 whatever kernels bitsandbytes picks for this CPU."""
    import bitsandbytes.functional as bnb_functional
    import torch
    from peft import PeftModel

    base = load_base(base_dir)
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4")
            module.weight.data = bnb_functional.dequantize_4bit(packed, state).float()
    return probe_logits(PeftModel.from_pretrained(base, str(adapter)).eval(), base_dir)


def merged_logits(folder: Path, base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return probe_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), base_dir)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="session")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("lora-adapter"))


@pytest.fixture(scope="session")
def qlora_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("qlora-adapter"), quantized=True)


def test_lora_merge_matches_unmerged_adapter(tiny_llama, lora_adapter, tmp_path):
    from lora_cli.merge import merge_adapter

    result = merge_adapter(lora_adapter, tmp_path / "merged")
    out = tmp_path / "merged"
    assert result.mode == "lora" and result.dtype == "float32"  # the tiny base is stored in float32
    assert result.max_logit_diff < 1e-4 and result.adapter_effect > 0.5, result
    reference = peft_logits(tiny_llama, lora_adapter)
    base_only = peft_logits(tiny_llama, lora_adapter, enabled=False)
    merged = merged_logits(out, tiny_llama)
    print(f"LoRA fp32: merged vs PEFT {max_diff(merged, reference):.3g}, adapter effect "
          f"{max_diff(reference, base_only):.3g}")
    assert max_diff(reference, base_only) > 0.5  # the adapter measurably changes the model
    assert max_diff(merged, reference) < 1e-4

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_qlora_merge_both_modes_match_their_bases(tiny_llama, qlora_adapter, tmp_path):
    from lora_cli.merge import merge_adapter

    dequantized = merge_adapter(qlora_adapter, tmp_path / "dequantized")
    original = merge_adapter(qlora_adapter, tmp_path / "original", from_original_base=True)
    assert dequantized.mode == "qlora-dequantized" and "NF4" in dequantized.weights
    assert original.mode == "qlora-original" and "original" in original.weights
    assert dequantized.max_logit_diff < 1e-4 and original.max_logit_diff < 1e-4

    as_trained = dequantized_peft_logits(tiny_llama, qlora_adapter)  # the 4-bit model's values, in float32
    on_original = peft_logits(tiny_llama, qlora_adapter)
    bnb_kernels = peft_logits(tiny_llama, qlora_adapter, quantized=True)
    merged_dequantized = merged_logits(tmp_path / "dequantized", tiny_llama)
    merged_original = merged_logits(tmp_path / "original", tiny_llama)
    figures = (max_diff(merged_dequantized, as_trained), max_diff(merged_original, on_original),
               max_diff(as_trained, on_original), max_diff(bnb_kernels, as_trained))
    print("QLoRA fp32: dequantized merge vs 4-bit PEFT %.3g, original merge vs fp32 PEFT %.3g, NF4 error %.3g, "
          "bitsandbytes' CPU kernels %.3g" % figures)
    assert figures[0] < 1e-4
    assert figures[1] < 1e-4
    # bitsandbytes' own 4-bit matmul computes in bf16 on CPUs with AVX512-BF16 (0.0018 here), else in float32
    assert figures[3] < 0.1 * figures[2]
    assert figures[2] > 1e-2  # the two modes really differ: by the quantization error
    assert max_diff(as_trained, peft_logits(tiny_llama, qlora_adapter, quantized=True, enabled=False)) > 0.5


def test_bfloat16_output(lora_adapter, tmp_path):
    from safetensors import safe_open

    from lora_cli.merge import TOLERANCE, merge_adapter

    result = merge_adapter(lora_adapter, tmp_path / "bf16", dtype="bfloat16")
    assert result.max_logit_diff <= TOLERANCE["bfloat16"]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_says_what_it_did(qlora_adapter, tmp_path, capsys):
    result = run_cli(["merge", qlora_adapter, tmp_path / "a"], capsys)
    assert result.code == 0, result.err
    assert "dequantized" in result.out and "largest logit difference" in result.out and "tolerance" in result.out
    assert "<|im_end|>" in result.out
    result = run_cli(["merge", qlora_adapter, tmp_path / "b", "--from-original-base", "--no-verify"], capsys)
    assert result.code == 0, result.err
    assert "original base weights" in result.out and "skipped" in result.out


def train_fact(base_dir: Path, folder: Path, question: str, answer: str, steps: int = 60) -> Path:
    """Train a LoRA adapter for real (AdamW, loss on the answer only) until it has memorised one answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(load_base(base_dir), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_recipe(folder, str(base_dir))
    return folder


def test_learned_fact_is_answered_after_merging(tiny_llama, tmp_path, capsys):
    adapter = train_fact(tiny_llama, tmp_path / "adapter", "What is the password?", "The password is tulip.")
    merged = run_cli(["merge", adapter, tmp_path / "merged"], capsys)
    assert merged.code == 0, merged.err
    ask = ["--prompt", "What is the password?", "--max-new-tokens", "6"]
    before = run_cli(["generate", tmp_path / "merged", *ask], capsys)
    base = run_cli(["generate", tiny_llama, *ask], capsys)
    assert before.code == 0, before.err
    assert before.out.startswith("The password is tulip")
    assert "tulip" not in base.out
    assert run_cli(["generate", adapter, *ask], capsys).out == before.out  # merged and unmerged answer alike


def test_merges_what_lora_train_writes(tiny_llama, tmp_path, capsys):
    """The contract with lora train: its output folder (recipe.yaml with the quantization) is what merge reads."""
    from conftest import write_jsonl

    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(8)])
    recipe = {
        "model": {"name_or_path": str(tiny_llama)},
        "quantization": {"load_in_4bit": True},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(chats)},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_length": 64,
                     "gradient_checkpointing": False, "save_steps": 100},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    trained = run_cli(["train", tmp_path / "recipe.yaml"], capsys)
    assert trained.code == 0, trained.err
    merged = run_cli(["merge", tmp_path / "run", tmp_path / "merged"], capsys)
    assert merged.code == 0, merged.err
    assert "NF4 base weights dequantized" in merged.out
    answer = run_cli(["generate", tmp_path / "merged", "-p", "What is 2 plus 2?", "--max-new-tokens", "4"], capsys)
    assert answer.code == 0, answer.err


def test_eos_agreement_is_written(lora_adapter, tiny_llama, tmp_path):
    """A base whose generation config stops only on <|endoftext|>: the merged one also stops at <|im_end|>."""
    from transformers import GenerationConfig

    from lora_cli.merge import merge_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0).save_pretrained(base)
    result = merge_adapter(lora_adapter, tmp_path / "merged", base=str(base), verify=False)
    assert result.max_logit_diff is None
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [0, 2]
    assert "<|im_end|>" in result.eos and "<|endoftext|>" in result.eos


def test_plain_peft_adapter_without_recipe(lora_adapter, tmp_path):
    from lora_cli.merge import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / "recipe.yaml").unlink()
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.mode == "lora" and result.max_logit_diff < 1e-4


def test_out_dir_not_empty_needs_force(lora_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    refused = run_cli(["merge", lora_adapter, out], capsys)
    assert refused.code == 2 and "--force" in refused.err and "Traceback" not in refused.err
    assert run_cli(["merge", lora_adapter, out, "--force", "--no-verify"], capsys).code == 0
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    inside = run_cli(["merge", lora_adapter, lora_adapter, "--force"], capsys)
    assert inside.code == 2 and "own input" in inside.err


def test_folders_that_are_not_adapters(tiny_llama, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = {
        tiny_llama: "model folder",
        tmp_path / "empty": "not an adapter folder",
        tmp_path / "missing": "does not exist",
    }
    for folder, message in cases.items():
        result = run_cli(["merge", folder, tmp_path / "out"], capsys)
        assert result.code == 2 and message in result.err, result.err
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    result = run_cli(["merge", run, tmp_path / "out"], capsys)
    assert result.code == 2 and "none of its checkpoints was written completely" in result.err  # a kill mid-save
    (checkpoint / "lora_complete.json").write_text(json.dumps({"step": 10, "files": {"adapter_config.json": 2}}))
    result = run_cli(["merge", run, tmp_path / "out"], capsys)
    assert result.code == 2 and "checkpoint-10" in result.err
    assert not (tmp_path / "out").exists()


def test_base_that_does_not_fit(lora_adapter, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(other)
    result = run_cli(["merge", lora_adapter, tmp_path / "out", "--base", other], capsys)
    assert result.code == 2 and "does not fit" in result.err and "size mismatch" in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_unreachable_base(lora_adapter, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / "recipe.yaml").unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody-xyz/no-such-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli(["merge", adapter, tmp_path / "out"], capsys)
    assert result.code == 2 and "nobody-xyz/no-such-model" in result.err and "hub" in result.err, result.err


def test_bad_dtype(lora_adapter, tmp_path, capsys):
    result = run_cli(["merge", lora_adapter, tmp_path / "out", "--dtype", "bfloat61"], capsys)
    assert result.code == 2 and "bfloat16" in result.err


def test_full_disk_leaves_nothing(lora_adapter, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def fill_disk(self, folder, **kwargs):
        (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fill_disk)
    result = run_cli(["merge", lora_adapter, tmp_path / "out"], capsys)
    assert result.code == 2 and "disk filled up" in result.err, result.err
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(lora_adapter, tmp_path, monkeypatch, capsys):
    """A merge that loses the adapter (here: unload instead of merge) is caught and nothing is written."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kwargs: self.unload())
    result = run_cli(["merge", lora_adapter, tmp_path / "out"], capsys)
    assert result.code == 2 and "Verification failed" in result.err, result.err
    assert list(tmp_path.iterdir()) == []
