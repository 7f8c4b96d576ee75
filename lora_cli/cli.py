"""The `lora` command: parse options, call one function per command, print.

Heavy libraries (torch, transformers, TRL) are imported inside the commands so `lora --help` answers fast.
A LoraError anywhere becomes one paragraph on stderr and exit code 2.
"""

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
    if gpus is not None and gpus > 1:
        from lora_cli.launch import relaunch_on_gpus

        raise typer.Exit(relaunch_on_gpus(gpus, sys.argv[1:]))
    from lora_cli.recipe import load_recipe
    from lora_cli.train import train as run_training

    loaded = load_recipe(recipe, overrides, output_dir)
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
    raise LoraError("lora merge is not implemented yet.")


@app.command()
def generate(
    target: str = typer.Argument(..., help="An adapter folder, a model folder, a hub id, or smollm2-135m-instruct."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt a line, or JSONL."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
    raw: bool = typer.Option(False, "--raw", help="Send the text as is, without the chat template."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy (deterministic)."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: int = typer.Option(0, "--seed"),
    json_output: bool = typer.Option(False, "--json", help="JSON lines with prompt, completion and token counts."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive (one prompt)."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Adapter targets: print the base's answer too."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Load the base quantized to NF4."),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat (/reset, /exit)."),
    base: Optional[str] = typer.Option(None, "--base", help="Adapter targets: the base model to use."),
):
    """Generate with a base model, an adapter or a merged model."""
    raise LoraError("lora generate is not implemented yet.")


@app.command("inspect-params")
def inspect_params(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, short name, local folder."),
    r: str = typer.Option("8", "--r", help="LoRA rank, or a list: 4,8,16."),
    target: Optional[str] = typer.Option(None, "--target", help="Module names, all-linear, attention or mlp."),
    alpha: Optional[float] = typer.Option(None, "--alpha"),
    dora: bool = typer.Option(False, "--dora"),
    rslora: bool = typer.Option(False, "--rslora"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Inspect what a recipe would train."),
    seq_len: int = typer.Option(2048, "--seq-len"),
    batch_size: int = typer.Option(1, "--batch-size"),
    json_output: bool = typer.Option(False, "--json"),
):
    """Exact trainable-parameter counts and a memory plan, without downloading weights."""
    raise LoraError("lora inspect-params is not implemented yet.")


def main() -> None:
    try:
        app()
    except LoraError as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
