"""`lora inspect-params`: exact LoRA parameter counts and a training memory plan, without downloading weights.

The counts are PEFT's own. The model is built on the meta device from its config (shapes, no memory),
`get_peft_model` is applied with the LoraConfig that `lora train` builds (adapters.lora_config), and
`get_nb_trainable_parameters()` counts, so grouped-query attention, fused projections and tied embeddings
come out as they are. Configs come from a local folder (or its config.json), from the hub when it is
reachable (HF_HUB_OFFLINE is respected), from the hub cache, else from the registry in `architectures.py`.

The memory plan is lora_cli/memory's.

Public functions, callable without the CLI:
  inspect_params(model, ranks=None, target=None, alpha=None, dora=False, rslora=False, dropout=None,
                 seq_len=2048, batch_size=1, trust_remote_code=False) -> dict     (JSON-serialisable)
  inspect_recipe(recipe_path, overrides=(), model=None, ranks=None, ..., seq_len=None, batch_size=None) -> dict
  format_report(report) -> str
"""

import copy
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers import AutoConfig

from lora_cli.adapters import linear_module_names, lora_config
from lora_cli.architectures import ARCHITECTURES, find_architecture
from lora_cli.errors import LoraError, did_you_mean
from lora_cli.experts import experts_modules, language_layers
from lora_cli.memory.device import GIB, MIB
from lora_cli.memory.layout import Layout, build_meta_model, layer_key, layout_of, linear_shape
from lora_cli.memory.plan import method_step, plan_for_layout, recipe_value
from lora_cli.memory.report import METHOD_NAMES, format_memory_plan, text_table
from lora_cli.models import hub_reachable, load_config, looks_like_path, resolve_model_path
from lora_cli.recipe import LoraSection, SpeedSection, config_default, load_recipe
from lora_cli.speed.policy import fit_offloading, host_memory, memory_refusal

DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 1
H100_FREE_BYTES = int(79.1 * GIB)  # what an idle H100 80GB has free: the GPU planned for on a machine without one
PRESETS = ("attention", "mlp")


# ---------------------------------------------------------------------------------------------------------------
# Config resolution


def builtin_names() -> list[str]:
    return list(ARCHITECTURES)


def registry_config(key: str):
    config = dict(ARCHITECTURES[key]["config"])
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _cached_config_dir(repo_id: str) -> str | None:
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def resolve_config(name: str, trust_remote_code: bool = False, field_name: str = "--model"):
    """(config, source, registry key or None) for a local folder, a config.json, a hub id or a built-in name."""
    key = find_architecture(name)
    if looks_like_path(name):
        path = Path(name).expanduser()
        if path.is_file():
            if path.name != "config.json":
                raise LoraError(f"{field_name}: '{name}' is a file; give a model folder or its config.json.")
            path = path.parent
        folder = resolve_model_path(str(path), field=field_name)
        return load_config(folder, trust_remote_code, field=field_name), f"local folder {folder}", None
    if "/" in name or key is None:
        hub_error = None
        if hub_reachable():
            try:
                return load_config(name, trust_remote_code, field=field_name), "hub", key
            except LoraError as error:
                hub_error = error
        cached = _cached_config_dir(name) if "/" in name else None
        if cached:
            return load_config(cached, trust_remote_code, field=field_name), "hub cache", key
        if key is None and hub_error is not None:
            raise LoraError(f"{hub_error} Built-in architectures, which need no hub: {', '.join(builtin_names())}.")
    if key is not None:
        return registry_config(key), "built-in registry", key
    raise LoraError(
        f"{field_name}: '{name}' is not a local folder, not in the hub cache, the hub is not reachable "
        f"(or HF_HUB_OFFLINE is set), and it is not a built-in architecture.{did_you_mean(name, builtin_names())} "
        f"Built-in: {', '.join(builtin_names())} (hub ids such as meta-llama/Llama-3.1-8B work too)."
    )


# ---------------------------------------------------------------------------------------------------------------
# The meta model and what the memory plan needs to know about its shapes


def _preset_paths(lay: Layout, preset: str) -> list[str]:
    return [m.path for m in lay.layer_modules if m.role == preset]


