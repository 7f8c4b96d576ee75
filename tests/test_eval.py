"""lora eval: answer checks in every match mode and input form, loss as lora train computes it, lm-eval on a local
task offline, base beside target (and the starting adapter of a chained adapter), GGUF targets, the recipe's eval
section at the end of training, and one-paragraph errors for bad input. A tiny Llama trained to start its answers
with "Arr" stands in for the pirate demo; the embedded SmolLM2 for the GGUF target."""

import json
import sys

import pytest
import yaml

from conftest import error_line, run_cli, write_jsonl
from lora_cli.errors import LoraError
from lora_cli.evaluate.answers import read_answers
from lora_cli.recipe import build_recipe
from lora_cli.train import train
from test_merge import make_adapter

QUESTIONS = ["What is an island?", "What is a map?", "What is gold?", "Say hello.", "What is a dog?", "What is a star?",
             "What is tea?", "How are you?"]
PIRATE = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Arr, matey! Aye."}]}
          for q in QUESTIONS]
# Two of the questions were not trained on; the last row is right only for an answer that does not start with "Arr".
CHECKS = [*({"prompt": q, "answer": "^Arr", "match": "regex"} for q in [*QUESTIONS[:4], "What is a cat?", "Hi there!"]),
          {"prompt": "What is a boat?", "answer": "^(?!Arr)", "match": "regex"}]
TASK_ROWS = [{"question": q, "choices": ["Arr, matey!", "Paris", "seven"], "label": 0} for q in QUESTIONS[:5]]


def report_of(result) -> dict:
    assert result.code == 0, result.err[-3000:]
    return json.loads(result.out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-files")
    write_jsonl(folder / "task.jsonl", TASK_ROWS)
    (folder / "task.yaml").write_text(yaml.safe_dump({
        "task": "pirate_choice", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(folder / "task.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}],
    }), encoding="utf-8")
    return {"train": write_jsonl(folder / "pirate.jsonl", PIRATE), "checks": write_jsonl(folder / "checks.jsonl", CHECKS),
            "task": folder / "task.yaml", "folder": folder}


@pytest.fixture(scope="module")
def pirate(tiny_llama, files, tmp_path_factory):
    """A tiny Llama adapter that learned to start with "Arr", trained with an eval section in its recipe."""
    out = tmp_path_factory.mktemp("pirate") / "out"
    recipe = build_recipe({
        "model": {"name_or_path": str(tiny_llama)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(files["train"])},
        "training": {"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 3e-2, "logging_steps": 10,
                     "save_steps": 1000, "gradient_checkpointing": False, "max_length": 64},
        "eval": {"answers": str(files["checks"]), "max_new_tokens": 6, "batch_size": 4},
        "output_dir": str(out),
    }, source="pirate.yaml")
    summary = train(recipe)
    return out, summary


def test_match_modes(tmp_path):
    rows = write_jsonl(tmp_path / "checks.jsonl", [
        {"prompt": "q", "answer": "Paris", "match": "exact"},
        {"prompt": "q", "answer": ["Paris", "Lutetia"]},
        {"prompt": "q", "answer": r"^Arr\b", "match": "regex"},
        {"prompt": "q", "answer": 1250, "match": "number"},
        {"prompt": "q", "answer": "-0.5", "match": "number"},
        {"prompt": "q", "answer": "B", "match": "choice"},
        {"prompt": "q", "answer": "Mars", "match": "choice", "choices": ["Paris", "Mars", "Rome"]},
    ])
    exact, contains, regex, number, negative, letter, option = read_answers(rows)
    assert exact.is_correct(" paris. ") and not exact.is_correct("It is Paris.")
    assert contains.is_correct("It is LUTETIA, now Paris") and contains.is_correct("paris") and not contains.is_correct("Rome")
    assert regex.is_correct("Arr, matey!") and not regex.is_correct("Arrow") and not regex.is_correct("I say Arr")
    assert number.is_correct("First 3 then 1,250") and number.is_correct("1250.0") and not number.is_correct("1250 or 7")
    assert negative.is_correct("it drops to -0.5") and not negative.is_correct("0.5")
    assert letter.is_correct("B") and letter.is_correct("(B) Mars") and letter.is_correct("The answer is B.")
    assert not letter.is_correct("A) Paris") and not letter.is_correct("No idea")
    assert option.is_correct("B") and option.is_correct("It is Mars, the red one") and not option.is_correct("Rome")


def test_answers_in_every_form(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"},
                                               {"messages": messages, "answer": "Paris", "match": "exact"}])
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps([{"prompt": "Capital of France?", "answer": "Paris"}]), encoding="utf-8")
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Hi", "answer": "x"}).encode() + b"\n")
    plain, chat = read_answers(jsonl, default_match="exact")
    assert plain.match == "exact" and plain.prompt.text == "Capital of France?"  # --match for rows without one
    assert chat.prompt.messages == messages and chat.line == 2
    assert [q.prompt.text for q in read_answers(as_list)] == ["Capital of France?"]
    assert read_answers(marked)[0].match == "contains"


