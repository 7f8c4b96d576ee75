"""What a run shows and leaves behind: the progress bar, metrics.jsonl, loss.png, the model card, the summary.

transformers' own progress bar shows steps and ETA but not loss, learning rate or tokens/s, so we replace
it with one callback that does. Only the main process prints and writes.
"""

import json
import math
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from lora_cli.checkpoints import write_atomically


class ProgressAndMetrics(TrainerCallback):
    """A progress bar with loss, learning rate, tokens/s and ETA; every log line appended to metrics.jsonl."""

    def __init__(self, metrics_path: Path):
        self.metrics_path = metrics_path
        self.bar = None
        self.started = None
        self.rate = TokenRate()
        self.shown = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the summary's peak is training's, not loading's
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.started = time.time()
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        self.tokens_per_second = self.rate.update(logs, now)
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(now - (self.started or now), 3), **logs}
        if self.tokens_per_second is not None and "loss" in logs:
            record["tokens_per_second"] = round(self.tokens_per_second, 1)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.bar is not None:
            if "loss" in logs:
                self.shown["loss"] = f"{logs['loss']:.4f}"
            if "eval_loss" in logs:
                self.shown["eval_loss"] = f"{logs['eval_loss']:.4f}"
            if "learning_rate" in logs:
                self.shown["lr"] = f"{logs['learning_rate']:.2e}"
            if self.tokens_per_second:
                self.shown["tok/s"] = f"{self.tokens_per_second:,.0f}"
            self.bar.set_postfix(self.shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TokenRate:
    """Tokens per second between two logged steps, from the running token count TRL logs (num_tokens)."""

    def __init__(self):
        self.last_tokens = self.last_time = None
        self.per_second = None

    def update(self, logs: dict, now: float) -> float | None:
        tokens = logs.get("num_tokens")
        if tokens is not None:
            if self.last_tokens is not None and now > self.last_time and tokens > self.last_tokens:
                self.per_second = (tokens - self.last_tokens) / (now - self.last_time)
            self.last_tokens, self.last_time = tokens, now
        return self.per_second


def read_metrics(path: Path) -> list[dict]:
    """The logged records; a last line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget the records of steps after the checkpoint: those steps are trained (and logged) again."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


# What each method logs besides its loss (TRL's metric names), drawn under the loss in loss.png.
METHOD_SIGNALS = {
    "dpo": ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"),
    "orpo": ("rewards/margins", "rewards/accuracies", "log_odds_ratio"),
    "simpo": ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"),
    "kto": ("rewards/margins", "rewards/chosen", "rewards/rejected", "kl"),
    "grpo": ("reward", "kl"),  # and reward per function: rewards/<name>/mean
}


def method_signals(records: list[dict], method: str) -> list[str]:
    """The logged keys worth a curve for this method, in the order shown."""
    if method not in METHOD_SIGNALS:
        return []
    logged = {key for record in records for key in record}
    keys = [key for key in METHOD_SIGNALS[method] if key in logged]
    if method == "grpo":
        keys += sorted(key for key in logged if key.startswith("rewards/") and key.endswith("/mean"))
    return keys


def plot_losses(records: list[dict], out: Path, method: str = "sft") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and _finite(r["loss"])]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and _finite(r["eval_loss"])]
    signals = method_signals(records, method)
    fig, axes = plt.subplots(2 if signals else 1, 1, figsize=(7, 7 if signals else 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evaluation:
        ax.plot(*zip(*evaluation), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evaluation:
        ax.legend()
    if signals:
        ax = axes[1][0]
        for key in signals:
            points = [(r["step"], r[key]) for r in records if key in r and _finite(r[key])]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{method} signals (train)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def peak_memory_gib() -> tuple[float, str]:
    """Peak accelerator memory when on a GPU, else this process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RAM"


def final_losses(records: list[dict]) -> dict:
    train = [r["loss"] for r in records if "loss" in r]
    evaluation = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"train_loss": train[-1] if train else None, "eval_loss": evaluation[-1] if evaluation else None}


