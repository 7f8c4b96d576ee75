"""The `lora` command: parse options, call one function per command, print.

Heavy libraries (torch, transformers, TRL) are imported inside the commands so `lora --help` answers fast.
A LoraError anywhere becomes one paragraph on stderr and exit code 2.
"""

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from lora_cli.errors import LoraError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune causal language models with LoRA and QLoRA from YAML recipes.",
)


@app.callback()
def _root():
    """Fine-tune causal language models with LoRA and QLoRA from YAML recipes."""
    from lora_cli.models import hide_library_notices

    hide_library_notices()


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Overrides the recipe's output_dir."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set lora.r=8 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    force: bool = typer.Option(False, "--force", help="With --resume: resume even if the recipe changed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, prepare the data, print the audit; no training."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Train data-parallel on this many GPUs (accelerate)."),
):
    """Train a LoRA or QLoRA adapter from a recipe."""
    if (gpus is None or gpus <= 1) and "LOCAL_RANK" not in os.environ:
        # One process trains on one GPU (Trainer would otherwise wrap the model in nn.DataParallel, which TRL
        # refuses); --gpus N or accelerate launch use more. Set before torch is imported: CUDA reads it once.
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    from lora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides, output_dir)
    if gpus is not None and gpus > 1:
        from lora_cli.launch import relaunch_on_gpus

        raise typer.Exit(relaunch_on_gpus(gpus, loaded.distributed, sys.argv[1:]))
    from lora_cli.train import train as run_training

    run_training(loaded, resume=resume, overwrite=overwrite, force=force, dry_run=dry_run)


@app.command()
def merge(
    adapter_dir: Path = typer.Argument(..., help="The adapter folder written by lora train."),
    out_dir: Path = typer.Argument(..., help="Where to write the merged transformers model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model to merge into (default: the adapter's)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: the base's)."),
    from_original_base: bool = typer.Option(
        False, "--from-original-base", help="QLoRA: add the adapter to the original weights, not the dequantized NF4."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the numerical check against the unmerged adapter."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
):
    """Fold an adapter into its base and write a plain transformers model."""
    from lora_cli.merge import merge_adapter

    result = merge_adapter(
        adapter_dir, out_dir, base=base, dtype=dtype, from_original_base=from_original_base,
        verify=not no_verify, force=force, progress=lambda message: print(message, flush=True),
    )
    print(f"Merged {result.adapter_dir} into {result.base} -> {result.out_dir}")
    if result.chain:
        print(f"  chain:   {result.chain}: the adapter continued training the one before it, so its weights hold "
              "every stage, and the merged model is the whole chain")
    print(f"  weights: the adapter added to {result.weights}")
    if result.max_logit_diff is None:
        print("  verify:  skipped (--no-verify)")
    else:
        print(
            f"  verify:  largest logit difference from the unmerged adapter {result.max_logit_diff:.3g} "
            f"(tolerance {result.tolerance:g} in {result.dtype}); the adapter itself moves logits by up to "
            f"{result.adapter_effect:.3g}"
        )
    print(f"  EOS:     {result.eos}")
    if result.note:
        print(f"  note:    {result.note}")
    print(f"  files:   {', '.join(result.files)} ({result.size})")
    print(f"Try it: lora generate {result.out_dir} --prompt 'Hello'")


@app.command()
def generate(
    target: str = typer.Argument(..., help="An adapter folder, a model folder, a hub id, or smollm2-135m-instruct."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts-file", help="One prompt a line, or JSONL rows with 'prompt' or 'messages'."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="A system message (through the chat template)."),
    raw: bool = typer.Option(False, "--raw", help="Send the text as is, without the chat template."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer; generation stops at EOS."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy (deterministic)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default: the model's own)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k likeliest (default: the model's)."),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", help="Above 1 discourages repeating tokens."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds sampling, so a sampled answer can be repeated."),
    json_output: bool = typer.Option(False, "--json", help="JSON lines with prompt, completion and token counts."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive (one prompt)."),
    compare_base: bool = typer.Option(
        False, "--compare-base", help="Adapter targets: print the base's answer too (and the starting adapter's)."),
    load_in_4bit: bool = typer.Option(
        False, "--load-in-4bit", help="Load the model quantized to NF4 (QLoRA adapters load their base so anyway)."
    ),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat (/reset, /exit)."),
    base: Optional[str] = typer.Option(None, "--base", help="Adapter targets: the base model to use."),
):
    """Generate with a base model, an adapter or a merged model."""
    import json

    from lora_cli import generate as gen

    sampling = gen.Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    sampling.check()
    if chat:
        if prompt or prompts_file or json_output or compare_base:
            raise LoraError("--chat reads the prompts from the terminal: leave out --prompt, --prompts-file, --json "
                            "and --compare-base.")
        gen.chat(gen.load_target(target, base, load_in_4bit), sampling, system)
        return
    if stream and json_output:
        raise LoraError("--stream and --json do not go together: --json prints each answer once it is complete.")
    stream_to = (lambda piece: print(piece, end="", flush=True)) if stream else None
    results = gen.generate(target, prompt, prompts_file, system, raw, sampling, compare_base, load_in_4bit, base,
                           on_text=stream_to)
    if stream:
        return  # printed as it came
    for number, result in enumerate(results, 1):
        if json_output:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        elif len(results) == 1 and result.base is None:
            print(result.text)
        else:
            print(f"=== prompt {number}: {result.prompt.label}")
            if result.base is not None:
                start = (f"--- the starting adapter {result.start_name} alone:\n{result.start.text}\n"
                         if result.start is not None else "")
                print(f"--- with the adapter:\n{result.text}\n{start}--- base model alone:\n{result.base.text}\n")
            else:
                print(f"{result.text}\n")


@app.command("inspect-params")
def inspect_params(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, short name, local folder."),
    r: Optional[str] = typer.Option(None, "--r", help="LoRA rank, or a list: 4,8,16 (default: the recipe's, 16)."),
    target: Optional[str] = typer.Option(
        None, "--target", help="Module names, all-linear, attention or mlp (default: PEFT's for the model)."
    ),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default: the recipe's, 32)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="LoRA dropout (default: the recipe's, 0.05)."),
    dora: Optional[bool] = typer.Option(None, "--dora/--no-dora", help="DoRA (default: off)."),
    rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help="rsLoRA scaling (default: off)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Inspect what a recipe would train."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens a sequence (default 2048 or the recipe's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences a step (default 1, the recipe's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Exact trainable-parameter counts and a memory plan, without downloading weights."""
    import json

    from lora_cli import inspect_params as inspection

    options = {"ranks": r, "target": target, "alpha": alpha, "dora": dora, "rslora": rslora, "dropout": dropout,
               "seq_len": seq_len, "batch_size": batch_size}
    if recipe is not None:
        report = inspection.inspect_recipe(recipe, model=model, **options)
    elif model is not None:
        report = inspection.inspect_params(model, **options)
    else:
        raise LoraError("lora inspect-params needs --model (a hub id, a built-in name or a folder) or --recipe FILE.")
    print(json.dumps(report, indent=2) if json_output else inspection.format_report(report))


def main() -> None:
    try:
        app()
    except LoraError as error:
        message = " ".join(str(error).split())
        close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def close_progress_bars() -> None:
    """A run stopped mid-training (a NaN loss) leaves its progress bar open: end its line before the error."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
