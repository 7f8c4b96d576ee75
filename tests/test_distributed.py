"""Several processes training as one (gloo on CPU), and the command line `--gpus N` builds for accelerate."""

import json
import shutil
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from lora_cli.launch import accelerate_command, strip_gpus_option


def two_process_run(recipe, *options):
    # torch's own launcher: accelerate needs MPI for several CPU processes; on GPUs `lora train --gpus N` uses it.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lora_cli", "train",
         str(recipe), *options],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_one_adapter_written_once_and_resume(tmp_path, tiny_llama):
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(16)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_llama)},
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows))},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2,
                     "gradient_checkpointing": False, "learning_rate": 5e-3},
        "output_dir": str(tmp_path / "out"),
    }))
    proc = two_process_run(recipe)
    out = tmp_path / "out"
    assert proc.stdout.count("Data audit") == 1 and proc.stdout.count("Done.") == 1  # only the main process prints
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]  # logged once, not once per process
    # 16 examples, 2 per process and step: one epoch is 4 steps when both processes take part.
    assert metrics[0]["epoch"] == 0.25
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"]
    assert not (out / "training_args.bin").exists()
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in weights.items())

    # Stopped after its first checkpoint (what a kill leaves), then resumed on the same number of processes:
    # the same adapter as the uninterrupted run.
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    resumed = two_process_run(recipe, "--resume")
    assert "checkpoint-2" in resumed.stdout
    again = load_file(out / "adapter_model.safetensors")
    assert max((weights[k] - again[k]).abs().max().item() for k in weights) < 1e-4


def test_gpus_option_becomes_an_accelerate_launch():
    argv = ["train", "r.yaml", "--gpus", "2", "--set", "lora.r=8"]
    assert strip_gpus_option(argv) == ["train", "r.yaml", "--set", "lora.r=8"]
    assert strip_gpus_option(["train", "r.yaml", "--gpus=4"]) == ["train", "r.yaml"]
    ddp = accelerate_command(2, None, strip_gpus_option(argv))
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--num_processes") + 1] == "2" and "--multi_gpu" in ddp and "--use_fsdp" not in ddp
    assert ddp[-6:] == ["-m", "lora_cli", "train", "r.yaml", "--set", "lora.r=8"]
    fsdp = accelerate_command(2, "fsdp", ["train", "r.yaml"])
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_version") + 1] == "2" and "--multi_gpu" not in fsdp
