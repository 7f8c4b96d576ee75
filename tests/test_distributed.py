"""Several processes training as one (gloo on CPU), on one machine or two, and the command lines `--gpus N` builds for
accelerate."""

import json
import shutil
import socket
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from accelerate.commands.config.config_args import load_config_from_file

from lora_cli.errors import LoraError
from lora_cli.launch import Machines, accelerate_command, strip_launcher_options


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
    assert strip_launcher_options(argv) == ["train", "r.yaml", "--set", "lora.r=8"]
    assert strip_launcher_options(["train", "r.yaml", "--gpus=4"]) == ["train", "r.yaml"]
    ddp = accelerate_command(2, None, strip_launcher_options(argv))
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--num_processes") + 1] == "2" and "--multi_gpu" in ddp and "--use_fsdp" not in ddp
    assert ddp[-6:] == ["-m", "lora_cli", "train", "r.yaml", "--set", "lora.r=8"]
    fsdp = accelerate_command(2, "fsdp", ["train", "r.yaml"])
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_version") + 1] == "2" and "--multi_gpu" not in fsdp


def test_launcher_options_for_several_machines_and_a_config_file():
    argv = ["train", "r.yaml", "--gpus", "8", "--num-machines", "2", "--machine-rank=1", "--main-process-ip",
            "10.0.0.1", "--main-process-port", "29501", "--accelerate-config", "ds.yaml", "--set", "lora.r=8"]
    assert strip_launcher_options(argv) == ["train", "r.yaml", "--set", "lora.r=8"]
    command = accelerate_command(8, None, ["train", "r.yaml"], Machines(2, 1, "10.0.0.1", 29501))
    option = {name: command[command.index(name) + 1] for name in
              ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")}
    assert option == {"--num_processes": "16", "--num_machines": "2", "--machine_rank": "1",
                      "--main_process_ip": "10.0.0.1", "--main_process_port": "29501"}  # processes over all machines
    config = REPO / "configs" / "accelerate" / "deepspeed-zero3.yaml"
    with_config = accelerate_command(2, "fsdp", ["train", "r.yaml"], config_file=config)
    assert with_config[with_config.index("--config_file") + 1] == str(config)
    assert "--use_fsdp" not in with_config and "--multi_gpu" not in with_config  # the file decides
    shipped = load_config_from_file(str(config))  # accelerate reads the shipped example as it would at launch
    assert shipped.distributed_type == "DEEPSPEED" and shipped.deepspeed_config["zero_stage"] == 3
    for machines, field in [(Machines(2, 0), "--main-process-ip"), (Machines(2, 2, "h"), "--machine-rank"),
                            (Machines(1, 0, None, 70000), "--main-process-port")]:
        try:
            machines.check()
            raise AssertionError(f"{machines} passed")
        except LoraError as error:
            assert field in str(error)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_train_the_adapter_of_one_process_with_the_same_global_batch(tmp_path, tiny_llama):
    """Two "machines" of one process each (gloo, a localhost rendezvous, as on two hosts), batch 2 each, against one
    process with batch 4: each step takes the same 4 examples (accelerate hands the machines alternate batches of
    one sampler) and averages the gradient over the same tokens, so the adapters agree."""
    rows = [{"messages": [{"role": "user", "content": f"{i} plus {i}?"}, {"role": "assistant", "content": str(i + i)}]}
            for i in range(10, 26)]  # equal token counts: every per-process mean weighs its tokens alike
    def recipe(name, batch):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_llama)},
            "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
            "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows))},
            "training": {"max_steps": 3, "per_device_train_batch_size": batch, "logging_steps": 1,
                         "gradient_checkpointing": False, "learning_rate": 5e-3, "save_strategy": "no"},
            "output_dir": str(tmp_path / name),
        }))
        return path

    two, one = recipe("two-machines", 2), recipe("one-process", 4)
    port = free_port()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
         "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lora_cli", "train", str(two)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "Done." in outputs[0][0] and "Done." not in outputs[1][0]  # the machine of rank 0 writes and prints
    single = subprocess.run([sys.executable, "-m", "lora_cli", "train", str(one)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    apart, together = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("two-machines",
                                                                                              "one-process"))
    assert apart.keys() == together.keys()
    assert any(torch.count_nonzero(v) for k, v in apart.items() if "lora_B" in k)
    assert max((apart[k] - together[k]).abs().max().item() for k in apart) < 1e-5