def test_recipe_eval_writes_eval_json_and_the_model_card(pirate, files):
    out, summary = pirate
    report = json.loads((out / "eval.json").read_text())
    assert summary["eval"]["target"]["accuracy"] == report["target"]["accuracy"]
    assert report["target"]["accuracy"] > report["base"]["accuracy"]
    fixed = {row["line"] for row in report["changes_from_base"]["fixed"]}
    assert {1, 2, 3, 4} <= fixed  # the trained questions start with "Arr" now, not before
    assert all(row["target"].startswith("Arr") for row in report["changes_from_base"]["fixed"])
    assert [row["line"] for row in report["changes_from_base"]["broken"]] == [7]  # "^(?!Arr)" was right before
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and card.index("## Evaluation") < card.index("## Use it")
    assert f"{report['target']['accuracy']:.1%}" in card and f"{report['base']['accuracy']:.1%}" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["eval"]["answers"] == str(files["checks"])


def test_lora_eval_answers_as_training_did_batched_or_not(pirate, files, tmp_path, capsys):
    out, _ = pirate
    args = ["eval", out, "--answers", files["checks"], "--max-new-tokens", "6", "--compare-base"]
    batched = report_of(run_cli([*args, "--json", "--output", tmp_path / "eval.json"], capsys))
    assert json.loads((tmp_path / "eval.json").read_text()) == batched
    after_training = json.loads((out / "eval.json").read_text())
    for side in ("target", "base"):
        assert [r["answer"] for r in batched[side]["answers"]] == [r["answer"] for r in after_training[side]["answers"]]
    one_at_a_time = report_of(run_cli([*args, "--json", "--batch-size", "1"], capsys))
    for side in ("target", "base"):  # left padding changes no greedy answer
        assert [r["answer"] for r in one_at_a_time[side]["answers"]] == [r["answer"] for r in batched[side]["answers"]]
    table = run_cli(args, capsys)
    assert table.code == 0, table.err
    assert "answers correct (of 7)" in table.out and "fixed" in table.out and "broken (line 7)" in table.out


