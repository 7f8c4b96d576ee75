"""`lora merge`: fold an adapter into its base and write a plain transformers model.

PEFT's `merge_and_unload()` does the folding and transformers' `save_pretrained` the writing. Around them:
- QLoRA adapters are never merged into 4-bit weights: requantizing after the merge rounds the adapter's
  small update away. By default the base is loaded in NF4 exactly as in training and dequantized
  (transformers' `model.dequantize()`), and the adapter is added to those weights, as
  Axolotl and Unsloth do: the adapter learned to correct the quantized weights, so this reproduces the model
  that was trained and evaluated. `from_original_base` adds it to the original weights instead, as the PEFT
  tutorials do.
- The merge checks itself, as torchtune's parity tests do: a few probe inputs go through the unmerged adapter
  and, after writing, through the merged model reloaded from disk with plain transformers; the largest logit
  difference must stay under a tolerance suited to the dtype.
- The work is done in float32 whatever the output dtype: the update is added to float32 weights and the sum
  rounded once, and the check measures the merge rather than 16-bit arithmetic noise (in bfloat16 that noise
  is as large as a typical adapter's effect). The cost is CPU memory for the model in float32.
- generation_config.json is made to stop on the tokenizer's EOS and on the chat template's end-of-turn
  token, so servers such as vLLM stop where the model was trained to stop.
- The model is written to a hidden temporary folder next to OUT_DIR and renamed at the end, so an
  interrupted or failed merge never leaves a folder that looks complete.
"""

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import LoraError, did_you_mean
from lora_cli.models import (
    attach_adapter,
    chain_text,
    end_of_turn_id,
    load_adapter_base,
    load_config,
    load_model,
    load_tokenizer,
    pick_dtype,
    read_adapter,
    resolve_model_path,
    token_ids,
)

DTYPES = ("bfloat16", "float16", "float32")
# Largest |logit| difference accepted between the unmerged adapter and the merged model, both run in float32.
# In float32 they differ by summation order only; in 16 bits by the rounding of the merged weights. Measured on
# SmolLM2-135M with a rank-16 all-linear adapter: 1.2e-4 (float32), 0.05 (float16), 0.33 to 0.42 (bfloat16, its
# float32 checkpoint rounding too). A merge that loses the adapter or breaks a weight differs by much more.
TOLERANCE = {"float32": 1e-2, "bfloat16": 1.0, "float16": 0.25}
SHARD_SIZE = "5GB"
PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}  # no weights
PROBES = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [  # no system turn: some chat templates refuse one
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The quick brown fox jumps over the lazy dog. 1, 1, 2, 3, 5, 8,",
)


@dataclass
class MergeResult:
    out_dir: Path
    adapter_dir: Path
    base: str  # the name the base was resolved from
    base_path: str  # the folder or hub id it resolved to
    dtype: str
    mode: str  # "lora", "qlora-dequantized" or "qlora-original"
    weights: str  # what the adapter was added to, in words
    max_logit_diff: float | None = None  # None: not verified
    tolerance: float | None = None
    adapter_effect: float | None = None  # largest |logit| change the adapter makes on the probes
    eos: str = ""
    note: str = ""  # a caution for people, when there is one
    chain: str | None = None  # base + start adapter + ... for an adapter that continued another
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0

    @property
    def size(self) -> str:
        return _gb(self.size_bytes)


