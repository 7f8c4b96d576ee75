"""`lora export`: write a trained model where people run models, and prove the written file is that model.

TARGET is an adapter folder (merged first through lora merge's verified path), a model folder or a hub id.
Formats: `gguf` (one file for llama.cpp, Ollama, LM Studio; --ollama adds a Modelfile), `gguf-lora` (the adapter
alone, for llama.cpp --lora) and `vllm` (the merged transformers folder, with what vLLM needs checked).
Everything is written in a hidden folder beside OUT and renamed at the end; a failed check removes it, so no
OUT that looks complete holds a file that did not verify.
"""

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import LoraError, did_you_mean

FORMATS = ("gguf", "gguf-lora", "vllm")


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    quant: str | None
    source: str  # what was exported, in words
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    verified: bool = False
    report: list[str] = field(default_factory=list)  # the verification's lines
    notes: list[str] = field(default_factory=list)  # what to run next, cautions
    merge: object = None  # merge.MergeResult when TARGET was an adapter


def export(target: str, out_dir, fmt: str = "gguf", quant: str | None = None, ollama: bool = False,
           verify: bool = True, force: bool = False, base: str | None = None,
           progress=lambda message: None) -> ExportResult:
    from lora_cli.merge import check_out_dir, publish

    if fmt not in FORMATS:
        raise LoraError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'.{did_you_mean(fmt, FORMATS)}")
    if ollama and fmt != "gguf":
        raise LoraError("--ollama writes a Modelfile for a GGUF model: use it with --format gguf.")
    if quant is not None and fmt == "vllm":
        raise LoraError("--quant is for the GGUF formats; --format vllm writes the merged model in its own dtype.")
    source = _source(target, base, fmt)
    out = check_out_dir(Path(out_dir).expanduser(), [p for p in (source.folder,) if p], force)
    if fmt == "vllm":
        from lora_cli.export.vllm import export_vllm

        return export_vllm(source, out, verify, force, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.exporting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if fmt == "gguf-lora":
            from lora_cli.export.gguf_lora import export_gguf_lora

            result = export_gguf_lora(source, out, staging, quant or "f16", verify, progress)
        else:
            result = _export_gguf(source, out, staging, quant or "f16", ollama, verify, progress)
        result.files, result.size_bytes = publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


@dataclass
class Source:
    name: str  # the TARGET as given
    stem: str  # a file name for it: the folder's or the hub id's last part
    kind: str  # "adapter" or "model"
    folder: Path | None  # a local folder (None: a hub id not downloaded yet)
    base: str | None = None  # adapters: --base


def _source(target: str, base: str | None, fmt: str) -> Source:
    from lora_cli.generate import target_kind
    from lora_cli.models import resolve_model_path

    kind = target_kind(target)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(target.rstrip("/")).name) or "model"
    if kind == "adapter":
        return Source(target, stem, kind, Path(target).expanduser(), base)
    if base:
        raise LoraError(f"--base is for adapter targets; '{target}' is a model.")
    if fmt == "gguf-lora":
        raise LoraError(f"--format gguf-lora writes an adapter, and '{target}' is a model: give an adapter folder.")
    path = resolve_model_path(target, "TARGET")
    return Source(target, stem, kind, Path(path) if Path(path).is_dir() else None)


def model_folder(source: Source, staging: Path, verify: bool, progress, result: ExportResult) -> Path:
    """A local transformers folder with the model to export: the adapter merged (and verified), or TARGET's."""
    if source.kind == "adapter":
        from lora_cli.merge import merge_adapter

        merged = merge_adapter(source.folder, staging / "merged", base=source.base, verify=verify,
                               progress=progress)
        result.merge = merged
        result.source = f"{source.name} merged into {merged.base} ({merged.weights})"
        return merged.out_dir
    if source.folder is not None:
        result.source = source.name
        return source.folder
    from huggingface_hub import snapshot_download

    progress(f"Fetching {source.name} from the hub ...")
    try:
        folder = Path(snapshot_download(source.name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"]))
    except Exception as e:  # offline, unknown id, gated
        from lora_cli.errors import first_line

        raise LoraError(f"TARGET '{source.name}' cannot be fetched from the hub: {first_line(e)}") from None
    result.source = source.name
    return folder


def _export_gguf(source: Source, out: Path, staging: Path, quant: str, ollama: bool, verify: bool,
                 progress) -> ExportResult:
    from lora_cli.export.gguf import check_quant, write_gguf

    quant = check_quant(quant)
    result = ExportResult(out, "gguf", quant, source.name)
    folder = model_folder(source, staging, verify, progress, result)
    gguf_file = staging / f"{source.stem}-{quant}.gguf"
    progress(f"Writing {out / gguf_file.name} ...")
    written = write_gguf(folder, gguf_file, quant, source.stem, progress)
    types = ", ".join(f"{n} {name}" for name, n in sorted(written["tensor_types"].items()))
    result.report.append(f"wrote:     {written['arch']} architecture, tensors {types}; {written['tokens']} tokens "
                         f"({written['tokenizer']}, pre-tokenizer {written['pre_tokenizer']})"
                         + (", chat template" if written["chat_template"] else ""))
    if verify:
        from lora_cli.export.verify import verify_gguf

        check = verify_gguf(gguf_file, folder, quant, progress)
        result.report += check.lines
        if not check.passed:
            raise LoraError(
                f"Verification failed: {'; '.join(check.failures)}. Nothing was written to {out}. "
                "A higher-precision --quant may pass; --no-verify skips the check."
            )
        result.verified = True
    if ollama:
        from lora_cli.export.ollama import write_modelfile

        result.notes += write_modelfile(staging, gguf_file.name, folder, quant, source.stem, out)
    if folder.parent == staging:
        shutil.rmtree(folder)  # the merged model was only the way to the GGUF
    return result
