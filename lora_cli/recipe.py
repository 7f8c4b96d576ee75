"""The recipe: schema, defaults, YAML loading, --set overrides and validation.

This module is the single source of defaults. Everything here runs before any weights load, so a typo
costs a second, not a model download. Training options are the fields of the method's TRL config (`SFTConfig`,
`DPOConfig`, ...: METHOD_CONFIGS), passed through after a name and type check, so every trainer option is reachable
without this module naming it.
"""

import ast
import dataclasses
import functools
import importlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_cli.errors import LoraError, did_you_mean
from lora_cli.rewards import BUILTIN_REWARDS

EMBEDDED_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "tokenized")
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
DISTRIBUTED = ("ddp", "fsdp")
MATCH_MODES = ("exact", "contains", "regex", "number", "choice")  # how lora eval checks an answer
UNION_TYPES = (typing.Union, types.UnionType)
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
# TRL's config class of each method. ORPO and CPO (whose loss_type simpo is SimPO) live in trl.experimental in
# TRL 1.16; methods/preference.py builds their trainers.
METHOD_CONFIGS = {
    "sft": ("trl", "SFTConfig"), "dpo": ("trl", "DPOConfig"), "orpo": ("trl.experimental.orpo", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOConfig"), "kto": ("trl", "KTOConfig"), "grpo": ("trl", "GRPOConfig"),
}


@dataclass
class ModelSection:
    name_or_path: str = EMBEDDED_MODEL
    dtype: str = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    # transformers' own switch: True refuses pickled .bin weights, which can run code when loaded.
    use_safetensors: bool = True
    adapter: str | None = None  # an adapter folder to keep training (SFT, then DPO on top of it)


@dataclass
class QuantizationSection:
    """BitsAndBytesConfig's own field names."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_quant_storage: str | None = None


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | list[str] | None = None  # None: PEFT's default for the architecture
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    # Mixture-of-experts models: LoRA on the routed experts' weights too (PEFT's target_parameters, no dropout).
    target_experts: bool = False


@dataclass
class DataSection:
    train: str | None = None
    format: str = "auto"
    eval: str | float | None = None
    chat_template: str | None = None


# Our defaults for SFTConfig fields, where TRL's suit full fine-tuning or a GPU rather than LoRA on any machine.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2.0e-4,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 4,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
}
# Our defaults per method, over TRAINING_DEFAULTS: one epoch of preference or RL training on top of SFT (more
# over-fits the pairs), and learning rates for LoRA rather than TRL's full fine-tuning ones (1e-6).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"learning_rate": 5.0e-5, "num_train_epochs": 1},
    "orpo": {"learning_rate": 5.0e-5, "num_train_epochs": 1},
    # SimPO is CPO's simpo loss without CPO's NLL term (cpo_alpha 0), at the SimPO paper's beta.
    "simpo": {"learning_rate": 5.0e-5, "num_train_epochs": 1, "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0},
    "kto": {"learning_rate": 5.0e-5, "num_train_epochs": 1},
    # Four completions a prompt, so the default batch of four is one prompt's group (TRL's 8 needs batches of 8).
    "grpo": {"learning_rate": 1.0e-5, "num_train_epochs": 1, "num_generations": 4, "max_completion_length": 256},
}
# Keys the recipe owns elsewhere, so they cannot be set under `training`.
TRAINING_RESERVED = {"output_dir": "output_dir (top level)", "model_init_kwargs": "the model section"}


@dataclass
class SpeedSection:
    """lora's own GPU speed levers (lora_cli/speed/); the libraries' levers are training keys."""

    fused_lora: bool = True  # one autograd function per LoRA layer instead of PEFT's chain of kernels
    fused_mlp: bool = True  # with fused_lora: gate, up, SwiGLU (down too), their adapters in one function
    offload_activations: bool = True  # checkpointed layer inputs in host memory, copied on a side stream
    varlen_attention: bool = True  # packed rows (training.packing) through varlen flash attention, not masked SDPA
    cuda_graphs: bool = True  # checkpointed decoder layers replayed as CUDA graphs (fixed-shape rows, one GPU)
    lean_recompute: bool = True  # the rerun of a checkpointed layer skips down_proj, whose output no backward reads
    offload_attention: bool = True  # with offload_activations: the attention's saved tensors wait in host memory too
    fused_loss: bool = True  # the LM head and loss through Liger's cross-entropy kernel, chunked (one GPU)
    offload_embeddings: bool = True  # QLoRA with checkpointing: the frozen input embedding waits in host memory
    tiled_mlp: bool = True  # long sequences: the MLP computed a tile of tokens at a time (on where it pays)
    grouped_experts: bool = True  # MoE with lora.target_experts: the experts' LoRA as grouped low-rank products
    attention_kernel: str = "sdpa"  # sdpa (flash), cudnn (cuDNN's SDPA), flex (FlexAttention): docs/long-sequences.md


ATTENTION_KERNELS = ("sdpa", "cudnn", "flex")


@dataclass
class EvalSection:
    """`lora eval` at the end of `lora train`: its options, with the base beside the adapter by default."""

    answers: str | None = None  # questions with expected answers (lora eval --answers)
    match: str = "contains"  # match mode for answer rows that name none
    data: str | None = None  # loss and perplexity on this dataset (lora eval --data)
    tasks: list[str] | None = None  # lm-evaluation-harness tasks or task YAML files (the eval extra)
    limit: int | None = None  # examples per lm-eval task
    compare_base: bool = True
    batch_size: int = 8
    max_new_tokens: int = 128


@dataclass
class Recipe:
    method: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    quantization: QuantizationSection | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    training: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    distributed: str | None = None
    speed: SpeedSection = field(default_factory=SpeedSection)
    eval: EvalSection | None = None  # runs lora eval on the adapter once trained
    rewards: list[str] | None = None  # grpo: built-in names and /path/file.py:function entries (resolved)
    source: str = "recipe"  # the file name errors point at

    @property
    def is_quantized(self) -> bool:
        q = self.quantization
        return q is not None and (q.load_in_4bit or q.load_in_8bit)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, as written next to every adapter."""
        out = {"method": self.method}
        for name in ("model", "quantization", "lora", "data", "speed", "eval"):
            section = getattr(self, name)
            out[name] = dataclasses.asdict(section) if section is not None else None
        out["training"] = dict(self.training)
        out["output_dir"] = self.output_dir
        out["distributed"] = self.distributed
        out["rewards"] = list(self.rewards) if self.rewards is not None else None
        return out


SECTIONS = {"model": ModelSection, "quantization": QuantizationSection, "lora": LoraSection, "data": DataSection,
            "speed": SpeedSection, "eval": EvalSection}
TOP_LEVEL = ("method", *SECTIONS, "training", "rewards", "output_dir", "distributed", "versions")


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4) and refuses duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict)):  # `[q_proj, v_proj]:` is YAML for a list as a key
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a name, not a list or a mapping", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key '{key}' appears twice (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The document and the line (1-based) of every dotted key path, for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise LoraError(f"{source}{where}: the YAML cannot be read: {problem}.") from None
    except yaml.YAMLError as e:
        raise LoraError(f"{source}: the YAML cannot be read: {e}.") from None
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                path = f"{prefix}{k.value}"
                lines[path] = k.start_mark.line + 1
                walk(v, path + ".")

    if node is not None:
        walk(node, "")
    return data, lines


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read, override, validate and fill defaults; raises LoraError naming the file, key and line."""
    path = Path(path)
    if path.is_dir():
        raise LoraError(f"The recipe '{path}' is a folder; give the recipe's YAML file.")
    if not path.is_file():
        raise LoraError(f"The recipe file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoraError(f"{path}: the recipe is not UTF-8 text (byte {e.start} cannot be read); is it YAML?") from None
    raw, lines = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LoraError(f"{path}: a recipe is a YAML mapping of sections (model, lora, data, training, ...).")
    for item in overrides:
        apply_override(raw, item)
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return build_recipe(raw, source=str(path), lines=lines, base_dir=path.parent)


def apply_override(raw: dict, item: str) -> None:
    """--set section.key=value, with the value typed as YAML would type it."""
    if "=" not in item:
        raise LoraError(f"--set '{item}': write it as section.key=value, for example --set lora.r=8.")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise LoraError(f"--set '{item}': the key '{dotted}' is not a dotted key such as lora.r.")
    value, _ = parse_yaml(value_text, f"--set {dotted}") if value_text.strip() else (None, {})
    target = raw
    for key in keys[:-1]:
        if target.get(key) is None:
            target[key] = {}
        if not isinstance(target[key], dict):
            raise LoraError(f"--set '{item}': '{key}' is not a section, so it has no key '{keys[-1]}'.")
        target = target[key]
    target[keys[-1]] = value


def _type_name(annotation) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", type(None): "null"}
    if typing.get_origin(annotation) in UNION_TYPES:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "a list of strings"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in UNION_TYPES:
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation we do not model (Literal, enums): SFTConfig checks it


class _Context:
    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def fail(self, key: str, message: str) -> typing.NoReturn:
        line = self.lines.get(key)
        where = f"{self.source}, line {line}" if line else self.source
        raise LoraError(f"{where}: {key} {message}")


def _build_section(name: str, cls, raw, ctx: _Context):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        ctx.fail(name, f"must be a mapping of keys, got {type(raw).__name__} {raw!r}.")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in hints:
            ctx.fail(
                f"{name}.{key}",
                f"is not a known key.{did_you_mean(key, hints)} The keys of '{name}' are: {', '.join(hints)}.",
            )
        if not _matches(value, hints[key]):
            ctx.fail(f"{name}.{key}", f"must be {_type_name(hints[key])}, got {value!r}.")
    return cls(**raw)


def _check_choice(ctx, key, value, choices):
    if value not in choices:
        ctx.fail(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}.{did_you_mean(value, choices)}")


def trl_config_class(method: str):
    """TRL's config class for a method (imports TRL, which takes a few seconds)."""
    module, name = METHOD_CONFIGS[method]
    # trl.experimental warns on import; `lora train` says itself that ORPO and SimPO come from there.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(importlib.import_module(module), name)


