"""lora export: GGUF for each architecture and quantization read back by transformers and compared with the model,
the GGUF LoRA applied to its base, the vLLM folder and readiness facts, the Ollama Modelfile, and every bad input.
Models are tiny random ones (SmolLM2's tokenizer); one adapter is trained with lora train."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import error_line, run_cli, write_jsonl
from lora_cli.export import export
from lora_cli.export.vllm import vllm_readiness

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def tiny_model(folder: Path, arch: str, tokenizer) -> Path:
    import torch
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    configs = {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32),  # head_dim apart from hidden/heads, as in Qwen3
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64),
        "phi3": lambda: Phi3Config(**common, original_max_position_embeddings=512),
        "gpt2": lambda: GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4),
    }
    if arch.startswith("qwen"):  # Qwen's own pre-tokenizer (digits one by one), which llama.cpp names qwen2
        from tokenizers import Regex, pre_tokenizers

        from lora_cli.export.gguf import _QWEN2_SPLIT

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch]())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    """A byte-level BPE of 512 tokens with SmolLM2's special tokens and chat template: the GGUF reader parses a
    vocabulary entry by entry in Python, and SmolLM2's 49,152 would cost half a minute a read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    smollm = AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER_DIR") or embedded_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"What is {i} plus {i}? It is {2 * i}. The quick brown fox jumps over the lazy dog." for i in range(50)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    small = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    pad_token="<|im_end|>", unk_token="<|endoftext|>")
    small.chat_template = smollm.chat_template
    return small


@pytest.fixture(scope="module")
def tiny_llama(tokenizer, tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama", tokenizer)


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama, tmp_path_factory) -> Path:
    """An adapter lora train made on the tiny Llama (3 steps at a high learning rate, so it changes the logits)."""
    from lora_cli.recipe import build_recipe
    from lora_cli.train import train

    folder = tmp_path_factory.mktemp("trained")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(8)]
    data = write_jsonl(folder / "chats.jsonl", chats)
    train(build_recipe({
        "model": {"name_or_path": str(tiny_llama)},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(data)},
        "training": {"max_steps": 3, "learning_rate": 5e-2, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "save_steps": 3, "gradient_checkpointing": False, "max_length": 256},
        "output_dir": str(folder / "adapter"),
    }, source="test.yaml"))
    return folder / "adapter"


