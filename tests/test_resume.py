"""Nothing lost: kill -9 and resume, partial checkpoints, resuming a different run, NaN losses (tiny random Llama)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, error_line, run_cli, write_jsonl
from lora_cli.checkpoints import MARKER, checkpoint_folders, read_marker
from lora_cli.recipe import load_recipe
from lora_cli.train import newest_checkpoint, train

CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}."}]}
    for i in range(12)
]
TRAINING = {"max_steps": 4, "save_steps": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
            "logging_steps": 1, "gradient_checkpointing": False, "max_length": 128}


def write_recipe(folder, model_dir, data_path, out, training=None):
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(data_path)},
        "training": {**TRAINING, **(training or {})},
        "output_dir": str(out),
    }))
    return path


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama):
    """An uninterrupted 4-step run: (recipe folder, data file, output folder, final adapter weights)."""
    folder = tmp_path_factory.mktemp("straight")
    data = write_jsonl(folder / "chats.jsonl", CHATS)
    out = folder / "out"
    train(load_recipe(write_recipe(folder, tiny_llama, data, out)))
    return folder, data, out, load_file(out / "adapter_model.safetensors")


def copy_run(straight, tmp_path):
    """The straight run's output folder, moved, as a run that stopped after its last checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(straight[2], copy)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (copy / name).unlink()
    return copy


def test_kill_9_after_the_first_checkpoint_then_resume(tmp_path, tiny_llama, straight, capsys):
    _, data, _, expected = straight
    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path, tiny_llama, data, out)
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "lora_cli", "train", str(recipe)], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while newest_checkpoint(out) is None:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert not (out / "adapter_config.json").exists(), "the kill landed after the run had finished"
    stopped_at = newest_checkpoint(out)

    resumed = run_cli(["train", recipe, "--resume"], capsys)  # the same entry point, without a second start-up
    assert resumed.code == 0, resumed.err[-3000:]
    assert f"Resuming from {stopped_at}" in resumed.out
    difference = max_difference(expected, load_file(out / "adapter_model.safetensors"))
    with capsys.disabled():
        print(f"\nkill -9 after {stopped_at.name}, resumed: max weight difference {difference:.3g}")
    assert difference < 1e-4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4], "the steps after the checkpoint are logged once, by the resumed run"


def test_resume_skips_partial_checkpoints(tmp_path, straight, tiny_llama):
    """A checkpoint with a truncated file, or with no completion marker, is never resumed from."""
    _, data, _, expected = straight
    run = copy_run(straight, tmp_path)
    checkpoints = run / "checkpoints"
    # save_total_limit 2: the straight run deleted checkpoint-1 and -2, each after a newer one was marked complete.
    assert [p.name for p in checkpoint_folders(checkpoints)] == ["checkpoint-3", "checkpoint-4"]
    optimizer = checkpoints / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # as if cut short; its marker still lists the full size
    partial = checkpoints / "checkpoint-5"
    partial.mkdir()
    shutil.copy(checkpoints / "checkpoint-4" / "adapter_config.json", partial)  # written, but never marked complete
    assert newest_checkpoint(run).name == "checkpoint-3"

    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, data, run))
    train(recipe, resume=True)
    assert max_difference(expected, load_file(run / "adapter_model.safetensors")) < 1e-4
    assert [p.name for p in checkpoint_folders(checkpoints)] == ["checkpoint-3", "checkpoint-4"]
    assert read_marker(checkpoints / "checkpoint-4")["step"] == 4


def test_resume_refuses_a_different_run_and_force_overrides(tmp_path, straight, tiny_llama, capsys):
    _, data, _, _ = straight
    run = copy_run(straight, tmp_path)  # also moved: output_dir may differ on resume
    changed_data = write_jsonl(tmp_path / "changed.jsonl", CHATS[:-1] + [CHATS[0]])
    recipe = write_recipe(tmp_path, tiny_llama, changed_data, run, training={"learning_rate": 1e-2, "logging_steps": 5})

    message = error_line(run_cli(["train", recipe, "--resume", "--set", "lora.r=8", "--set", "speed.fused_lora=false",
                                  "--set", "speed.cuda_graphs=false"], capsys))
    assert message.startswith("error: --resume:")
    for fragment in ("checkpoint-4", "training.learning_rate: 0.005 -> 0.01", "lora.r: 4 -> 8",
                     "data.train contents: sha256:", "--resume --force"):
        assert fragment in message, (fragment, message)
    assert "logging_steps" not in message and "output_dir" not in message and "speed" not in message
    assert not (run / "adapter_config.json").exists()

    message = error_line(run_cli(["train", recipe, "--resume", "--force", "--set", "lora.r=8"], capsys))
    assert "another shape, so it cannot be loaded: lora.r: 4 -> 8." in message

    result = run_cli(["train", recipe, "--resume", "--force"], capsys)
    assert result.code == 0, result.err
    assert "--force: continuing although these settings changed: data.train contents" in result.out
    assert (run / "adapter_config.json").is_file()


def test_non_finite_loss_stops_with_the_step_and_keeps_finite_checkpoints(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_llama, data, out, training={"learning_rate": 1e30, "save_steps": 1})
    message = error_line(run_cli(["train", recipe], capsys))
    assert "Training stopped at step 2: the loss became NaN or infinite" in message
    assert "last good checkpoint is" in message and "checkpoint-1" in message
    assert "lower training.learning_rate" in message and "float32" in message
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    kept = checkpoint_folders(out / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-1"] and (kept[0] / MARKER).is_file()
    weights = load_file(kept[0] / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