def merge_adapter(
    adapter_dir,
    out_dir,
    base: str | None = None,
    dtype: str | None = None,
    from_original_base: bool = False,
    verify: bool = True,
    force: bool = False,
    progress=lambda message: None,
) -> MergeResult:
    """Merge the adapter in ADAPTER_DIR into its base and write the result to OUT_DIR."""
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise LoraError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'.{did_you_mean(dtype, DTYPES)}")
    info = read_adapter(adapter_dir, base)
    if info.peft_config.get("peft_type", "LORA") in PROMPT_LEARNING:
        raise LoraError(f"'{info.folder}' is a {info.peft_config['peft_type']} adapter, which has no weights to merge.")
    path = resolve_model_path(info.base, info.field)
    out = check_out_dir(Path(out_dir).expanduser(), [info.folder, Path(path)], force)
    config = load_config(path, info.model.trust_remote_code, info.field)
    dtype = dtype or _own_dtype(config)
    out_dtype = getattr(torch, dtype)

    mode, weights = _mode(info.quantization, from_original_base, dtype)
    progress(f"Loading the base {info.base} ...")
    model = _load_base(info, torch.float32, dequantize=mode == "qlora-dequantized")
    tokenizer = load_tokenizer(str(info.folder) if info.has_tokenizer else path, info.model.trust_remote_code)
    _check_disk(out.parent, _size_bytes(model, out_dtype))

    peft_model = attach_adapter(model, info)
    peft_model.eval()
    probes = probe_inputs(tokenizer)
    result = MergeResult(out, info.folder, info.base, path, dtype, mode, weights, chain=chain_text(info))
    if verify:
        reference = probe_logits(peft_model, probes)
        with peft_model.disable_adapter():
            result.adapter_effect = max_diff(reference, probe_logits(peft_model, probes))
    progress("Merging ...")
    merged = peft_model.merge_and_unload().to(out_dtype)  # added in float32, rounded once
    added_eos = _align_eos(tokenizer, merged.generation_config)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging-{os.getpid()}"  # beside OUT_DIR, so the rename stays on one disk
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed merge that had the same process id
    staging.mkdir()  # not mkdtemp: its 0700 mode would survive the rename and hide the model from servers
    try:
        progress(f"Writing {out} ...")
        _write(merged, tokenizer, staging)
        del merged, peft_model, model
        result.eos = _eos_report(staging, added_eos)
        if verify:
            progress("Verifying the written model against the unmerged adapter ...")
            _check_parity(result, staging, probes, reference)
        result.files, result.size_bytes = publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _check_parity(result: MergeResult, folder: Path, probes, reference) -> None:
    """Reload the written model with plain transformers and compare its logits with the unmerged adapter's."""
    import torch

    reloaded = load_model(str(folder), torch.float32, field=str(result.out_dir))
    result.max_logit_diff = max_diff(reference, probe_logits(reloaded, probes))
    result.tolerance = TOLERANCE[result.dtype]
    if not result.max_logit_diff <= result.tolerance:  # NaN fails too
        hint = "Try --dtype float32" if result.dtype != "float32" else "This is a bug worth reporting"
        raise LoraError(
            f"Verification failed: the merged model's logits differ from the unmerged adapter's by up to "
            f"{result.max_logit_diff:.4g} (tolerance {result.tolerance:g} in {result.dtype}; the adapter itself "
            f"moves them by up to {result.adapter_effect:.4g}). Nothing was written to {result.out_dir}. "
            f"{hint}; --no-verify skips the check."
        )
    if result.dtype != "float32" and result.max_logit_diff * 2 > result.adapter_effect:
        result.note = (
            f"rounding to {result.dtype} moves the logits about as much as the adapter does; "
            "--dtype float32 keeps the adapter's effect exactly."
        )


def _mode(quantization, from_original_base: bool, dtype: str) -> tuple[str, str]:
    """(mode, what the adapter is added to, in words)."""
    if quantization is None:
        return "lora", f"the base weights in {dtype}"
    kind = "int8" if quantization.load_in_8bit else "NF4"
    if from_original_base:
        return "qlora-original", (
            f"the original base weights in {dtype} (--from-original-base), not the {kind} weights it was trained on"
        )
    return "qlora-dequantized", (
        f"the {kind} base weights dequantized to {dtype}: the model as it was trained and evaluated "
        "(--from-original-base adds it to the original weights instead)"
    )