@functools.cache
def config_fields(method: str = "sft") -> dict[str, Any]:
    """The field names and type hints of the method's TRL config."""
    config_class = trl_config_class(method)
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # a forward reference that cannot resolve: fall back to the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class) if f.init}


def config_default(method: str, name: str):
    """The value a training key has when the recipe leaves it out: ours (METHOD_DEFAULTS), else TRL's."""
    ours = {**TRAINING_DEFAULTS, **METHOD_DEFAULTS[method]}
    if name in ours:
        return ours[name]
    config_field = next(f for f in dataclasses.fields(trl_config_class(method)) if f.name == name)
    return config_field.default_factory() if config_field.default_factory is not dataclasses.MISSING else config_field.default


def _validate_training(raw, ctx: _Context, method: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    config_name = METHOD_CONFIGS[method][1]
    if not isinstance(raw, dict):
        ctx.fail("training", f"must be a mapping of {config_name} fields, got {raw!r}.")
    known = config_fields(method)
    for key, value in raw.items():
        if key in TRAINING_RESERVED:
            ctx.fail(f"training.{key}", f"is set by {TRAINING_RESERVED[key]}, not under training.")
        if key not in known:
            others = [m for m in METHODS if key in config_fields(m)]
            if others:
                ctx.fail(
                    f"training.{key}",
                    f"is a field of TRL's {METHOD_CONFIGS[others[0]][1]} (method: {', '.join(others)}), not of "
                    f"{config_name}, which method: {method} trains with. Set method: {others[0]} at the top of the "
                    f"recipe, or remove training.{key}.",
                )
            ctx.fail(
                f"training.{key}",
                f"is not a field of TRL's {config_name}.{did_you_mean(key, known)} "
                f"Any {config_name} field can be set here (learning_rate, num_train_epochs, max_steps, max_length, ...).",
            )
        if value is not None and not _matches(value, known[key]):
            ctx.fail(f"training.{key}", f"must be {_type_name(known[key])}, got {value!r}.")
    numeric_minimums = {
        "learning_rate": (0, False),
        "num_train_epochs": (0, False),
        "per_device_train_batch_size": (1, True),
        "gradient_accumulation_steps": (1, True),
        "max_length": (1, True),
        "num_generations": (2, True),  # GRPO compares completions within a prompt's group
        "max_completion_length": (1, True),
    }
    for key, (low, inclusive) in numeric_minimums.items():
        value = raw.get(key)
        if isinstance(value, (int, float)) and (value < low if inclusive else value <= low):
            ctx.fail(f"training.{key}", f"must be {'at least' if inclusive else 'greater than'} {low}, got {value}.")
    from lora_cli.trackers.available import report_to_problem  # transformers' list, imported when asked

    tracker_problem = report_to_problem(raw.get("report_to"))
    if tracker_problem:
        ctx.fail("training.report_to", tracker_problem)
    max_steps = raw.get("max_steps")
    if isinstance(max_steps, int) and max_steps == 0:
        ctx.fail("training.max_steps", "must be positive, or -1 to train for num_train_epochs.")
    training = {**TRAINING_DEFAULTS, **METHOD_DEFAULTS[method], **raw}
    if method == "grpo":
        _check_generation_batch(training, ctx)
    return training


def _check_generation_batch(training: dict, ctx: _Context) -> None:
    """GRPO generates num_generations completions for each prompt of a generation batch (TRL's rule, checked here so
    the error names the key before the model loads)."""
    groups = training["num_generations"]
    batch = training.get("generation_batch_size") or training["per_device_train_batch_size"] * (
        training.get("steps_per_generation") or training.get("gradient_accumulation_steps") or 1)
    if batch % groups:
        ctx.fail("training.num_generations", f"is {groups}, and a generation batch of {batch} completions "
                 "(per_device_train_batch_size x steps_per_generation) holds whole groups only: make "
                 "per_device_train_batch_size a multiple of num_generations.")


def resolve_rewards(raw, ctx: _Context, method: str, base_dir: Path) -> list[str] | None:
    """GRPO's reward functions: built-in names, and file.py:function entries resolved against the recipe's folder.

    The user's file is parsed, not run, here: running it is training's business, and it says so.
    """
    if raw is None:
        if method == "grpo":
            ctx.fail("method", f"is grpo, which needs rewards: a top-level list of reward functions, built-in "
                     f"({', '.join(BUILTIN_REWARDS)}) or your own as file.py:function, for example "
                     "rewards: [exact_match, my_rewards.py:format_ok].")
        return None
    if method != "grpo":
        ctx.fail("rewards", f"is for method: grpo, which scores generated completions; method: {method} learns from "
                 "the data's answers. Remove it, or set method: grpo.")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(r, str) and r.strip() for r in raw):
        ctx.fail("rewards", f"must be a list of reward names or file.py:function entries, got {raw!r}.")
    resolved = []
    for entry in raw:
        if ":" not in entry:
            if entry not in BUILTIN_REWARDS:
                ctx.fail("rewards", f"names '{entry}', which is not a built-in reward function.{did_you_mean(entry, BUILTIN_REWARDS)} "
                         f"Built-in: {', '.join(BUILTIN_REWARDS)}; your own are written file.py:function.")
            resolved.append(entry)
            continue
        file_name, function = entry.rsplit(":", 1)
        path = Path(file_name).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file() or path.suffix != ".py":
            ctx.fail("rewards", f"names '{entry}', but the Python file {path} does not exist (a file is looked up "
                     "in the recipe's folder).")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as e:
            ctx.fail("rewards", f"names '{entry}', but {path}, line {e.lineno}, is not valid Python: {e.msg}.")
        defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if function not in defined:
            ctx.fail("rewards", f"names '{entry}', but {path} defines no function '{function}'."
                     f"{did_you_mean(function, defined)} Its functions: {', '.join(defined) or 'none'}.")
        resolved.append(f"{path.resolve()}:{function}")
    return resolved