def resolve_target(target, model, lay: Layout):
    """LoraConfig.target_modules for --target or a recipe's target_modules; LoraError for unknown names.

    Names are the last part of module names, as in a recipe; the presets attention and mlp expand to the
    layer's modules of that kind, as a regex over their paths where a name is in both (GPT-2's c_proj).
    """
    available = linear_module_names(model)
    if target is None:
        if PEFT_DEFAULTS.get(lay.model_type) is None:
            raise LoraError(
                f"--target: PEFT has no default target modules for the {lay.model_type} architecture. Use all-linear, "
                f"attention, mlp or module names: {', '.join(available)}."
            )
        return None
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
    names = [n for n in names if n]
    if names == ["all-linear"]:
        return "all-linear"
    if not names or "all-linear" in names:
        raise LoraError("--target: give module names, attention, mlp (comma-separated), or all-linear alone.")
    paths = []
    for name in names:
        if name in PRESETS:
            paths += _preset_paths(lay, name)
        elif name in available:
            paths += [m.path for m in lay.layer_modules if m.leaf == name] or [name]
        else:
            raise LoraError(
                f"--target: the {lay.model_type} model has no linear module named '{name}'."
                f"{did_you_mean(name, available)} Its linear modules are: {', '.join(available)}; "
                "or use all-linear, attention or mlp."
            )
    paths = list(dict.fromkeys(paths))
    leaves = list(dict.fromkeys(path.rpartition(".")[2] for path in paths))
    if sorted(m.path for m in lay.layer_modules if m.leaf in leaves) == sorted(p for p in paths if "." in p):
        return leaves
    return r".*\.(?:" + "|".join(re.escape(path) for path in paths) + ")"


def _apply_peft(base, config):
    try:
        # LoRA layers made under the meta device cost no memory and no initialisation time
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(copy.deepcopy(base), config)
    except ValueError as error:
        reason = " ".join(str(error).split())
        raise LoraError(f"PEFT cannot apply LoRA to this model: {reason} Name modules with --target "
                        "(or lora.target_modules), or use --target all-linear.") from None


