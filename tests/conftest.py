"""Shared fixtures: a tiny random Llama for speed, tiny MoE models for the levers, the embedded SmolLM2 for end-to-end
runs, and CLI runners."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Our Triton kernels run on the CPU through Triton's interpreter, so their tests run on a machine without a GPU
    # too (where triton is installed; it reads this when a kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(args, capsys) -> CliResult:
    """Run `lora ARGS` in this process through the real entry point (exit codes and messages included)."""
    from lora_cli.cli import main

    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = ["lora", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def error_line(result: CliResult) -> str:
    """The one paragraph a user error prints, after checking exit code 2 and no traceback.

    stderr may also hold progress bars (loading weights, training), each ended before the error starts its line.
    """
    assert result.code == 2, (result.code, result.err[-3000:])
    assert "Traceback" not in result.err, result.err[-3000:]
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.err[-3000:]
    return lines[0]


def run_lora_process(args, cwd=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """Run `lora ARGS` as a separate process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lora_cli", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from lora_cli.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, request) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a normal model folder.

    TOKENIZER_DIR may name a copy of that tokenizer, on a machine without the embedded model (the GPU machine).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = os.environ.get("TOKENIZER_DIR") or request.getfixturevalue("embedded_dir")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """saved(name, layers=2): a saved tiny random MoE model of a family (tests/tiny_models.py) with its router logits
    asked for, as TRL asks for them, and its load-balancing loss in the loss weighted 1 (Qwen3-MoE's and Mixtral's
    0.001 would leave its gradient within the tolerance of the lever tests)."""
    import functools

    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import FAMILY

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


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
