"""training.report_to: TensorBoard and Trackio (offline, local files) get the losses, the resolved recipe and lora's
own figures, read back from what they wrote; a tracker that is not installed or misspelt is a recipe error before
any weights load."""

import json
import os
import subprocess
import sys

import yaml

from conftest import error_line, run_cli, run_lora_process, write_jsonl
from lora_cli.recipe import build_recipe
from lora_cli.train import train
from test_train import CHATS


def raw_recipe(tmp_path, model_dir, report_to, **training):
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(write_jsonl(tmp_path / "chats.jsonl", CHATS))},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 1000,
                     "gradient_checkpointing": False, "max_length": 64, "report_to": report_to, **training},
        "output_dir": str(tmp_path / "out"),
    }


def test_tensorboard_gets_losses_recipe_and_our_figures(tmp_path, tiny_llama, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    train(build_recipe(raw_recipe(tmp_path, tiny_llama, "tensorboard"), source="tb.yaml"))
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_second")[1:])  # a rate needs two logs
    assert all(e.value > 0 for e in events.Scalars("train/peak_ram_gib"))
    audit = json.loads((tmp_path / "out" / "data_audit.json").read_text())
    assert events.Scalars("data_audit/examples_train")[0].value == audit["examples"]["train"] == len(CHATS)
    assert events.Scalars("data_audit/tokens_max")[0].value == audit["tokens"]["max"]
    assert "data_audit/eos_trained_share" in scalars
    recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in recipe_text.splitlines()))["lora"]["r"] == 4


READ_TRACKIO = """
import json, sys
from trackio.api import Api
from trackio.sqlite_storage import SQLiteStorage
(run,) = list(Api().runs(sys.argv[1]))
print(json.dumps({"config": run.config, "logs": SQLiteStorage.get_logs(sys.argv[1], run.name)}, default=str))
"""


def test_trackio_offline_gets_losses_recipe_and_our_figures(tmp_path, tiny_llama):
    """In processes of their own: trackio reads TRACKIO_DIR, where it keeps its local database, once on import."""
    recipe = tmp_path / "trackio.yaml"
    recipe.write_text(yaml.safe_dump(raw_recipe(tmp_path, tiny_llama, "trackio", project="lora-test")), encoding="utf-8")
    env = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    done = run_lora_process(["train", recipe], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO, "lora-test"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    logged = json.loads(read.stdout.splitlines()[-1])
    assert logged["config"]["recipe.lora.r"] == 4 and logged["config"]["recipe.model.name_or_path"] == str(tiny_llama)
    losses = [row for row in logged["logs"] if "train/loss" in row]
    assert [row["train/global_step"] for row in losses] == [1, 2, 3]
    assert [row["step"] for row in losses] == [0, 1, 2]  # our figures joined the trainer's log calls, no extra steps
    assert any(row.get("train/tokens_per_second", 0) > 0 for row in logged["logs"])
    assert any(row.get("train/peak_ram_gib", 0) > 0 for row in logged["logs"])
    assert logged["config"]["data_audit.examples_train"] == len(CHATS)


def test_missing_or_misspelt_tracker_is_a_recipe_error(tmp_path, tiny_llama, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw_recipe(tmp_path, tiny_llama, "none")), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if trackio were not installed
    line = error_line(run_cli(["train", recipe, "--set", "training.report_to=trackio"], capsys))
    assert "training.report_to names trackio, which is not installed" in line and "pip install 'lora-cli[trackio]'" in line
    for module in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, module, None)
    line = error_line(run_cli(["train", recipe, "--set", "training.report_to=[tensorboard]"], capsys))
    assert "pip install 'lora-cli[tensorboard]'" in line
    line = error_line(run_cli(["train", recipe, "--set", "training.report_to=tensorbord"], capsys))
    assert "Did you mean 'tensorboard'?" in line and str(recipe) in line
    assert not (tmp_path / "out").exists()  # refused before anything loaded or was written