def read_gguf(path: Path):
    import gguf

    return gguf.GGUFReader(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_exports_and_reads_back(tmp_path, tokenizer, arch):
    model = tiny_model(tmp_path / arch, arch, tokenizer)
    result = export(str(model), tmp_path / "out", quant="f16")
    assert result.verified and result.files == [f"{arch}-f16.gguf"]
    report = "\n".join(result.report)
    assert "6 of 6 sample texts give the same ids, chat template identical" in report, report
    difference = float(report.split("largest logit difference ")[1].split(",")[0])
    assert difference <= 0.25, report
    reader = read_gguf(tmp_path / "out" / f"{arch}-f16.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if arch.startswith("qwen") else "gpt-2")


@pytest.fixture(scope="module")
def merged(trained_adapter, tmp_path_factory) -> Path:
    from lora_cli.merge import merge_adapter

    return merge_adapter(trained_adapter, tmp_path_factory.mktemp("m") / "merged").out_dir


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_each_quant_type_is_written_and_verified(tmp_path, merged, quant):
    import gguf

    result = export(str(merged), tmp_path / "out", quant=quant)
    assert result.verified
    reader = read_gguf(tmp_path / "out" / f"merged-{quant}.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    wanted = "Q8_0" if quant in ("q5_1", "q5_0", "q4_1", "q4_0") else quant.upper()
    assert types["token_embd.weight"] == wanted  # llama-quantize keeps the embedding wider too (Q6_K)
    assert types["blk.0.ffn_down.weight"] == quant.upper()  # 128 columns: whole blocks
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, "MOSTLY_" + quant.upper())


def test_adapter_exports_through_the_verified_merge_with_a_modelfile(tmp_path, trained_adapter, capsys):
    result = run_cli(["export", trained_adapter, tmp_path / "out", "--format", "gguf", "--quant", "q8_0", "--ollama"],
                     capsys)
    assert result.code == 0, result.err[-3000:]
    assert "merge:     verified, largest logit difference" in result.out
    assert "top-1 agreement" in result.out and "6 of 6 sample texts" in result.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "adapter-q8_0.gguf"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./adapter-q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile  # the template's default
    assert "ollama create adapter -f" in result.out
    assert not list(tmp_path.glob(".out*"))  # no staging left behind


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_lora_carries_the_adapter(tmp_path, trained_adapter, quant):
    from safetensors import safe_open

    result = export(str(trained_adapter), tmp_path / "out", fmt="gguf-lora", quant=quant)
    assert result.verified and "may be lost" in result.report[1]
    reader = read_gguf(tmp_path / "out" / f"adapter-lora-{quant}.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    names = {t.name for t in reader.tensors}
    with safe_open(trained_adapter / "adapter_model.safetensors", framework="pt") as weights:
        assert len(names) == len(list(weights.keys()))
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names


def test_vllm_export_writes_the_merged_model_and_the_command(tmp_path, trained_adapter, capsys):
    result = run_cli(["export", trained_adapter, tmp_path / "out", "--format", "vllm"], capsys)
    assert result.code == 0, result.err[-3000:]
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert "adapter:   serves on vLLM as is" in result.out
    assert f"vllm serve {tmp_path / 'out'}" in result.out and "--max-lora-rank 8" in result.out


def test_vllm_readiness_names_each_problem_and_its_fix():
    assert vllm_readiness({"r": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}).ready
    verdict = vllm_readiness({"r": 12, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all",
                              "target_modules": ["q_proj", "embed_tokens"]})
    assert not verdict.ready and len(verdict.reasons) == 5
    text = verdict.summary()
    for fragment in ("rank 12", "lora.r: 8", "DoRA", "modules_to_save (lm_head)", "bias 'all'", "embed_tokens",
                     "lora export ADAPTER OUT --format vllm"):
        assert fragment in text, (fragment, text)
    assert not vllm_readiness({"r": 16, "rank_pattern": {"q_proj": 24}}).ready


def test_train_summary_and_model_card_say_whether_vllm_serves_it(trained_adapter):
    card = (trained_adapter / "README.md").read_text()
    assert "| vLLM | serves on vLLM as is" in card
    from lora_cli.reporting import format_summary

    summary = json.loads((trained_adapter / "train_summary.json").read_text())
    assert "vLLM: serves on vLLM as is" in format_summary(summary)


def test_a_failed_verification_leaves_nothing(tmp_path, merged, monkeypatch, capsys):
    from lora_cli.export import verify

    monkeypatch.setitem(verify.QUANTIZED_LIMITS, "q4_0", (1.01, 0.0))  # no file can pass
    result = run_cli(["export", merged, tmp_path / "out", "--quant", "q4_0"], capsys)
    assert "Verification failed: q4_0 moves the predictions too far" in error_line(result)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args, fragments", [
    (["--quant", "q3_x"], ["--quant must be one of f16, bf16, q8_0"]),
    (["--quant", "q4_k_m"], ["K-quants such as q4_k_m", "ollama create --quantize q4_K_M"]),
    (["--format", "onnx"], ["--format must be one of gguf, gguf-lora, vllm"]),
    (["--format", "vllm", "--ollama"], ["--ollama writes a Modelfile for a GGUF model"]),
    (["--format", "gguf-lora"], ["gguf-lora writes an adapter", "give an adapter folder"]),
    (["--format", "vllm"], ["already a model"]),
])
def test_bad_arguments_are_one_paragraph(tmp_path, tiny_llama, capsys, args, fragments):
    line = error_line(run_cli(["export", tiny_llama, tmp_path / "out", *args], capsys))
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_non_empty_out_needs_force(tmp_path, tiny_llama, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "is not empty; choose another folder or pass --force" in error_line(
        run_cli(["export", tiny_llama, tmp_path / "out"], capsys))
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_unsupported_architecture_is_named(tmp_path, tokenizer, capsys):
    model = tiny_model(tmp_path / "gpt2", "gpt2", tokenizer)
    line = error_line(run_cli(["export", model, tmp_path / "out"], capsys))
    assert "cannot write GGUF for the architecture 'gpt2' (GPT2LMHeadModel)" in line
    assert "llama, mistral, phi3, qwen2, qwen3" in line and not (tmp_path / "out").exists()


def test_missing_target_is_named(tmp_path, capsys):
    assert "TARGET: the folder './nowhere' does not exist" in error_line(
        run_cli(["export", "./nowhere", tmp_path / "out"], capsys))


LLAMA_CPP_COMMAND = "LORA_TEST_LLAMA_CPP=1 python -m pytest -q tests/test_export.py -k llama_cpp"


@pytest.mark.skipif(os.environ.get("LORA_TEST_LLAMA_CPP") != "1",
                    reason=f"needs llama-cpp-python built from source (20+ minutes on 2 cores): {LLAMA_CPP_COMMAND}")
def test_llama_cpp_answers_like_the_merged_model(tmp_path, embedded_dir):
    """llama.cpp itself runs the exported SmolLM2 greedily and gives transformers' answer, token for token."""
    from lora_cli.generate import Sampling, generate

    export(str(embedded_dir), tmp_path / "out", quant="q8_0")
    question = "What is the capital of France?"
    expected = generate(str(embedded_dir), [question], sampling=Sampling(max_new_tokens=24))[0].text
    script = (
        "import sys, llama_cpp\n"
        "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, verbose=False, n_threads=2)\n"
        "out = llm.create_chat_completion([{'role': 'user', 'content': sys.argv[2]}], temperature=0, max_tokens=24)\n"
        "print(out['choices'][0]['message']['content'])\n"
    )
    answer = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out" / f"{embedded_dir.name}-q8_0.gguf"), question],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() == expected
