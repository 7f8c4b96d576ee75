"""lora generate: greedy determinism, stopping at EOS, every input form, JSON output, adapters with --compare-base,
the chat loop, and the errors for TARGETs that are not models. The tiny Llama for speed; SmolLM2 once, for EOS."""

import io
import json
import subprocess
import sys

import pytest

from conftest import run_cli, write_jsonl
from test_merge import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("generate-adapter"), seed=2)


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_embedded_model_answers_and_stops_at_eos(capsys):
    result = run_cli(["generate", "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                      "--max-new-tokens", "64", "--json"], capsys)
    assert result.code == 0, result.err
    (row,) = json_rows(result.out)
    assert "Paris" in row["completion"], row
    assert row["finish_reason"] == "stop" and row["completion_tokens"] < 64
    assert row["prompt"] == "What is the capital of France?" and row["prompt_tokens"] > 10


def test_greedy_is_deterministic_and_stops_at_max_new_tokens(adapter, capsys):
    args = ["generate", adapter, "-p", "Tell me a story.", "--max-new-tokens", "12", "--json"]
    first, second = run_cli(args, capsys), run_cli(args, capsys)
    assert first.code == 0, first.err
    assert first.out == second.out
    (row,) = json_rows(first.out)
    assert row["completion"].strip()
    assert row["completion_tokens"] == 12 and row["finish_reason"] == "length"
    sampled = [run_cli([*args, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7"], capsys)
               for _ in range(2)]
    assert sampled[0].code == 0 and sampled[0].out == sampled[1].out  # seeded sampling repeats too


def test_prompts_in_every_form(tiny_llama, tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("First question?\n\nSecond question?\n", encoding="utf-8")
    result = run_cli(["generate", tiny_llama, "--prompts-file", lines, "-p", "Zeroth?", "--max-new-tokens", "4"],
                     capsys)
    assert result.code == 0, result.err
    assert [line for line in result.out.splitlines() if line.startswith("=== ")] == [
        "=== prompt 1: Zeroth?", "=== prompt 2: First question?", "=== prompt 3: Second question?"]

    rows = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Plain prompt?"},
        {"messages": [{"role": "user", "content": "Plain prompt?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plain prompt?"},
                      {"role": "assistant", "content": "Yes."}]},
        {"prompt": [{"role": "user", "content": "Plain prompt?"}],
         "completion": [{"role": "assistant", "content": "No."}]},
    ])
    result = run_cli(["generate", tiny_llama, "--prompts-file", rows, "--max-new-tokens", "3", "--json"], capsys)
    assert result.code == 0, result.err
    out = json_rows(result.out)
    assert [r["prompt"] for r in out] == ["Plain prompt?"] * 4
    assert out[0]["prompt_tokens"] == out[1]["prompt_tokens"] == out[3]["prompt_tokens"]
    assert out[0]["completion"] == out[1]["completion"]
    assert out[2]["prompt_tokens"] != out[1]["prompt_tokens"]  # its own system message
    assert out[2]["reference"] == "Yes." and out[3]["reference"] == "No." and "reference" not in out[0]
    assert out[2]["messages"][0]["role"] == "system" and "messages" not in out[0]
    assert set(out[0]) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}

    system = json_rows(run_cli(["generate", tiny_llama, "-p", "Plain prompt?", "--system", "Be brief.",
                                "--max-new-tokens", "3", "--json"], capsys).out)
    assert system[0]["prompt_tokens"] == out[2]["prompt_tokens"]


def test_raw_sends_the_text_as_is(tiny_llama, tmp_path, capsys):
    from transformers import AutoTokenizer

    text = "Once upon a time"
    result = run_cli(["generate", tiny_llama, "-p", text, "--raw", "--max-new-tokens", "3", "--json"], capsys)
    assert result.code == 0, result.err
    assert json_rows(result.out)[0]["prompt_tokens"] == len(AutoTokenizer.from_pretrained(tiny_llama)(text).input_ids)
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    refused = run_cli(["generate", tiny_llama, "--prompts-file", messages, "--raw"], capsys)
    assert refused.code == 2 and "--raw" in refused.err


def test_stream_prints_the_same_answer(adapter, capsys):
    args = ["generate", adapter, "-p", "Tell me a story.", "--max-new-tokens", "8"]
    streamed, plain = run_cli([*args, "--stream"], capsys), run_cli(args, capsys)
    assert streamed.code == 0, streamed.err
    assert streamed.out.strip() == plain.out.strip() and plain.out.strip()


def test_adapter_target_and_compare_base(adapter, tiny_llama, capsys):
    ask = ["-p", "Tell me a story.", "--max-new-tokens", "8"]
    result = run_cli(["generate", adapter, *ask, "--compare-base", "--json"], capsys)
    assert result.code == 0, result.err
    (row,) = json_rows(result.out)
    base_alone = json_rows(run_cli(["generate", tiny_llama, *ask, "--json"], capsys).out)[0]
    assert row["base"]["completion"] == base_alone["completion"]
    assert row["completion"] != row["base"]["completion"]  # the adapter changes the answer
    text = run_cli(["generate", adapter, *ask, "--compare-base"], capsys).out
    assert "--- with the adapter:" in text and "--- base model alone:" in text


def test_a_prompts_file_with_a_byte_order_mark(tiny_llama, tmp_path, capsys):
    """The mark a Windows editor writes first is not part of the first prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfHi there\nAnd again\n")
    result = run_cli(["generate", tiny_llama, "--prompts-file", prompts, "--max-new-tokens", "2", "--json"], capsys)
    assert result.code == 0, result.err
    assert [row["prompt"] for row in json_rows(result.out)] == ["Hi there", "And again"]


def test_prints_no_library_notices(adapter):
    """A user's terminal gets lora's output, not notices meant for the libraries' developers (PEFT reading
    transformers' deprecated is_gradient_checkpointing when it attaches an adapter, bitsandbytes' optional-kernel
    note on AVX512-BF16 CPUs): the real command, in a process of its own, so no test setup filters them."""
    done = subprocess.run([sys.executable, "-m", "lora_cli", "generate", adapter, "-p", "Hi", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "kernels-community" not in done.stderr, done.stderr


def test_load_in_4bit_and_qlora_adapters(tiny_llama, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from lora_cli.generate import Sampling, generate, load_target

    qlora = make_adapter(tiny_llama, tmp_path / "qlora", quantized=True)
    as_trained = load_target(str(qlora))  # a QLoRA adapter brings its base in NF4, as it was trained
    assert as_trained.is_adapter and any(isinstance(m, Linear4bit) for m in as_trained.model.modules())
    (result,) = generate(str(tiny_llama), ["Hi"], sampling=Sampling(max_new_tokens=3), load_in_4bit=True)
    assert 1 <= result.completion_tokens <= 3


def test_chat_keeps_history_and_resets(tiny_llama, monkeypatch):
    from lora_cli import generate as gen

    target = gen.load_target(str(tiny_llama))
    seen = []
    real_encode = gen.encode
    def spy(target, prompt, *args):
        seen.append(len(prompt.messages))
        return real_encode(target, prompt, *args)

    monkeypatch.setattr(gen, "encode", spy)
    lines = iter(["Hello", "How are you?", "/reset", "Again", "/nonsense", "/exit", "never read"])
    written = []
    gen.chat(target, gen.Sampling(max_new_tokens=3), system="Be brief.", read=lambda prompt: next(lines),
             write=lambda text="", **kwargs: written.append(text))
    assert seen == [2, 4, 2]  # system + user; + assistant + user; after /reset, system + user again
    assert "(history cleared)" in written and any("Unknown command /nonsense" in w for w in written)


def test_chat_from_the_terminal(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))  # then end of input, which leaves like /exit
    result = run_cli(["generate", tiny_llama, "--chat", "--max-new-tokens", "3"], capsys)
    assert result.code == 0, result.err
    assert "/reset" in result.out and result.out.count("> ") == 2


def test_bad_targets_and_arguments(tiny_llama, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (["generate", tmp_path / "missing", "-p", "x"], "does not exist"),
        (["generate", "./missing-model", "-p", "x"], "does not exist"),
        (["generate", tmp_path / "empty", "-p", "x"], "neither an adapter folder"),
        (["generate", tmp_path / "file.txt", "-p", "x"], "is a file"),
        (["generate", "nobody-xyz/no-such-model", "-p", "x"], "Hugging Face hub"),
        (["generate", tiny_llama], "No prompts"),
        (["generate", tiny_llama, "-p", "x", "--compare-base"], "adapter folder"),
        (["generate", tiny_llama, "-p", "x", "-p", "y", "--stream"], "single prompt"),
        (["generate", tiny_llama, "-p", "x", "--temperature", "-1"], "--temperature"),
        (["generate", tiny_llama, "-p", "x", "--base", tiny_llama], "--base is for adapter"),
        (["generate", tiny_llama, "--prompts-file", tmp_path / "nope.txt"], "does not exist"),
        (["generate", tiny_llama, "--chat", "-p", "x"], "--chat"),
    ]
    for args, message in cases:
        result = run_cli(args, capsys)
        assert result.code == 2 and message in result.err and "Traceback" not in result.err, (args, result.err)
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    result = run_cli(["generate", tiny_llama, "--prompts-file", bad_rows], capsys)
    assert result.code == 2 and "line 2" in result.err and "'prompt'" in result.err
