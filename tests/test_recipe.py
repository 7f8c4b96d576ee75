"""Recipe validation: every bad input is one clear paragraph, exit code 2, nothing written."""

import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, write_jsonl
from lora_cli.errors import LoraError
from lora_cli.recipe import TRAINING_DEFAULTS, build_recipe, load_recipe


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ])


def write_recipe(tmp_path, body: str, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def assert_user_error(result, *fragments):
    assert result.code == 2, (result.code, result.err)
    assert result.err.startswith("error: ")
    assert "Traceback" not in result.err
    assert result.err.strip().count("\n") == 0, "the message is one paragraph"
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


def test_defaults_are_filled_and_overrides_typed(tmp_path, chat_file):
    path = write_recipe(tmp_path, f"""
        data:
          train: {chat_file}
        training:
          learning_rate: 1e-4
    """)
    recipe = load_recipe(path, ["lora.r=8", "lora.target_modules=[q_proj, v_proj]", "training.max_steps=3"])
    assert recipe.lora.r == 8 and recipe.lora.alpha == 32
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)  # YAML 1.1 alone would read "1e-4" as a string
    assert recipe.training["max_steps"] == 3
    assert recipe.training["num_train_epochs"] == TRAINING_DEFAULTS["num_train_epochs"]
    assert recipe.output_dir == "runs/recipe"
    assert recipe.model.name_or_path == "smollm2-135m-instruct"
    assert recipe.quantization is None


def test_resolved_recipe_round_trips(tmp_path, chat_file):
    path = write_recipe(tmp_path, f"""
        quantization: {{load_in_4bit: true}}
        data: {{train: {chat_file}, eval: 0.2}}
    """)
    recipe = load_recipe(path)
    again = build_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()
    assert recipe.training["eval_strategy"] == "steps"


@pytest.mark.parametrize(
    "body, fragments",
    [
        ("lora:\n  r: 8\n   alpha: 3\n", ["line 3", "column", "cannot be read"]),
        ("lora:\n  alpah: 16\n", ["lora.alpah", "line 2", "Did you mean 'alpha'"]),
        ("lorra:\n  r: 8\n", ["lorra", "Did you mean 'lora'"]),
        ("lora:\n  r: sixteen\n", ["lora.r", "must be an integer", "sixteen"]),
        ("lora:\n  r: 0\n", ["lora.r", "positive"]),
        ("lora:\n  dropout: 1.0\n", ["lora.dropout", "below 1"]),
        ("lora:\n  target_modules: []\n", ["lora.target_modules", "empty"]),
        ("quantization:\n  load_in_4bit: true\n  load_in_8bit: true\n", ["load_in_4bit and load_in_8bit"]),
        ("quantization:\n  load_in_4bit: true\n  bnb_4bit_quant_type: nf5\n", ["bnb_4bit_quant_type", "nf4"]),
        ("training:\n  learnin_rate: 0.1\n", ["training.learnin_rate", "Did you mean 'learning_rate'"]),
        ("training:\n  num_train_epochs: many\n", ["training.num_train_epochs", "many"]),
        ("training:\n  learning_rate: -1.0\n", ["training.learning_rate", "greater than 0"]),
        ("training:\n  output_dir: x\n", ["training.output_dir", "top level"]),
        ("model:\n  dtype: float8\n", ["model.dtype", "bfloat16"]),
        ("lora:\n  r: 4\nlora:\n  r: 8\n", ["appears twice", "line 3"]),
        ("distributed: zero3\n", ["distributed", "fsdp"]),
        ("- just\n- a list\n", ["YAML mapping"]),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(tmp_path, chat_file, capsys, body, fragments):
    body = body if "data:" in body or body.startswith("-") else body + f"data:\n  train: {chat_file}\n"
    path = write_recipe(tmp_path, body)
    out = tmp_path / "out"
    result = run_cli(["train", path, "--output-dir", out], capsys)
    assert_user_error(result, str(path), *fragments)
    assert not out.exists()


def test_missing_data_file_is_named(tmp_path, capsys):
    path = write_recipe(tmp_path, "data:\n  train: nowhere/train.jsonl\n")
    assert_user_error(run_cli(["train", path], capsys), "data.train", "nowhere/train.jsonl", "does not exist")


def test_missing_data_key(tmp_path, capsys):
    path = write_recipe(tmp_path, "lora:\n  r: 8\n")
    assert_user_error(run_cli(["train", path], capsys), "data.train", "required")


def test_missing_recipe_file(tmp_path, capsys):
    assert_user_error(run_cli(["train", tmp_path / "nope.yaml"], capsys), "nope.yaml", "does not exist")


def test_bad_set_override(tmp_path, chat_file, capsys):
    path = write_recipe(tmp_path, f"data:\n  train: {chat_file}\n")
    assert_user_error(run_cli(["train", path, "--set", "lora.r"], capsys), "--set", "section.key=value")
    assert_user_error(run_cli(["train", path, "--set", "lora.r=-3"], capsys), "lora.r", "positive")


def test_non_empty_output_dir_is_refused(tmp_path, chat_file, capsys):
    path = write_recipe(tmp_path, f"data:\n  train: {chat_file}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_user_error(run_cli(["train", path, "-o", out], capsys), "not empty", "--overwrite", "--resume")
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_and_overwrite_together_are_refused(tmp_path, chat_file, capsys):
    path = write_recipe(tmp_path, f"data:\n  train: {chat_file}\n")
    assert_user_error(run_cli(["train", path, "--resume", "--overwrite"], capsys), "--resume", "--overwrite")


# Property test: whatever the recipe, the validator accepts it or raises our own error, nothing else.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
section_keys = {
    "model": ["name_or_path", "dtype", "attn_implementation", "trust_remote_code", "bogus"],
    "quantization": ["load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype"],
    "lora": ["r", "alpha", "dropout", "target_modules", "bias", "use_dora", "modules_to_save"],
    "data": ["train", "format", "eval", "chat_template"],
    "training": ["learning_rate", "max_steps", "num_train_epochs", "packing", "optim", "nonsense"],
}
recipes = st.fixed_dictionaries(
    {},
    optional={
        **{s: st.one_of(values, st.dictionaries(st.sampled_from(k), values, max_size=4)) for s, k in section_keys.items()},
        "output_dir": values,
        "distributed": values,
        "surprise": values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=recipes)
def test_validator_accepts_or_raises_lora_error(raw):
    try:
        build_recipe(raw, source="random.yaml")
    except LoraError as error:
        assert str(error).startswith("random.yaml")
