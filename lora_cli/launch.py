"""`lora train --gpus N`: relaunch the same command under `accelerate launch`, one process per GPU.

accelerate does the launching (process group, ranks, environment); we only build its command line. The
recipe's `distributed` key picks data parallel (ddp, the default) or sharded training (fsdp); an accelerate config
file (`--accelerate-config`, e.g. configs/accelerate/deepspeed-zero3.yaml) picks anything else accelerate runs. Over
several machines each one runs the same command with its own `--machine-rank` (accelerate's own options, passed
through). Arguments go to accelerate as a list, never through a shell.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import LoraError

# lora train's options that are the launcher's, not the launched run's (the run would read them as its own).
LAUNCHER_OPTIONS = ("--gpus", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port",
                    "--accelerate-config")


@dataclass
class Machines:
    """Where the processes of a run over several machines meet: accelerate's options of the same names."""

    count: int = 1
    rank: int = 0
    main_ip: str | None = None
    main_port: int = 29500

    def check(self) -> None:
        if self.count < 1:
            raise LoraError(f"--num-machines must be 1 or more, got {self.count}.")
        if not 0 <= self.rank < self.count:
            raise LoraError(f"--machine-rank must be from 0 to {self.count - 1} (--num-machines {self.count}), "
                            f"got {self.rank}.")
        if self.count > 1 and not self.main_ip:
            raise LoraError("--num-machines > 1 needs --main-process-ip: the address of the machine with "
                            "--machine-rank 0, which every machine can reach.")
        if not 0 < self.main_port < 65536:
            raise LoraError(f"--main-process-port must be a TCP port (1-65535), got {self.main_port}.")


def strip_launcher_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCHER_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(option + "=" for option in LAUNCHER_OPTIONS)):
            out.append(arg)
    return out


def accelerate_command(num_processes: int, distributed: str | None, lora_args: list[str],
                       machines: Machines = Machines(), config_file: Path | None = None) -> list[str]:
    """num_processes on each machine; accelerate counts them over all machines."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    command += ["--num_processes", str(num_processes * machines.count), "--num_machines", str(machines.count),
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machines.count > 1:
        command += ["--machine_rank", str(machines.rank), "--main_process_ip", machines.main_ip,
                    "--main_process_port", str(machines.main_port)]
    if config_file is not None:  # the file says how the processes share the work (DeepSpeed, FSDP, ...)
        return [*command, "-m", "lora_cli", *lora_args]
    if distributed == "fsdp":
        # FSDP2 wrapping each decoder layer; the recipe's gradient checkpointing becomes FSDP's own, which avoids a
        # second all-gather in the backward pass.
        command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"]
    else:
        command += ["--multi_gpu"]
    return [*command, "-m", "lora_cli", *lora_args]


def relaunch_on_gpus(gpus: int, distributed: str | None, argv: list[str], machines: Machines = Machines(),
                     config_file: Path | None = None) -> int:
    """Run `lora ARGV` (without the launcher's options) on `gpus` GPUs of this machine, as machine `machines.rank`
    of `machines.count`; returns the exit code of the launched run."""
    import torch

    machines.check()
    if config_file is not None and not Path(config_file).is_file():
        raise LoraError(f"--accelerate-config: '{config_file}' is not a file (an accelerate config, as "
                        "`accelerate config` writes; configs/accelerate/ has examples).")
    available = torch.cuda.device_count()
    if available < gpus:
        raise LoraError(f"--gpus {gpus}: this machine has {available} GPU{'s' if available != 1 else ''}.")
    command = accelerate_command(gpus, distributed, strip_launcher_options(argv), machines, config_file)
    where = f", machine {machines.rank} of {machines.count}" if machines.count > 1 else ""
    how = f"config {config_file}" if config_file is not None else distributed or "ddp"
    print(f"launching on {gpus} GPUs{where} ({how}): {' '.join(command)}", flush=True)
    return subprocess.call(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