FORMATS = {  # one conversation in each format lora train reads
    "messages": {"messages": [{"role": "user", "content": "What is gold?"}, {"role": "assistant", "content": "Arr, matey! Aye."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is gold?"}, {"from": "gpt", "value": "Arr, matey! Aye."}]},
    "alpaca": {"instruction": "What is gold?", "input": "", "output": "Arr, matey! Aye."},
    "prompt_completion": {"prompt": "What is gold?", "completion": "Arr, matey! Aye."},
    "text": {"text": "What is gold? Arr, matey! Aye."},
}


def test_loss_is_the_runs_eval_loss_in_every_format(tiny_llama, files, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "held-out.jsonl", PIRATE[:6])  # one eval batch: the run's mean is per token too
    out = tmp_path / "run"
    train(build_recipe({
        "model": {"name_or_path": str(tiny_llama)}, "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(files["train"]), "eval": str(held_out)},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                     "eval_steps": 3, "save_steps": 1000, "gradient_checkpointing": False, "max_length": 64},
        "output_dir": str(out),
    }, source="loss.yaml"))
    run_eval_loss = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                     if "eval_loss" in r][-1]
    report = report_of(run_cli(["eval", out, "--data", held_out, "--compare-base", "--json"], capsys))
    assert report["target"]["loss"] == pytest.approx(run_eval_loss, rel=1e-4)
    assert report["target"]["tokens_scored"] == report["base"]["tokens_scored"] > 0
    base_alone = report_of(run_cli(["eval", tiny_llama, "--data", held_out, "--json"], capsys))["target"]
    assert report["base"]["loss"] == pytest.approx(base_alone["loss"], rel=1e-5)
    assert report["target"]["loss"] < report["base"]["loss"]

    losses = {}
    for fmt, row in FORMATS.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        side = report_of(run_cli(["eval", tiny_llama, "--data", path, "--json"], capsys))["target"]
        losses[fmt] = (side["loss"], side["tokens_scored"])
    assert losses["messages"] == losses["sharegpt"] == losses["alpaca"]  # the same chat, the same tokens scored
    assert losses["text"][1] > losses["prompt_completion"][1] > 0  # text scores every token, a completion only its own


def test_local_lm_eval_task_offline(pirate, tiny_llama, files, capsys):
    out, _ = pirate
    args = ["--tasks", files["task"], "--limit", "4", "--json"]
    report = report_of(run_cli(["eval", out, *args, "--compare-base"], capsys))
    target, base = report["target"]["tasks"]["pirate_choice"], report["base"]["tasks"]["pirate_choice"]
    assert target["examples"] == base["examples"] == 4
    assert 0 <= base["acc"] <= 1 and 0 <= target["acc"] <= 1
    alone = report_of(run_cli(["eval", tiny_llama, *args], capsys))["target"]["tasks"]["pirate_choice"]
    assert alone["acc"] == base["acc"]  # the base through disable_adapter() is the base model


def test_chained_adapter_shows_its_starting_adapter(tiny_llama, files, tmp_path, capsys):
    start = make_adapter(tiny_llama, tmp_path / "start", seed=3)
    chained = make_adapter(tiny_llama, tmp_path / "chained", seed=4)
    recipe = yaml.safe_load((chained / "recipe.yaml").read_text())
    recipe["model"]["adapter"] = str(start)  # what a recipe with model.adapter writes
    (chained / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    data = ["--data", files["train"], "--json"]
    report = report_of(run_cli(["eval", chained, *data, "--compare-base"], capsys))
    assert list(report)[:3] == ["target", "start", "base"] and report["start"]["model"] == str(start)
    assert report["start"]["loss"] == pytest.approx(report_of(run_cli(["eval", start, *data], capsys))["target"]["loss"], rel=1e-5)
    assert report["base"]["loss"] == pytest.approx(report_of(run_cli(["eval", tiny_llama, *data], capsys))["target"]["loss"], rel=1e-5)
    assert len({report[side]["loss"] for side in ("target", "start", "base")}) == 3
    table = run_cli(["eval", chained, "--data", files["train"], "--compare-base"], capsys).out
    assert "start adapter" in table.splitlines()[1] and "base" in table.splitlines()[1]


def test_gguf_target_is_the_embedded_model(files, embedded_dir, tmp_path, capsys):
    from lora_cli.embedded import gguf_path

    data, checks = write_jsonl(tmp_path / "d.jsonl", PIRATE[:3]), write_jsonl(tmp_path / "c.jsonl", CHECKS[:3])
    args = ["--data", data, "--answers", checks, "--max-new-tokens", "8", "--json"]
    from_gguf = report_of(run_cli(["eval", gguf_path(), *args], capsys))["target"]
    embedded = report_of(run_cli(["eval", "smollm2-135m-instruct", *args], capsys))["target"]
    assert from_gguf["loss"] == pytest.approx(embedded["loss"], rel=1e-4)  # the same weights, dequantized either way
    assert [r["answer"] for r in from_gguf["answers"]] == [r["answer"] for r in embedded["answers"]]


def test_bad_input(tiny_llama, files, tmp_path, capsys, monkeypatch):
    written = iter(range(100))

    def answers(*rows):
        path = tmp_path / f"bad-{next(written)}.jsonl"
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        return path

    ok = {"prompt": "Hi", "answer": "x"}
    cases = [
        (["--answers", tmp_path / "missing.jsonl"], "missing.jsonl' does not exist"),
        (["--answers", answers(ok, {"prompt": "Hi", "expected": "x"})], "line 2: the row has no 'answer' (its keys: prompt, expected)"),
        (["--answers", answers({"question": "Hi", "answer": "x"})], "line 1: the row has neither a 'prompt'"),
        (["--answers", answers(ok, {**ok, "match": "regexp"})], "line 2, 'match': unknown match mode 'regexp'. Did you mean 'regex'?"),
        (["--answers", answers(ok), "--match", "fuzzy"], "--match: unknown match mode 'fuzzy'"),
        (["--answers", answers({**ok, "answer": "(Arr", "match": "regex"})], "not a valid regular expression"),
        (["--answers", answers(ok, ok, '{"prompt": "Hi",')], "line 3, column"),
        (["--answers", answers({**ok, "match": "number"})], "match 'number' needs a number"),
        (["--answers", answers({**ok, "answer": "E", "match": "choice", "choices": ["a", "b"]})], "a letter A-B"),
        (["--data", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["--data", write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "reply": "r"}])], "cannot tell the format"),
        ([], "needs something to measure"),
        (["--answers", files["checks"], "--limit", "3"], "--limit"),
        (["--answers", files["checks"], "--compare-base"], "--base NAME"),
        (["--answers", files["checks"], "--output", tmp_path / "no" / "eval.json"], "--output: the folder"),
        (["--tasks", tmp_path / "missing.yaml"], "missing.yaml' does not exist"),
    ]
    for args, fragment in cases:
        assert fragment in error_line(run_cli(["eval", tiny_llama, *args], capsys)), (args, fragment)
    assert "does not exist" in error_line(run_cli(["eval", tmp_path / "nowhere", "--answers", files["checks"]], capsys))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert "pip install 'lora-cli[eval]'" in error_line(run_cli(["eval", tiny_llama, "--tasks", files["task"]], capsys))


def test_lm_eval_builtin_task_without_its_data_and_unknown_tasks():
    from lora_cli.evaluate.harness import load_tasks

    with pytest.raises(LoraError, match=r"not on this machine.*HF_HUB_OFFLINE=0 python -c .*load\(\['arc_easy'\]\)"):
        load_tasks(["arc_easy"])  # offline in the tests (conftest.py)
    with pytest.raises(LoraError, match="Did you mean 'arc_easy'"):
        load_tasks(["arc_eazy"])


def test_recipe_eval_section_errors(tmp_path, files):
    base = {"data": {"train": str(files["train"])}}
    cases = [
        ({"eval": {"answer": str(files["checks"])}}, "eval.answer is not a known key. Did you mean 'answers'?"),
        ({"eval": {"answers": str(files["checks"]), "match": "regexp"}}, "eval.match must be one of"),
        ({"eval": {"answers": "nowhere.jsonl"}}, "eval.answers names the file 'nowhere.jsonl'"),
        ({"eval": {"compare_base": False}}, "names nothing to measure"),
        ({"eval": {"answers": str(files["checks"]), "batch_size": 0}}, "eval.batch_size must be at least 1"),
    ]
    for extra, fragment in cases:
        with pytest.raises(LoraError, match=None) as caught:
            build_recipe({**base, **extra}, source="r.yaml")
        assert fragment in str(caught.value), (extra, str(caught.value))