def _peft_line(trainable: int, total: int) -> str:
    """PEFT's print_trainable_parameters() text."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _adapter_bytes(peft_model, bytes_per_param: int) -> int:
    """adapter_model.safetensors: the trainable tensors plus the safetensors JSON header."""
    dtype = {4: "F32", 2: "BF16"}[bytes_per_param]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            size = param.numel() * bytes_per_param
            header[name.replace(".default", "")] = {"dtype": dtype, "shape": list(param.shape),
                                                    "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text) % 8) + offset


def _module_table(model, peft_model) -> list[dict]:
    prefix, _ = language_layers(model)
    targeted = {layer_key(name.removeprefix("base_model.model."), prefix)
                for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)}
    rows: dict[tuple, dict] = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape:
            key = layer_key(name, prefix)
            row = rows.setdefault((key, shape), {"module": key, "type": type(module).__name__, "count": 0,
                                                 "in_features": shape[0], "out_features": shape[1],
                                                 "lora": key in targeted})
            row["count"] += 1
    return list(rows.values())


def _experts_table(model, peft_model) -> dict | None:
    """The routed experts of an MoE model, apart from its linear modules: their weights (kept in bf16 by QLoRA:
    bitsandbytes quantizes linear layers only) and, with lora.target_experts, their adapter's size."""
    found = experts_modules(model)
    if not found:
        return None
    prefix, layers = language_layers(model)
    rows, weights = [], 0
    for path, module in found.items():
        shapes = {name: list(p.shape) for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
        count = sum(1 for layer in layers if _has_module(layer, path))
        weights += count * sum(math.prod(shape) for shape in shapes.values())
        rows.append({"module": path, "count": count, "experts": next(iter(shapes.values()))[0], "weights": shapes})
    targeted = peft_model.peft_config["default"].target_parameters
    lora = sum(p.numel() for name, p in peft_model.named_parameters()
               if p.requires_grad and any(f".{path}." in name for path in found))
    return {"modules": rows, "params": weights, "bf16_bytes": 2 * weights, "lora": bool(targeted), "trainable": lora}


def _has_module(layer, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# The report


def _parse_ranks(ranks) -> list[int]:
    if isinstance(ranks, int):
        ranks = [ranks]
    elif isinstance(ranks, str):
        try:
            ranks = [int(r) for r in ranks.replace(" ", "").split(",") if r]
        except ValueError:
            raise LoraError(f"--r '{ranks}': give a rank or a comma-separated list, for example --r 4,8,16.") from None
    ranks = list(ranks)
    if not ranks or any(r <= 0 for r in ranks):
        raise LoraError(f"--r: ranks must be positive integers, got {ranks}.")
    return ranks


def _inspect(name: str, lora: LoraSection, ranks, seq_len: int, batch_size: int, trust_remote_code: bool) -> dict:
    ranks = _parse_ranks(ranks)
    if lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise LoraError(f"--alpha must be positive and --dropout in [0, 1); got {lora.alpha:g} and {lora.dropout:g}.")
    if seq_len <= 0 or batch_size <= 0:
        raise LoraError(f"--seq-len and --batch-size must be positive, got {seq_len} and {batch_size}.")
    config, source, key = resolve_config(name, trust_remote_code)
    base = build_meta_model(config, trust_remote_code)
    lay = layout_of(base)
    target = lora.target_modules
    lora = dataclasses.replace(lora, target_modules=resolve_target(target, base, lay))
    rows, first = [], None
    for r in ranks:
        peft_model = _apply_peft(base, lora_config(dataclasses.replace(lora, r=r), base))
        trainable, total = peft_model.get_nb_trainable_parameters()
        rows.append({
            "r": r,
            "trainable": trainable,
            "all": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "peft": _peft_line(trainable, total),
            "adapter_bytes": {"float32": _adapter_bytes(peft_model, 4), "bfloat16": _adapter_bytes(peft_model, 2)},
        })
        if first is None:
            first = peft_model
    modules = _module_table(base, first)
    experts = _experts_table(base, first)
    targeted = [m for m in lay.layer_modules if any(row["lora"] and row["module"] == m.path for row in modules)]
    config_target = first.peft_config["default"].target_modules
    plan = plan_for_layout(lay, rows[0]["trainable"], targeted, ranks[0], lora.dropout, lora.use_dora, seq_len, batch_size)
    notes = []
    host = host_memory()
    gpu_free, gpu = planned_gpu()
    host_fit, fitted = {}, {}
    for row in plan["rows"]:
        if row["method"] in plan["lora_train"] and row["gradient_checkpointing"]:
            arguments = (lay, row, targeted, ranks[0], lora.dropout, seq_len * batch_size, SpeedSection(), host,
                         gpu_free, 1, True)
            choice = fit_offloading(*arguments)
            host_fit[row["method"]] = {lever: reason for lever, reason in choice.reasons.items() if lever != "tiled_mlp"}
            # What those levers leave: layer inputs kept on the GPU add to its peak (lora train checks the GPU too).
            fitted[row["method"]] = {"gpu_device": choice.plan["gpu"]["device"], "host": choice.plan["host"]["total"]}
            if choice.refused:
                notes.append(f"lora train would refuse {METHOD_NAMES[row['method']]} on {gpu}: "
                             + memory_refusal(*arguments, choice))
    max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_positions and seq_len > max_positions:
        notes.append(f"{seq_len} tokens is more than the model's {max_positions:,} positions; plan with "
                     f"--seq-len {max_positions} or less.")
    return {
        "model": {
            "name": name,
            "source": source,
            "hub_id": ARCHITECTURES[key]["hub_id"] if key else None,
            "model_type": lay.model_type,
            "layers": lay.layers,
            "hidden_size": lay.hidden,
            "intermediate_size": lay.intermediate,
            "heads": lay.heads,
            "kv_heads": lay.kv_heads,
            "head_dim": lay.head_dim,
            "vocab_size": lay.vocab,
            "tie_word_embeddings": lay.tied,
            "params": lay.params,
        },
        "lora": {
            "target": target if target is not None else "PEFT default",
            "target_modules": sorted(config_target) if isinstance(config_target, (set, list)) else config_target,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "dora": lora.use_dora,
            "rslora": lora.use_rslora,
            "target_experts": lora.target_experts,
        },
        "modules": modules,
        "experts": experts,
        "ranks": rows,
        "memory": plan,
        # This machine's host memory and what lora train's policy would turn off for it and the GPU planned for
        "host_memory": {**dataclasses.asdict(host), "description": host.describe(), "gpu_free": gpu_free,
                        "gpu_description": gpu, "levers_off": host_fit, "fitted_plan": fitted},
        "notes": notes,
    }


def planned_gpu() -> tuple[int, str]:
    """The GPU memory lora train's levers are fitted to here, and in words: this machine's GPU's free memory, as
    lora train's check takes it, else an H100 80GB's."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"this GPU's {free / GIB:.1f} GiB free"
    return H100_FREE_BYTES, f"an H100 80GB's {H100_FREE_BYTES / GIB:.1f} GiB free (no GPU here)"


def inspect_params(model: str, ranks=None, target=None, alpha: float | None = None, dora: bool | None = False,
                   rslora: bool | None = False, dropout: float | None = None, experts: bool | None = False,
                   seq_len: int | None = DEFAULT_SEQ_LEN, batch_size: int | None = DEFAULT_BATCH_SIZE,
                   trust_remote_code: bool = False) -> dict:
    """Exact PEFT counts for each rank (an int, a list, or "4,8,16") and a memory plan at the first rank.

    JSON-serialisable. None means the default: the recipe's for LoRA (recipe.LoraSection: r 16, alpha 32,
    dropout 0.05), PEFT's target modules for the architecture, 2048 tokens, batch 1.
    """
    defaults = LoraSection()
    lora = LoraSection(
        alpha=defaults.alpha if alpha is None else alpha,
        dropout=(0.0 if experts else defaults.dropout) if dropout is None else dropout,  # the experts have no dropout
        target_experts=bool(experts),
        target_modules=target,
        use_dora=bool(dora),
        use_rslora=bool(rslora),
    )
    return _inspect(model, lora, defaults.r if ranks is None else ranks,
                    DEFAULT_SEQ_LEN if seq_len is None else seq_len,
                    DEFAULT_BATCH_SIZE if batch_size is None else batch_size, trust_remote_code)


def inspect_recipe(recipe_path, overrides=(), model: str | None = None, ranks=None, target=None, alpha=None,
                   dora: bool | None = None, rslora: bool | None = None, dropout=None, experts: bool | None = None,
                   seq_len: int | None = None, batch_size: int | None = None) -> dict:
    """What a recipe would train: its model and lora section, its max_length and batch size; arguments override."""
    recipe = load_recipe(recipe_path, list(overrides))
    lora = recipe.lora
    changes = {"target_modules": target, "alpha": alpha, "use_dora": dora, "use_rslora": rslora, "dropout": dropout,
               "target_experts": experts}
    lora = dataclasses.replace(lora, **{k: v for k, v in changes.items() if v is not None})
    training = recipe.training
    # The method's step: DPO forwards chosen and rejected of each pair, GRPO num_generations completions a prompt.
    # --batch-size counts examples (pairs, prompts' completions), as per_device_train_batch_size does.
    defaults = recipe_value(recipe)
    overrides = {"per_device_train_batch_size": batch_size, "max_length": seq_len}
    rows, planned_len, step = method_step(
        recipe.method, lambda name: overrides[name] if overrides.get(name) is not None else defaults(name))
    if seq_len is None:
        seq_len = planned_len
    report = _inspect(model or recipe.model.name_or_path, lora, ranks or [lora.r], seq_len, rows,
                      recipe.model.trust_remote_code)
    report["memory"]["step"] = step
    quantization = recipe.quantization
    checkpointing = training.get("gradient_checkpointing")
    report["recipe"] = {
        "path": str(recipe_path),
        "training_method": recipe.method,
        "method": "qlora" if quantization is not None and quantization.load_in_4bit else "lora",
        "gradient_checkpointing": config_default(recipe.method, "gradient_checkpointing") if checkpointing is None else checkpointing,
        "load_in_8bit": bool(quantization is not None and quantization.load_in_8bit),
    }
    return report






def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_report(report: dict) -> str:
    m, lora = report["model"], report["lora"]
    title = m["name"] + (f" ({m['hub_id']})" if m["hub_id"] and m["hub_id"] != m["name"] else "")
    tied = "tied" if m["tie_word_embeddings"] else "untied"
    sizes = (f"  {m['layers']} layers, hidden {m['hidden_size']:,}, intermediate {m['intermediate_size']:,}, "
             f"vocabulary {m['vocab_size']:,} ({tied} embeddings)")
    heads = f"  {m['heads']} heads, {m['kv_heads']} key/value heads of {m['head_dim']}; {m['params']:,} parameters"
    lines = [f"{title}: {m['model_type']}, from the {m['source']}", sizes, heads, ""]
    target = lora["target"] if isinstance(lora["target"], str) else ",".join(lora["target"])
    lines.append(f"Linear modules (LoRA target: {target}):")
    rows = [[row["module"], f"{row['count']}", f"{row['in_features']:,} -> {row['out_features']:,}",
             "yes" if row["lora"] else "no"] for row in report["modules"]]
    lines += text_table(["module", "count", "shape (in -> out)", "LoRA"], rows, right={1})
    experts = report.get("experts")
    if experts:
        state = "yes (lora.target_experts)" if experts["lora"] else "no; lora.target_experts: true adds them"
        lines += ["", f"Routed experts, 3-D weights rather than linear modules (LoRA: {state}):"]
        rows = [[row["module"], f"{row['count']}", f"{row['experts']}",
                 ", ".join(f"{name} {' x '.join(map(str, shape))}" for name, shape in row["weights"].items())]
                for row in experts["modules"]]
        lines += text_table(["module", "count", "experts", "weights (experts x in x out)"], rows, right={1, 2})
        lines.append(f"  {experts['params']:,} parameters, {_size(experts['bf16_bytes'])} in bf16, also with QLoRA "
                     "(bitsandbytes quantizes linear layers only)"
                     + (f"; their adapter: {experts['trainable']:,} of the trainable parameters at "
                        f"r={report['ranks'][0]['r']}." if experts["lora"] else "."))
    options = [f"alpha {lora['alpha']:g}", f"dropout {lora['dropout']:g}"]
    options += [name for name, on in (("DoRA", lora["dora"]), ("rsLoRA", lora["rslora"])) if on]
    lines += ["", f"PEFT's counts ({', '.join(options)}), adapter_model.safetensors fp32 / bf16:"]
    width = max(len(str(row["r"])) for row in report["ranks"])
    for row in report["ranks"]:
        sizes = row["adapter_bytes"]
        lines.append(f"  r={str(row['r']).ljust(width)}  {row['peft']}  "
                     f"({_size(sizes['float32'])} / {_size(sizes['bfloat16'])})")
    highlight = None
    if "recipe" in report:
        recipe = report["recipe"]
        highlight = (recipe["method"], recipe["gradient_checkpointing"])
        checkpointing = "on" if recipe["gradient_checkpointing"] else "off"
        method = METHOD_NAMES[recipe["method"]]
        lines += ["", f"Recipe {recipe['path']}: {recipe['training_method']} with {method}, gradient checkpointing "
                      f"{checkpointing}."]
        if recipe["load_in_8bit"]:
            lines.append("  8-bit loading is not modelled: expect a peak between the QLoRA and LoRA rows.")
    lines += ["", format_memory_plan(report["memory"], highlight)]
    host = report["host_memory"]
    off = {method: reasons for method, reasons in host["levers_off"].items() if reasons}
    lines.append(f"  This machine: {host['description']}, planned for {host['gpu_description']}"
                 + (": the default levers fit." if not off else ";"))
    for method, reasons in off.items():
        fitted = host["fitted_plan"][method]
        lines.append(f"  {METHOD_NAMES[method]}: " + "; ".join(f"{lever}: {why}" for lever, why in reasons.items())
                     + f"; then GPU {fitted['gpu_device'] / GIB:.2f} GiB with the CUDA context, host "
                       f"{fitted['host'] / GIB:.2f} GiB")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
