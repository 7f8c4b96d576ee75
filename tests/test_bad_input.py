"""Bad input, through the real CLI: exit code 2, one clear paragraph, no traceback, nothing written that looks complete.

Recipe validation (syntax with line and column, unknown keys, types, ranges, conflicts) is in test_recipe.py and
malformed JSONL rows in test_train.py; this file covers the rest of the list, the safety rules, and a property test
that random YAML text never gets past the loader as anything but a recipe or our own error.
"""

import json
import re
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO, error_line, run_cli, write_jsonl
from lora_cli.errors import LoraError
from lora_cli.recipe import load_recipe
from lora_cli.train import newest_checkpoint

CHAT = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}]}


def assert_nothing_complete(out: Path) -> None:
    """No adapter and no complete checkpoint, where a user or --resume would look for one."""
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert newest_checkpoint(out) is None


def write_recipe(tmp_path, model_dir, train, **sections) -> Path:
    raw = {"model": {"name_or_path": str(model_dir)}, "data": {"train": str(train)},
           "training": {"max_steps": 1, "max_length": 128}, "output_dir": str(tmp_path / "out"), **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


CHAT_LINE = json.dumps(CHAT) + "\n"
# (what, the files written next to the recipe, data section, fragments of the message)
BAD_DATA = [
    ("empty file", {"train.jsonl": ""}, {"train": "train.jsonl"}, ["train.jsonl", "has no examples"]),
    ("folder without data files", {"data/notes.md": "not data"}, {"train": "data"},
     ["has no .jsonl, .json, .csv, .parquet or .txt file"]),
    ("csv with a header only", {"train.csv": "instruction,output\n"}, {"train": "train.csv"}, ["has no examples"]),
    ("csv row with an extra value", {"train.csv": 'instruction,output\n"Add 2 and 2",4\nAdd 3, and 3,6\n'},
     {"train": "train.csv"}, ["train.csv, line 3", "header's 2 values", "quote values"]),
    ("csv row with a missing value", {"train.csv": "instruction,output\nAdd 2 and 2,4\n\nAdd 3 and 3\n"},
     {"train": "train.csv"}, ["train.csv, line 4", "header's 2 values"]),
    ("column missing for the format", {"train.csv": "instruction,response\nAdd 2 and 2,4\n"},
     {"train": "train.csv", "format": "alpaca"}, ["line 2", "alpaca format needs a 'output' column"]),
    ("not utf-8", {"train.jsonl": b'{"text": "caf\xe9"}\n'}, {"train": "train.jsonl"}, ["not UTF-8", "byte 13"]),
    ("not parquet", {"train.parquet": b"PAR1 this is not parquet"}, {"train": "train.parquet"},
     ["cannot be read as parquet"]),
    ("json that is not a list", {"train.json": '"just a string"'}, {"train": "train.json"}, ["JSON list of objects"]),
    ("bad eval row", {"train.jsonl": CHAT_LINE, "eval.jsonl": CHAT_LINE + '{"messages": "not a list"}\n'},
     {"train": "train.jsonl", "eval": "eval.jsonl"}, ["data.eval", "eval.jsonl, line 2", "must be a non-empty list"]),
]


@pytest.mark.parametrize("files, data, fragments", [case[1:] for case in BAD_DATA], ids=[case[0] for case in BAD_DATA])
def test_bad_data(tmp_path, tiny_llama, capsys, files, data, fragments):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    data = {key: str(tmp_path / value) if key in ("train", "eval") else value for key, value in data.items()}
    recipe = write_recipe(tmp_path, tiny_llama, "unused", data=data)
    message = error_line(run_cli(["train", recipe], capsys))
    field = "data.eval" if "eval" in data else "data.train"
    for fragment in [field, *fragments]:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", [CHAT] * 4)


def test_empty_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing here yet\n")
    message = error_line(run_cli(["train", recipe], capsys))
    assert "data.train is required" in message and "empty.yaml" in message


def test_recipe_that_is_a_folder_or_not_text(tmp_path, capsys):
    assert "is a folder" in error_line(run_cli(["train", tmp_path], capsys))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert "not UTF-8 text" in error_line(run_cli(["train", recipe], capsys))


def test_yaml_that_would_run_code_is_refused(tmp_path, capsys):
    proof = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'model: !!python/object/apply:os.system ["touch {proof}"]\n')
    message = error_line(run_cli(["train", recipe], capsys))
    assert "line 1" in message and "cannot be read" in message
    assert not proof.exists()


def test_bad_set_value(tmp_path, chats, tiny_llama, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, chats)
    message = error_line(run_cli(["train", recipe, "--set", "lora.target_modules=[q_proj"], capsys))
    assert "--set lora.target_modules" in message and "cannot be read" in message


def test_nonexistent_target_modules(tmp_path, chats, tiny_llama, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, chats, lora={"target_modules": ["q_proj", "query_key_value"]})
    message = error_line(run_cli(["train", recipe], capsys))
    assert "query_key_value is not a linear layer" in message and "gate_proj" in message
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file(tmp_path, chats, tiny_llama, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, chats)
    (tmp_path / "out").write_text("my notes")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert "is a file" in error_line(run_cli(["train", recipe, *extra], capsys))
    assert (tmp_path / "out").read_text() == "my notes"