def final_signals(records: list[dict], method: str) -> dict:
    """The last logged value of each of the method's signals (and of their eval_ counterparts)."""
    found = {}
    for key in method_signals(records, method):
        for name in (key, f"eval_{key}"):
            values = [r[name] for r in records if name in r]
            if values:
                found[name] = values[-1]
    return found


def model_card(recipe, base_name: str, summary: dict, audit_report: dict) -> str:
    from lora_cli.export.vllm import recipe_readiness

    lora = recipe.lora
    quant = "QLoRA (4-bit NF4" + (", double quantization" if recipe.quantization.bnb_4bit_use_double_quant else "") + ")" \
        if recipe.quantization and recipe.quantization.load_in_4bit else "8-bit LoRA" if recipe.is_quantized else "LoRA"
    targets = lora.target_modules if lora.target_modules else "PEFT's default for the architecture"
    losses = final_losses(summary.get("metrics", []))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"
    signals = "".join(f"| final {name} | {fmt(value)} |\n"
                      for name, value in final_signals(summary.get("metrics", []), recipe.method).items())
    chain = (f"`{base_name}` + `{recipe.model.adapter}` (the adapter this run continued) + this run's training"
             if recipe.model.adapter else f"`{base_name}` + this adapter")
    rewards = f"| rewards | {', '.join(r.rpartition('/')[2] for r in recipe.rewards)} |\n" if recipe.rewards else ""
    return f"""---
base_model: {base_name}
library_name: peft
tags: [lora, {'qlora, ' if recipe.is_quantized else ''}{recipe.method}, lora-cli]
---

# LoRA adapter for {base_name}

Trained with [lora](https://pypi.org/project/lora-cli/) (`lora train`) from the recipe in `recipe.yaml`.

| | |
|---|---|
| base model | `{base_name}` |
| training method | {recipe.method.upper()} (TRL) |
| chain | {chain} |
| adapter | {quant}, r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}{', DoRA' if lora.use_dora else ''}{', rsLoRA' if lora.use_rslora else ''} |
| target modules | {targets} |
| data | `{recipe.data.train}` ({audit_report['examples']['train']} train, {audit_report['examples']['eval']} eval examples, format {summary['data_format']}) |
| steps | {summary['steps']} |
| final train loss | {fmt(losses['train_loss'])} |
| final eval loss | {fmt(losses['eval_loss'])} |
{signals}{rewards}| tokens/s | {summary['tokens_per_second']:,.0f} |
| vLLM | {recipe_readiness(lora).summary()} |

## Use it

```bash
lora generate {summary['output_dir']} --prompt "Hello"
lora merge {summary['output_dir']} merged-model     # a plain transformers model
```

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("{summary['output_dir']}")
tokenizer = AutoTokenizer.from_pretrained("{summary['output_dir']}")
```

The loss curves are in `loss.png`, every logged step in `metrics.jsonl`, the data audit in `data_audit.json`.
"""


def format_summary(summary: dict) -> str:
    from lora_cli.export.vllm import folder_readiness

    minutes, seconds = divmod(summary["wall_seconds"], 60)
    return "\n".join([
        "Done.",
        f"  steps: {summary['steps']}   wall time: {int(minutes)}m{seconds:04.1f}s   "
        f"tokens/s: {summary['tokens_per_second']:,.0f}   peak {summary['peak_kind']}: {summary['peak_gib']:.2f} GiB",
        f"  final train loss: {summary['final']['train_loss']}"
        + (f"   final eval loss: {summary['final']['eval_loss']}" if summary["final"]["eval_loss"] is not None else ""),
        f"  adapter, tokenizer, recipe.yaml, metrics.jsonl, loss.png, data_audit.json, README.md: {summary['output_dir']}",
        f"  vLLM: {folder_readiness(summary['output_dir']).summary()}",
        f"  try it: lora generate {summary['output_dir']} --prompt \"...\" --compare-base",
    ])
