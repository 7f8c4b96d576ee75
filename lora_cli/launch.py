"""`lora train --gpus N`: relaunch the same command under `accelerate launch`, one process per GPU.

accelerate does the launching (process group, ranks, environment); we only build its command line. The
recipe's `distributed` key picks data parallel (ddp, the default) or sharded training (fsdp). Arguments go
to accelerate as a list, never through a shell.
"""

import os
import subprocess
import sys

from lora_cli.errors import LoraError


def strip_gpus_option(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def accelerate_command(num_processes: int, distributed: str | None, lora_args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if distributed == "fsdp":
        # FSDP2 wrapping each decoder layer; the recipe's gradient checkpointing becomes FSDP's own, which avoids a
        # second all-gather in the backward pass.
        command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"]
    else:
        command += ["--multi_gpu"]
    return [*command, "-m", "lora_cli", *lora_args]


def relaunch_on_gpus(gpus: int, distributed: str | None, argv: list[str]) -> int:
    """Run `lora ARGV` (without --gpus) on `gpus` GPUs; returns the exit code of the launched run."""
    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise LoraError(f"--gpus {gpus}: this machine has {available} GPU{'s' if available != 1 else ''}.")
    command = accelerate_command(gpus, distributed, strip_gpus_option(argv))
    print(f"launching on {gpus} GPUs ({distributed or 'ddp'}): {' '.join(command)}", flush=True)
    return subprocess.call(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
