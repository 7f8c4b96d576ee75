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
    num_machines: int = typer.Option(1, "--num-machines", help="With --gpus: machines taking part, each running this "
                                     "command with its own --machine-rank (accelerate's option)."),
    machine_rank: int = typer.Option(0, "--machine-rank", help="With --num-machines: this machine's rank, 0 first."),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="With --num-machines: the address "
                                                  "of the machine of rank 0."),
    main_process_port: int = typer.Option(29500, "--main-process-port", help="With --num-machines: its port."),
    accelerate_config: Optional[Path] = typer.Option(None, "--accelerate-config", help="With --gpus: an accelerate "
                                                     "config file (DeepSpeed ZeRO-3: configs/accelerate/)."),
):
    """Train a LoRA or QLoRA adapter from a recipe."""
    if (gpus is None or gpus <= 1) and "LOCAL_RANK" not in os.environ:
        # One process trains on one GPU (Trainer would otherwise wrap the model in nn.DataParallel, which TRL
        # refuses); --gpus N or accelerate launch use more. Set before torch is imported: CUDA reads it once.
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    from lora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides, output_dir)
    if gpus is not None and (gpus > 1 or num_machines > 1 or accelerate_config is not None):
        from lora_cli.launch import Machines, relaunch_on_gpus

        machines = Machines(num_machines, machine_rank, main_process_ip, main_process_port)
        raise typer.Exit(relaunch_on_gpus(gpus, loaded.distributed, sys.argv[1:], machines, accelerate_config))
    if num_machines > 1 or accelerate_config is not None:
        raise LoraError("--num-machines and --accelerate-config go with --gpus N: they say how accelerate launches "
                        "the processes of this machine.")
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


@app.command()
def export(
    target: str = typer.Argument(..., help="An adapter folder, a model folder or a hub id."),
    out_dir: Path = typer.Argument(..., help="The folder to write the export to."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama), gguf-lora (the adapter) or vllm."),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="GGUF weights: f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1; gguf-lora: f16, q8_0."
    ),
    ollama: bool = typer.Option(False, "--ollama", help="Write an Ollama Modelfile beside the GGUF."),
    base: Optional[str] = typer.Option(None, "--base", help="Adapter targets: the base model to use."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip reading the file back and comparing."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
):
    """Export for llama.cpp, Ollama or vLLM, verified by reading the result back."""
    from lora_cli.export import export as run_export

    result = run_export(target, out_dir, fmt, quant, ollama, verify=not no_verify, force=force, base=base,
                        progress=lambda message: print(message, flush=True))
    quant_note = f" ({result.quant})" if result.quant else ""
    print(f"Exported {result.source} -> {result.out_dir} as {result.format}{quant_note}")
    if result.merge is not None and result.format != "vllm" and result.merge.max_logit_diff is not None:
        print(f"  merge:     verified, largest logit difference from the unmerged adapter "
              f"{result.merge.max_logit_diff:.3g} (tolerance {result.merge.tolerance:g})")
    for line in result.report:
        print(f"  {line}")
    if not result.verified:
        print("  verify:    skipped (--no-verify)")
    print(f"  files:     {', '.join(result.files)} ({result.size_bytes / 1e6:.1f} MB)")
    for note in result.notes:
        print(note)


@app.command()
def serve(
    targets: list[str] = typer.Argument(..., help="Adapter folders, model folders or hub ids (adapters share a base)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 opens it to the network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Load the models quantized to NF4."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LORA_API_KEY", help="Require 'Authorization: Bearer KEY' (or set LORA_API_KEY)."
    ),
):
    """Serve models and adapters over an OpenAI-compatible HTTP API."""
    from lora_cli.serve import serve as run_server

    run_server(targets, host, port, load_in_4bit, api_key, progress=lambda message: print(message, flush=True))


@app.command("eval")
def evaluate(
    target: str = typer.Argument(..., help="An adapter folder, a model folder, a hub id, a .gguf file, or "
                                 "smollm2-135m-instruct."),
    data: Optional[str] = typer.Option(None, "--data", help="Loss and perplexity on a dataset in any format lora "
                                       "train reads."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="JSONL rows of prompt (or messages) and answer, "
                                           "optional match."),
    match: str = typer.Option("contains", "--match", help="Match mode for rows without one: exact, contains, regex, "
                              "number, choice."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks or task YAML files, "
                                        "comma-separated (needs the eval extra)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: at most this many examples per task."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Measure the base too, side by side (and the "
                                      "starting adapter of a chained adapter)."),
    base: Optional[str] = typer.Option(None, "--base", help="Adapters: the base to use; model targets: the model to "
                                       "compare with."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows a forward pass or a generate() call."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest answer to a question."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file."),
):
    """Measure a model or an adapter: loss, answer checks, lm-eval tasks; --compare-base puts the base beside it."""
    import json

    from lora_cli.evaluate.report import format_table, write_json
    from lora_cli.evaluate.run import EvalRequest, evaluate as run_evaluation

    if output is not None and not output.parent.is_dir():
        raise LoraError(f"--output: the folder '{output.parent}' does not exist.")
    request = EvalRequest(data=data, answers=str(answers) if answers else None, match=match,
                          tasks=tasks.split(",") if tasks else [], limit=limit, compare_base=compare_base, base=base,
                          batch_size=batch_size, max_new_tokens=max_new_tokens)
    report = run_evaluation(target, request)
    if output is not None:
        write_json(output, report)
    print(json.dumps(report, indent=2, ensure_ascii=False) if json_output else format_table(report))


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
    experts: Optional[bool] = typer.Option(
        None, "--experts/--no-experts", help="MoE: LoRA on the routed experts too (lora.target_experts; default off)."
    ),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Inspect what a recipe would train."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens a sequence (default 2048 or the recipe's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences a step (default 1, the recipe's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Exact trainable-parameter counts and a memory plan, without downloading weights."""
    import json

    from lora_cli import inspect_params as inspection

    options = {"ranks": r, "target": target, "alpha": alpha, "dora": dora, "rslora": rslora, "dropout": dropout,
               "experts": experts, "seq_len": seq_len, "batch_size": batch_size}
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
