"""Multi-GPU `lora train` against one GPU, in the same run: data parallel (DDP) and sharded (FSDP) QLoRA.

Runs on a machine with 2+ GPUs, with the same random-weight model and fixed 2,048-token rows as speed.py:

    python benchmarks/distributed.py --modes single,ddp,fsdp --gpus 2 --results benchmarks/results

Each mode runs the real command, `lora train RECIPE [--gpus N]`, on a QLoRA recipe (NF4, double quantization,
r=16 on all linear layers, batch 2 x 2048 per GPU). Throughput comes from the run's metrics.jsonl: tokens
(counted across all GPUs) between the first and the last log, over the time between them; peak is rank 0's
torch.cuda.max_memory_allocated during training, from train_summary.json.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import BATCH, SEQ, TARGETS, WORK, build_model, save_record, write_data

STEPS = 20


def recipe_file(mode: str, arch: str) -> Path:
    recipe = {
        "model": {"name_or_path": str(build_model(arch)), "attn_implementation": "sdpa"},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": str(write_data("fixed"))},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": 2e-4,
                     "logging_steps": 5, "save_strategy": "no", "max_length": SEQ},
        "output_dir": str(WORK / f"dist-{mode}"),
    }
    if mode == "fsdp":
        recipe["distributed"] = "fsdp"
    path = WORK / f"dist-{mode}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(mode: str, arch: str, gpus: int, timeout: int) -> dict | None:
    command = [sys.executable, "-m", "lora_cli", "train", str(recipe_file(mode, arch)), "--overwrite"]
    if mode != "single":
        command += ["--gpus", str(gpus)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    out = WORK / f"dist-{mode}"
    if proc.returncode != 0 or not (out / "train_summary.json").is_file():
        print(f"{mode}: failed (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-4000:]}", flush=True)
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
    return {"tok_per_s": round(rate), "peak_gib": round(summary["peak_gib"], 2), "num_gpus": 1 if mode == "single" else gpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="single,ddp,fsdp")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--timeout", type=int, default=200)
    args = parser.parse_args()
    import torch

    build_model(args.arch)
    results = {}
    for mode in args.modes.split(","):
        try:
            result = run(mode, args.arch, args.gpus, args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: timed out after {args.timeout} s", flush=True)
            continue
        if result:
            results[mode] = result
            print(f"{mode:>8}: {result}", flush=True)
    single = results.get("single", {})
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    for mode, result in results.items():
        if mode == "single":
            continue
        record = {
            "gpu": torch.cuda.get_device_name(0), "model": args.arch, "mode": "qlora", "distributed": mode,
            "num_gpus": result["num_gpus"], "tok_per_s": result["tok_per_s"], "peak_gib": result["peak_gib"],
            "single_gpu_tok_per_s": single.get("tok_per_s"), "single_gpu_peak_gib": single.get("peak_gib"),
            "speedup": round(result["tok_per_s"] / single["tok_per_s"], 3) if single else None,
            "seq_len": SEQ, "batch_size": BATCH,
            "command": f"python benchmarks/distributed.py --modes {args.modes} --gpus {args.gpus}", "date": date,
        }
        save_record(out / f"{date}-{args.arch}-qlora-{mode}-{result['num_gpus']}gpu.json", record)


if __name__ == "__main__":
    main()