def check_out_dir(out: Path, inputs: list[Path], force: bool) -> Path:
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise LoraError(f"OUT_DIR '{out}' is a file; give a folder.")
    for folder in (p.resolve() for p in inputs if p.exists()):
        if out == folder or out in folder.parents:
            raise LoraError(f"OUT_DIR '{out}' holds the merge's own input {folder}; write to another folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraError(f"OUT_DIR '{out}' is not empty; choose another folder or pass --force to replace it.")
    return out


def _own_dtype(config) -> str:
    """The dtype the base's checkpoint is stored in (config.json's dtype), float32 where it names none."""
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(own).removeprefix("torch.") if own is not None else "float32"
    return name if name in DTYPES else "float32"


def _load_base(info, dtype, dequantize: bool):
    """The base on the CPU at `dtype`: as trained (quantized, then dequantized) or from its original weights."""
    if not dequantize:
        model, _ = load_adapter_base(info, dtype)
        return model
    # Quantize from the dtype training loaded the weights in, so the 4-bit codes are the ones it trained against.
    quantized, _ = load_adapter_base(info, pick_dtype(info.model.dtype), info.quantization)
    return quantized.dequantize(dtype=dtype).to(device="cpu", dtype=dtype)


def _size_bytes(model, dtype) -> int:
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied weights are written once
    return sum(unique.values()) * dtype.itemsize


def _check_disk(folder: Path, needed: int) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < needed * 1.05:
        raise LoraError(
            f"Not enough disk space for the merged model: it needs about {_gb(needed)} and {existing} has "
            f"{_gb(free)} free. Free some space or choose an OUT_DIR on another disk."
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def probe_inputs(tokenizer) -> list[list[int]]:
    """Token ids of the probes: conversations through the chat template where there is one, text as is."""
    inputs = []
    for probe in PROBES:
        if isinstance(probe, list):
            if not getattr(tokenizer, "chat_template", None):
                probe = "\n".join(m["content"] for m in probe)
            else:
                text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
                inputs.append(tokenizer(text, add_special_tokens=False).input_ids)
                continue
        inputs.append(tokenizer(probe).input_ids)
    return inputs


def probe_logits(model, inputs) -> list:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids], device=model.device)).logits.float().cpu() for ids in inputs]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _align_eos(tokenizer, generation_config) -> list[int]:
    """Make the generation config stop on the tokenizer's EOS and the chat template's end-of-turn token.

    Returns the ids it had to add."""
    listed = token_ids(generation_config.eos_token_id)
    wanted = [i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None]
    ids = list(dict.fromkeys(listed + wanted))
    if ids != listed:
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if generation_config.pad_token_id is None and ids:
        generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    return ids[len(listed):]


def _eos_report(folder: Path, added: list[int]) -> str:
    """Read the written tokenizer and generation config back and say how they stop; fail where they disagree."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    listed = token_ids(GenerationConfig.from_pretrained(folder).eos_token_id)
    eos, eot = tokenizer.eos_token_id, end_of_turn_id(tokenizer)
    missing = [i for i in (eos, eot) if i is not None and i not in listed]
    if missing:  # _align_eos wrote them, so this is a bug in lora rather than in the user's input
        raise RuntimeError(f"generation_config.json in {folder} lacks the stop tokens {missing}")

    def names(ids):
        return ", ".join(f"'{tokenizer.convert_ids_to_tokens(i)}' (id {i})" for i in ids)

    if eot is None:
        report = f"the tokenizer's EOS {names([eos])} (it has no chat template)"
    elif eot == eos:
        report = f"{names([eos])}, the tokenizer's EOS and the chat template's end of turn"
    else:
        report = f"the chat template's end of turn {names([eot])} and the tokenizer's EOS {names([eos])}"
    report = f"generation_config.json stops on {report}"
    if others := [i for i in listed if i not in (eos, eot)]:
        report += f", and on {names(others)}"
    if added:
        report += f"; lora added {names(added)}, which it lacked, so servers such as vLLM stop at the end of a turn"
    return report + "."


def _write(model, tokenizer, folder: Path) -> None:
    try:
        model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(folder)
    except Exception as e:  # safetensors reports a full disk as SafetensorError, not OSError
        if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e) or "No space left" in str(e):
            raise LoraError(
                f"The disk filled up while writing the merged model in {folder.parent}; the partial files were "
                "removed. Free some space or choose an OUT_DIR on another disk."
            ) from None
        raise


def publish(staging: Path, out: Path) -> tuple[list[str], int]:
    """Rename the finished folder into place; an old OUT_DIR (--force) goes only once the new one is there.
    Returns its file names and their bytes."""
    files = sorted(p.name for p in staging.iterdir())
    size = sum(p.stat().st_size for p in staging.iterdir())
    if not out.exists():
        staging.rename(out)
        return files, size
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return files, size