def test_resume_of_a_run_killed_before_its_first_checkpoint(tmp_path, chats, tiny_llama, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, chats)
    partial = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")
    message = error_line(run_cli(["train", recipe, "--resume"], capsys))
    assert "no checkpoint" in message and "written completely" in message
    assert_nothing_complete(tmp_path / "out")


def test_pickled_weights_are_refused_unless_the_recipe_opts_in(tmp_path, chats, tiny_llama, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_llama, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")  # what older checkpoints on the hub look like
    weights.unlink()
    recipe = write_recipe(tmp_path, pickled, chats)
    message = error_line(run_cli(["train", recipe, "--dry-run"], capsys))
    assert "no safetensors weights" in message and "model.use_safetensors: false" in message

    result = run_cli(["train", recipe, "--dry-run", "--set", "model.use_safetensors=false"], capsys)
    assert result.code == 0, result.err[-3000:]
    assert "Dry run" in result.out


def test_trust_remote_code_only_when_asked_and_with_a_warning(tmp_path, chats, tiny_llama):
    from lora_cli.train import train

    trusting = write_recipe(tmp_path, tiny_llama, chats,
                            model={"name_or_path": str(tiny_llama), "trust_remote_code": True})
    with pytest.warns(UserWarning, match="trust_remote_code is on: code shipped with"):
        train(load_recipe(trusting), dry_run=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_recipe(write_recipe(tmp_path, tiny_llama, chats)), dry_run=True)
    assert not [w for w in caught if "trust_remote_code" in str(w.message)]


def test_no_user_string_reaches_a_shell():
    """Subprocesses get argument lists, never a shell; YAML is only ever parsed safely; no pickle loading of ours."""
    forbidden = re.compile(
        r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput|subprocess\.getstatusoutput|"
        r"yaml\.unsafe_load|yaml\.load\((?![^)]*Loader=_Loader)|yaml\.full_load|(?<![.\w])eval\(|(?<![.\w])exec\(|"
        r"pickle\.load|torch\.load\("
    )
    sources = sorted((REPO / "lora_cli").rglob("*.py"))
    assert any(path.parent.name == "speed" for path in sources)  # every subfolder is read
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if forbidden.search(line)]
    assert not found, found


# Property test: any text at all, as a recipe file, is a recipe or our own error, never a crash.
yaml_tokens = st.sampled_from([
    "model:", "lora:", "data:", "training:", "quantization:", "output_dir:", "  r:", "  alpha:", "  train:",
    "  learning_rate:", "  name_or_path:", "  target_modules:", " 8", " -1", " 1e-4", " .inf", " .nan", " null",
    " true", " [q_proj, v_proj]", " {a: 1}", " 'x'", " \"unterminated", " &a", " *a", " !!binary aGk=",
    " !!python/name:os.system", " ? [a]\n  : b", "- item", "\t", ":", "{", "]", "\n", "\n  ", "%YAML 1.2\n---\n",
    " chats.jsonl", "---\n", "...\n", "#", "\x00", "\ufeff",
])
yaml_texts = st.one_of(st.lists(yaml_tokens, max_size=30).map("".join), st.text(max_size=60))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=yaml_texts)
@example(text=" [q_proj, v_proj]:")  # a list as a key (found by this test)
@example(text="{a: 1}: 2")
def test_any_text_is_a_recipe_or_a_lora_error(tmp_path, text):
    (tmp_path / "chats.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(path)
    except LoraError as error:
        assert str(error).strip() and "\n" not in " ".join(str(error).split())


@pytest.fixture
def adapter(tmp_path, tiny_llama):
    """A LoRA adapter for the tiny Llama, as PEFT saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merge_onto_the_wrong_base(tmp_path, tiny_llama, adapter, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"  # the same tokenizer, a narrower model
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(other)
    message = error_line(run_cli(["merge", adapter, tmp_path / "merged", "--base", other], capsys))
    assert "does not fit the base model" in message and "size mismatch" in message
    assert not (tmp_path / "merged").exists()


def test_generate_and_merge_on_folders_that_are_not_models(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    assert "neither an adapter folder" in error_line(run_cli(["generate", junk, "--prompt", "hi"], capsys))
    killed = tmp_path / "killed-run" / "checkpoints" / "checkpoint-2"  # a lora train output stopped before the end
    killed.mkdir(parents=True)
    (killed / "adapter_config.json").write_text("{}")
    message = error_line(run_cli(["generate", tmp_path / "killed-run", "--prompt", "hi"], capsys))
    assert "killed-run" in message and "training did not finish" in message
    message = error_line(run_cli(["merge", tmp_path / "killed-run", tmp_path / "merged"], capsys))
    assert "training did not finish" in message
    assert not (tmp_path / "merged").exists()