# Recipe keys of the lora section, as PEFT's adapter_config.json names them: with model.adapter, they must agree.
ADAPTER_CONFIG_KEYS = {"r": "r", "alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora",
                       "bias": "bias"}


def resolve_adapter(model: ModelSection, raw: dict, lora_raw, ctx: _Context, base_dir: Path) -> dict:
    """model.adapter: the adapter folder (relative to the working directory, then the recipe), checked to be one;
    returns its adapter_config.json. An adapter keeps its shape while it trains on, so lora keys the recipe sets
    must agree with it."""
    folder = next((c for c in (Path(model.adapter).expanduser(), base_dir / model.adapter) if c.exists()), None)
    if folder is None:
        ctx.fail("model.adapter", f"names the folder '{model.adapter}', which does not exist. Train that adapter "
                 "first (for the demo: lora train configs/demo-smollm2.yaml).")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        ctx.fail("model.adapter", f"names '{folder}', which is not an adapter folder: it has no adapter_config.json "
                 "(lora train writes one when a run finishes).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        ctx.fail("model.adapter", f"names '{folder}', whose adapter_config.json cannot be read: {e}.")
    model.adapter = str(folder.resolve())
    for key, peft_key in ADAPTER_CONFIG_KEYS.items():
        if isinstance(lora_raw, dict) and key in lora_raw and lora_raw[key] != config.get(peft_key, lora_raw[key]):
            ctx.fail(f"lora.{key}", f"is {lora_raw[key]!r}, but model.adapter '{model.adapter}' has "
                     f"{key}={config.get(peft_key)!r}, and training continues that adapter as it is: remove "
                     f"lora.{key} or set it to {config.get(peft_key)!r}.")
    if "name_or_path" not in (raw.get("model") or {}):  # the base the adapter was trained on
        saved = folder / "recipe.yaml"
        saved_model = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model") if saved.is_file() else None
        model.name_or_path = (saved_model or {}).get("name_or_path") or config.get("base_model_name_or_path") \
            or model.name_or_path
    return config


def lora_from_adapter(lora: LoraSection, config: dict) -> LoraSection:
    """The lora section of a run that continues an adapter: that adapter's own settings."""
    targets = config.get("target_modules")
    return dataclasses.replace(
        lora, r=config.get("r", lora.r), alpha=config.get("lora_alpha", lora.alpha),
        dropout=config.get("lora_dropout", lora.dropout),
        target_modules=sorted(targets) if isinstance(targets, (list, set)) else targets or lora.target_modules,
        bias=config.get("bias", lora.bias), use_rslora=bool(config.get("use_rslora", lora.use_rslora)),
        use_dora=bool(config.get("use_dora", lora.use_dora)),
        modules_to_save=config.get("modules_to_save") or lora.modules_to_save)


def resolve_data_path(value: str, base_dir: Path) -> str:
    """A local file or folder (relative to the working directory, then to the recipe), else a hub dataset id."""
    for candidate in (Path(value).expanduser(), base_dir / value):
        if candidate.exists():
            return str(candidate.resolve())
    looks_local = value.endswith(DATA_EXTENSIONS) or value.startswith((".", "/", "~")) or os.sep + os.sep in value
    if looks_local:
        raise FileNotFoundError(value)
    return value


def build_recipe(raw: dict, source: str = "recipe", lines: dict[str, int] | None = None, base_dir=Path(".")) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML) and return it with every default filled."""
    ctx = _Context(source, lines or {})
    if not isinstance(raw, dict):
        raise LoraError(f"{source}: a recipe is a YAML mapping of sections (model, lora, data, training, ...).")
    for key in raw:
        if key not in TOP_LEVEL:
            ctx.fail(str(key), f"is not a recipe section.{did_you_mean(key, TOP_LEVEL)} Sections: {', '.join(TOP_LEVEL)}.")
    method = raw.get("method") or "sft"
    _check_choice(ctx, "method", method, METHODS)
    model = _build_section("model", ModelSection, raw.get("model"), ctx)
    quant_raw = raw.get("quantization")
    quantization = _build_section("quantization", QuantizationSection, quant_raw, ctx) if quant_raw else None
    lora = _build_section("lora", LoraSection, raw.get("lora"), ctx)
    data = _build_section("data", DataSection, raw.get("data"), ctx)
    speed = _build_section("speed", SpeedSection, raw.get("speed"), ctx)
    training = _validate_training(raw.get("training"), ctx, method)
    rewards = resolve_rewards(raw.get("rewards"), ctx, method, base_dir)
    if model.adapter is not None:
        lora = lora_from_adapter(lora, resolve_adapter(model, raw, raw.get("lora"), ctx, base_dir))

    _check_choice(ctx, "speed.attention_kernel", speed.attention_kernel, ATTENTION_KERNELS)
    if not model.name_or_path.strip():
        ctx.fail("model.name_or_path", "is empty: give a hub id, a local folder, or smollm2-135m-instruct.")
    _check_choice(ctx, "model.dtype", model.dtype, DTYPES)
    if model.attn_implementation is not None:
        _check_choice(ctx, "model.attn_implementation", model.attn_implementation,
                      ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"))

    if quantization is not None:
        if quantization.load_in_4bit and quantization.load_in_8bit:
            ctx.fail("quantization", "sets both load_in_4bit and load_in_8bit: choose one (4-bit NF4 is QLoRA).")
        _check_choice(ctx, "quantization.bnb_4bit_quant_type", quantization.bnb_4bit_quant_type, ("nf4", "fp4"))
        _check_choice(ctx, "quantization.bnb_4bit_compute_dtype", quantization.bnb_4bit_compute_dtype, DTYPES)
        if quantization.bnb_4bit_quant_storage is not None:
            _check_choice(ctx, "quantization.bnb_4bit_quant_storage", quantization.bnb_4bit_quant_storage,
                          ("uint8", "bfloat16", "float16", "float32"))
        if not (quantization.load_in_4bit or quantization.load_in_8bit):
            quantization = None  # a section with both switches off means no quantization

    if lora.r <= 0:
        ctx.fail("lora.r", f"must be a positive integer, got {lora.r}.")
    if lora.alpha <= 0:
        ctx.fail("lora.alpha", f"must be positive, got {lora.alpha}.")
    if not 0 <= lora.dropout < 1:
        ctx.fail("lora.dropout", f"must be at least 0 and below 1, got {lora.dropout}.")
    if lora.target_experts and lora.dropout:
        if "dropout" in (raw.get("lora") or {}):
            ctx.fail("lora.dropout", f"must be 0 with lora.target_experts: true (PEFT's LoRA on the experts' weights has "
                                     f"no dropout); got {lora.dropout}.")
        lora.dropout = 0.0  # the default 0.05 gives way to the experts
    _check_choice(ctx, "lora.bias", lora.bias, ("none", "all", "lora_only"))
    if isinstance(lora.target_modules, list) and not lora.target_modules:
        ctx.fail("lora.target_modules", "is an empty list: name modules, write all-linear, or leave it out.")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        lora.target_modules = [lora.target_modules]  # one name, as PEFT would otherwise treat it as a regex

    if not data.train:
        ctx.fail("data.train", "is required: a .jsonl/.json/.csv/.parquet/.txt file, a folder, or a hub dataset id.")
    try:
        data.train = resolve_data_path(data.train, base_dir)
    except FileNotFoundError:
        ctx.fail("data.train", f"names the file '{data.train}', which does not exist.")
    _check_choice(ctx, "data.format", data.format, DATA_FORMATS)
    if isinstance(data.eval, float) or isinstance(data.eval, int) and not isinstance(data.eval, bool):
        if not 0 < data.eval < 1:
            ctx.fail("data.eval", f"as a number is the fraction held out from train, between 0 and 1; got {data.eval}.")
        data.eval = float(data.eval)
    elif isinstance(data.eval, str):
        try:
            data.eval = resolve_data_path(data.eval, base_dir)
        except FileNotFoundError:
            ctx.fail("data.eval", f"names the file '{data.eval}', which does not exist.")

    distributed = raw.get("distributed")
    if distributed is not None:
        _check_choice(ctx, "distributed", distributed, DISTRIBUTED)
    output_dir = raw.get("output_dir")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir.strip()):
        ctx.fail("output_dir", f"must be a folder path, got {output_dir!r}.")
    if output_dir is None:
        output_dir = str(Path("runs") / Path(source).stem)
    if data.eval is not None and "eval_strategy" not in training:
        training["eval_strategy"] = "steps"
        training.setdefault("eval_steps", 0.1)  # a fraction of all steps: ten evaluations per run

    evaluation = _build_eval(raw.get("eval"), ctx, base_dir)
    return Recipe(method=method, model=model, quantization=quantization, lora=lora, data=data, training=training,
                  output_dir=output_dir, distributed=distributed, speed=speed, rewards=rewards, eval=evaluation,
                  source=source)


def _build_eval(raw, ctx: _Context, base_dir: Path) -> EvalSection | None:
    """The eval section, its files resolved like data.train (relative to the working directory, then the recipe)."""
    if raw is None:
        return None
    section = _build_section("eval", EvalSection, raw, ctx)
    if not (section.answers or section.data or section.tasks):
        ctx.fail("eval", "names nothing to measure: set answers (a questions file), data (a dataset for the loss) "
                         "or tasks (lm-evaluation-harness tasks).")
    for key in ("answers", "data"):
        value = getattr(section, key)
        try:
            setattr(section, key, resolve_data_path(value, base_dir) if value else None)
        except FileNotFoundError:
            ctx.fail(f"eval.{key}", f"names the file '{value}', which does not exist.")
    if section.answers and not Path(section.answers).is_file():
        ctx.fail("eval.answers", f"must be a file of questions; '{section.answers}' is not one.")
    if section.tasks:  # a task file found beside the recipe, as data files are; names are lm-eval's
        section.tasks = [str(base_dir / t) if not Path(t).is_file() and (base_dir / t).is_file() else t
                         for t in section.tasks]
    _check_choice(ctx, "eval.match", section.match, MATCH_MODES)
    for key in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(section, key)
        if value is not None and value < 1:
            ctx.fail(f"eval.{key}", f"must be at least 1, got {value}.")
    return section
