"""Multi-GPU `lora train` against one GPU, in the same run: data parallel (DDP) and sharded (FSDP) QLoRA.

Runs on a machine with 2+ GPUs, with the same random-weight model and fixed 2,048-token rows as speed.py:

    python benchmarks/distributed.py --modes single,ddp,fsdp --gpus 2 --results benchmarks/results
    python benchmarks/distributed.py --modes resume-ddp,resume-fsdp --arch tiny --gpus 2

Each mode runs the real command, `lora train RECIPE [--gpus N]`, on a QLoRA recipe (NF4, double quantization,
r=16 on all linear layers, batch 2 x 2048 per GPU). Throughput comes from the run's metrics.jsonl: tokens
(counted across all GPUs) between the first and the last log, over the time between them; peak is rank 0's
torch.cuda.max_memory_allocated during training, from train_summary.json. Each mode is a row of the results table
(benchmarks/results_table.py: --results DIR appends to DIR/results.csv), ddp's and fsdp's beside the single GPU's.

resume-ddp and resume-fsdp check resuming with the same number of GPUs: 6 steps straight, then the state a kill
after the checkpoint of step 3 leaves (later checkpoint and adapter removed) resumed with --resume; the two
adapters are compared, and the FSDP adapter goes through `lora merge`.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import TABLE, append_rows, current_commit, gpu_tag, run_id
from speed import BATCH, SEQ, TARGETS, WORK, build_model, write_data

STEPS = 20


def recipe_file(name: str, arch: str, distributed: str | None, steps: int = STEPS, save_steps: int | None = None) -> Path:
    training = {"max_steps": steps, "per_device_train_batch_size": BATCH, "learning_rate": 2e-4,
                "logging_steps": 5, "save_strategy": "no", "max_length": SEQ}
    if save_steps:
        training.update(save_strategy="steps", save_steps=save_steps, logging_steps=1)
    recipe = {
        "model": {"name_or_path": str(build_model(arch)), "attn_implementation": "sdpa"},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": str(write_data("fixed"))},
        "training": training,
        "output_dir": str(WORK / f"dist-{name}"),
    }
    if distributed == "fsdp":
        recipe["distributed"] = "fsdp"
    path = WORK / f"dist-{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def lora(*args, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lora_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        print(f"lora {' '.join(map(str, args))}: failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def check_resume(distributed: str, arch: str, gpus: int, timeout: int) -> dict | None:
    from safetensors.torch import load_file

    recipe = recipe_file(f"resume-{distributed}", arch, distributed, steps=6, save_steps=3)
    out = WORK / f"dist-resume-{distributed}"
    if lora("train", recipe, "--gpus", gpus, "--overwrite", timeout=timeout).returncode != 0:
        return None
    straight = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")  # what a kill after the checkpoint of step 3 leaves
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    resumed_run = lora("train", recipe, "--gpus", gpus, "--resume", timeout=timeout)
    if resumed_run.returncode != 0:
        return None
    resumed = load_file(out / "adapter_model.safetensors")
    result = {
        "resumed_from": next((w for w in resumed_run.stdout.split() if "checkpoint-" in w), None),
        "max_abs_difference": max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight),
        "max_abs_weight": max(v.float().abs().max().item() for v in straight.values()),
    }
    if distributed == "fsdp":
        merged = lora("merge", out, WORK / "dist-resume-fsdp-merged", "--force", timeout=timeout)
        result["merge"] = "ok" if merged.returncode == 0 else f"failed: {(merged.stdout + merged.stderr)[-300:]}"
    return result


def run(mode: str, arch: str, gpus: int, timeout: int) -> dict | None:
    proc = lora("train", recipe_file(mode, arch, mode), "--overwrite", *([] if mode == "single" else ["--gpus", gpus]),
                timeout=timeout)
    out = WORK / f"dist-{mode}"
    if proc.returncode != 0:
        return None
    if not (out / "train_summary.json").is_file():
        print(f"{mode}: finished without train_summary.json\n{(proc.stdout + proc.stderr)[-4000:]}", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("precision and speed:"):
            print(f"{mode:>8}  {line}")
    # From the first log to the last (steps 5 to 20): the logs sync the GPUs (the loss is read), so this is the
    # steady rate over 15 steps, tokens counted across all GPUs by TRL.
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [m for m in logs if "num_tokens" in m and "loss" in m]
    rate = (logs[-1]["num_tokens"] - logs[0]["num_tokens"]) / (logs[-1]["time"] - logs[0]["time"])
    summary = json.loads((out / "train_summary.json").read_text())
    return {"tokens_per_second": round(rate), "peak_gib": round(summary["peak_gib"], 2),
            "num_gpus": 1 if mode == "single" else gpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="single,ddp,fsdp")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--results", default=str(TABLE.parent), help="folder of the results.csv the rows go to")
    parser.add_argument("--timeout", type=int, default=200)
    args = parser.parse_args()
    import torch

    gpu, date = torch.cuda.get_device_name(0), datetime.date.today().isoformat()
    table, commit = Path(args.results) / "results.csv", os.environ.get("BENCH_COMMIT") or current_commit()
    common = {"run": run_id(date, gpu_tag(gpu, args.gpus), commit, TABLE, table), "date": date, "gpu": gpu_tag(gpu),
           "gpu_name": gpu, "commit": commit, "model": args.arch, "data": "fixed", "seq_len": SEQ, "batch_size": BATCH,
           "command": f"python benchmarks/distributed.py --modes {args.modes} --arch {args.arch} --gpus {args.gpus}"}
    # Built in a process of its own: this one must not hold GPU memory while the runs measure theirs.
    subprocess.run([sys.executable, str(Path(__file__).with_name("speed.py")), "--arch", args.arch, "--one", "build"],
                   check=True)
    results, rows = {}, []
    for mode in args.modes.split(","):
        try:
            if mode.startswith("resume-"):
                checked = check_resume(mode.split("-")[1], args.arch, args.gpus, args.timeout)
                print(f"{mode:>8}: {checked}", flush=True)
                if checked:
                    rows.append({**common, "mode": mode, "num_gpus": args.gpus, "notes": resume_note(checked)})
                continue
            result = run(mode, args.arch, args.gpus, args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: timed out after {args.timeout} s", flush=True)
            continue
        if result:
            results[mode] = result
            print(f"{mode:>8}: {result}", flush=True)
    single = results.get("single")
    for mode, result in results.items():
        row = {**common, "mode": mode, **result}
        if single and mode != "single":
            row.update(baseline_mode="single", baseline_tokens_per_second=single["tokens_per_second"],
                       baseline_peak_gib=single["peak_gib"])
        rows.append(row)
    if rows:
        modes = args.modes.split(",")
        append_rows(sorted(rows, key=lambda row: modes.index(row["mode"])), table)


def resume_note(checked: dict) -> str:
    checkpoint = Path(checked["resumed_from"].rstrip(".")).name
    note = (f"stopped after its checkpoint of step 3 and resumed from {checkpoint}: "
            f"max abs difference to the uninterrupted run's adapter {checked['max_abs_difference']:.2g} "
            f"(weights up to {checked['max_abs_weight']})")
    return note + (f"; lora merge: {checked['merge']}" if "merge" in checked else "")


if __name__ == "__main__":
    main()
