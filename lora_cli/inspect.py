"""`lora inspect-params`: exact LoRA parameter counts and a training memory plan, without downloading weights.

The counts are PEFT's own. The model is built on the meta device from its config (shapes, no memory),
`get_peft_model` is applied with the LoraConfig that `lora train` builds (train.lora_config), and
`get_nb_trainable_parameters()` counts, so grouped-query attention, fused projections and tied embeddings
come out as they are. Configs come from a local folder (or its config.json), from the hub when it is
reachable (HF_HUB_OFFLINE is respected), from the hub cache, else from the registry in `architectures.py`.

The memory plan is our own code, because no library estimates the peak of a LoRA training step. It models
`torch.cuda.max_memory_allocated` during a step of TRL's SFTTrainer (bf16 autocast, AdamW, SDPA attention,
TRL's chunked LM head, which never materialises the logits), for T = batch_size x seq_len tokens:

  weights      bf16, 2 bytes a parameter. QLoRA: the decoder's Linear weights in NF4 with double quantization,
               0.5 + 1/64 + 4/(64*256) bytes (4-bit codes, an 8-bit absmax per 64 weights, an fp32 absmax per
               256 blocks), the rest bf16. Full fine-tuning: fp32 master weights, 4 bytes.
  LoRA params  trainable x 4 bytes for LoRA (PEFT upcasts adapters to fp32), x 2 for QLoRA (TRL casts them to
               bf16); gradients as much again; AdamW's two moments in the parameter's dtype.
  activations  what autograd keeps per layer and token: 4 bytes per normalised element (norms keep an fp32
               input), SDPA's q, k, v and output, the MLP activation's input and the two factors of its gate,
               the input of each trained module (one bf16 copy per module when the adapter is fp32 or LoRA
               dropout is on, else one per shared input), LoRA's r-wide intermediate, dropout masks. With
               gradient checkpointing each layer keeps only its input and one layer is recomputed at a time.
  buffers      one layer's backward working set (three intermediate-width gradients, the fp32 gradient of an
               upcast input, a dequantized weight for QLoRA), the LM head's tile (min(T, 4096) x
               min(vocab, 32768) x 2 bytes) and fp32 hidden-state gradient, the bf16 copies autocast makes of
               fp32 trainable weights, and two 32 MiB cuBLAS workspaces.
  peak         the largest of three moments: the LM head at the end of the forward pass, the backward pass of
               the last layer, the end of the backward pass (all gradients, for full fine-tuning).
  device       peak x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES: what to have free on the GPU.

Every term is counted from what the libraries allocate, not fitted. Against the three peaks measured for the
Llama-3.1-8B shape on an H100 (shared/gpu/README.md) it gives 7.86 / 7.57, 18.05 / 17.81 and 42.83 / 42.60 GiB
(+3.8%, +1.4%, +0.5%), and it is within 10% of eleven more measured runs; docs/inspect-params.md has the tables.

Public functions, callable without the CLI:
  inspect_params(model, ranks=None, target=None, alpha=None, dora=False, rslora=False, dropout=None,
                 seq_len=2048, batch_size=1, trust_remote_code=False) -> dict     (JSON-serialisable)
  inspect_recipe(recipe_path, overrides=(), model=None, ranks=None, ..., seq_len=None, batch_size=None) -> dict
  format_report(report) -> str
  memory_plan(config, lora_trainable, seq_len=2048, batch_size=1, lora_modules=None, rank=16, dropout=0.0,
              dora=False) -> dict
      config: a transformers config (model.config); lora_trainable: the trainable parameter count;
      lora_modules: target module names as in a recipe, "all-linear", or None for PEFT's default.
      Rows for full / LoRA / QLoRA with checkpointing on and off, in bytes.
  format_memory_plan(plan, highlight=None) -> str     highlight=("qlora", True) marks a row.
"""

import copy
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.architectures import ARCHITECTURES, find_architecture
from lora_cli.errors import LoraError, did_you_mean, first_line
from lora_cli.models import hub_reachable, load_config, looks_like_path, resolve_model_path
from lora_cli.recipe import LoraSection

DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 1
GIB = 2**30
MIB = 2**20
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUBLAS_WORKSPACES = 64 * MIB  # 32 MiB per cuBLAS handle on Hopper, one for the forward and one for autograd's thread
CUDA_CONTEXT_BYTES = int(1.35 * GIB)  # measured on an H100 (torch 2.11, CUDA 13, bitsandbytes loaded)
ALLOCATOR_SLACK = 0.10  # reserved over allocated: 2-14% measured, the most on the smallest models
LM_HEAD_TOKEN_TILE = 4096  # TRL's chunked log-prob kernel: tokens per tile
LM_HEAD_VOCAB_TILE = 32768  # and vocabulary entries per tile
PRESETS = ("attention", "mlp")
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h"}
# Activation functions written as several tensor ops in Python keep that many intermediates for backward.
ACTIVATION_SAVED = {"gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2}
METHODS = ("full", "lora", "qlora")
METHOD_NAMES = {"full": "full (fp32 + AdamW)", "lora": "LoRA (bf16)", "qlora": "QLoRA (NF4 + DQ)"}


# ---------------------------------------------------------------------------------------------------------------
# Config resolution


def builtin_names() -> list[str]:
    return list(ARCHITECTURES)


def registry_config(key: str):
    from transformers import AutoConfig

    config = dict(ARCHITECTURES[key]["config"])
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _cached_config_dir(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

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


@dataclass
class LayerModule:
    path: str  # relative to the decoder layer: self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def role(self) -> str:
        parent = self.parent.lower()
        return "attention" if "attn" in parent or "attention" in parent else "mlp"

    @property
    def is_output(self) -> bool:
        return self.leaf in OUTPUT_PROJECTIONS


@dataclass
class Layout:
    """The shapes of a causal LM that the memory plan uses, read off the meta model."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    quantizable: int  # weights of the Linear/Conv1D modules bitsandbytes quantizes: all but the LM head
    largest_linear: int
    layer_modules: list[LayerModule] = field(default_factory=list)
    norm_widths: list[int] = field(default_factory=list)
    gated: bool = True
    activation_saved: int = 1
    residual_dropouts: int = 0
    eager_attention: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a Linear or transformers' Conv1D (GPT-2), else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def build_meta_model(config, trust_remote_code: bool = False):
    """The model for this config on the meta device: every shape, no memory, no weights downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise LoraError(
            f"The model type '{config.model_type}' is not a causal language model: {first_line(error)}"
        ) from None


def _decoder_layers(model):
    """(prefix, the ModuleList of decoder layers)."""
    import torch

    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return name, module
    raise LoraError(f"Cannot find the {count} decoder layers of the {model.config.model_type} model.")


def _layer_key(name: str, prefix: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj; lm_head stays lm_head."""
    if name.startswith(prefix + "."):
        rest = name[len(prefix) + 1:]
        return rest.partition(".")[2]
    return name


def layout_of(model) -> Layout:
    import torch

    config = model.config.get_text_config()
    _, layers = _decoder_layers(model)
    output_embeddings = model.get_output_embeddings()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    quantizable, largest = 0, 0
    for module in model.modules():
        shape = _linear_shape(module)
        if shape and module is not output_embeddings:
            quantizable += shape[0] * shape[1]
            largest = max(largest, shape[0] * shape[1])
    layer_modules, norm_widths, dropouts = [], [], 0
    for name, module in layers[0].named_modules():
        shape = _linear_shape(module)
        if shape:
            layer_modules.append(LayerModule(name, *shape))
        elif type(module).__name__.endswith("Norm") and getattr(module, "weight", None) is not None:
            width = module.weight.numel()
            if "q_norm" in name or "q_layernorm" in name:
                width = heads * head_dim
            elif "k_norm" in name or "k_layernorm" in name:
                width = kv_heads * head_dim
            norm_widths.append(width)
        elif isinstance(module, torch.nn.Dropout) and module.p > 0 and "attn_dropout" not in name:
            dropouts += 1  # residual dropouts keep a mask; SDPA's attention dropout keeps only an RNG state
    mlp_outputs = [m.in_features for m in layer_modules if m.role == "mlp" and m.is_output]
    intermediate = max(mlp_outputs) if mlp_outputs else getattr(config, "intermediate_size", None) or 4 * hidden
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or ""
    if getattr(config, "hidden_activation", None):
        activation = config.hidden_activation
    return Layout(
        model_type=config.model_type,
        layers=len(layers),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        params=sum(p.numel() for p in model.parameters()),
        quantizable=quantizable,
        largest_linear=largest,
        layer_modules=layer_modules,
        norm_widths=norm_widths,
        gated=any("gate" in m.leaf for m in layer_modules if m.role == "mlp"),
        activation_saved=ACTIVATION_SAVED.get(str(activation), 1),
        residual_dropouts=dropouts,
        eager_attention=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
    )


# ---------------------------------------------------------------------------------------------------------------
# The memory plan


def _layer_activation_bytes(lay: Layout, trained: list[LayerModule], per_module_copies: bool, lora_rank: int,
                            dropout: float, dora: bool, seq_len: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    saved = sum(4 * width for width in lay.norm_widths)
    if lay.eager_attention:  # repeated k and v, and the fp32 + bf16 attention probabilities
        saved += 2 * 3 * lay.q_dim + 8 * lay.heads * seq_len
    else:
        saved += 2 * (2 * lay.q_dim + 2 * lay.kv_dim)
    saved += 2 * lay.intermediate * lay.activation_saved
    if lay.gated:
        saved += 2 * 2 * lay.intermediate
    saved += lay.residual_dropouts * lay.hidden
    shared_inputs = {}
    for module in trained:
        if per_module_copies or dropout > 0:
            saved += 2 * module.in_features + (module.in_features if dropout > 0 else 0)
        elif not (module.role == "attention" and module.is_output and not lay.eager_attention):
            shared_inputs[(module.parent, module.is_output)] = module.in_features  # o_proj shares SDPA's output
        if lora_rank:
            saved += 2 * lora_rank + (4 * module.out_features if dora else 0)
    return saved + 2 * sum(shared_inputs.values())


def _method_plan(lay: Layout, method: str, checkpointing: bool, lora_trainable: int, trained: list[LayerModule],
                 rank: int, dropout: float, dora: bool, seq_len: int, batch_size: int) -> dict:
    tokens = seq_len * batch_size
    full = method == "full"
    if full:
        weights, adapter, trainable, param_bytes = 4 * lay.params, 0, lay.params, 4
        trained = lay.layer_modules
    else:
        param_bytes = 4 if method == "lora" else 2
        trainable = lora_trainable
        adapter = trainable * param_bytes
        if method == "qlora":
            weights = int(lay.quantizable * NF4_DOUBLE_QUANT_BYTES) + 2 * (lay.params - lay.quantizable)
        else:
            weights = 2 * lay.params
    optimizer = 2 * trainable * param_bytes
    grads = trainable * param_bytes
    copies = param_bytes == 4  # fp32 trainables under bf16 autocast: one bf16 copy per module input and weight
    autocast_cache = 2 * (lay.quantizable if full else (lora_trainable if copies else 0))
    per_layer = tokens * _layer_activation_bytes(lay, trained, copies, 0 if full else rank, 0.0 if full else dropout,
                                                 dora and not full, seq_len)
    checkpoint = tokens * lay.hidden * (4 if full else 2)  # the layer input: fp32 residual stream when full
    saved = lay.layers * (checkpoint if checkpointing else per_layer)
    working = tokens * 6 * lay.intermediate
    if copies and trained:
        working += tokens * 4 * max(m.in_features for m in trained)
    if method == "qlora" or full:
        working += 2 * lay.largest_linear
    if dora and trained:
        working += 4 * max(m.in_features * m.out_features for m in trained)
    head = tokens * lay.hidden * (4 + 2 + 4) + min(tokens, LM_HEAD_TOKEN_TILE) * min(lay.vocab, LM_HEAD_VOCAB_TILE) * 2
    head_grads = 4 * lay.vocab * lay.hidden if full else 0
    static = weights + adapter + optimizer
    # grads at each moment: LoRA's are counted whole (they are small); full fine-tuning's build up layer by layer
    moments = {
        "end of forward (LM head)": (head_grads if full else grads, saved + autocast_cache + head),
        "backward of the last layer": (
            head_grads + grads // lay.layers if full else grads,
            saved + (per_layer + autocast_cache // lay.layers if checkpointing else autocast_cache)
            + tokens * lay.hidden * 2 + working,
        ),
        "end of backward": (grads, per_layer + checkpoint + working),
    }
    moment, (grads_now, activations) = max(moments.items(), key=lambda kv: sum(kv[1]))
    activations += CUBLAS_WORKSPACES
    peak = static + grads_now + activations
    return {
        "method": method,
        "gradient_checkpointing": checkpointing,
        "weights": weights,
        "lora_params": adapter,
        "gradients": grads_now,
        "optimizer": optimizer,
        "activations": activations,
        "peak": peak,
        "device": int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES,
        "peak_at": moment,
    }


def _plan(lay: Layout, lora_trainable: int, trained: list[LayerModule], rank: int, dropout: float, dora: bool,
          seq_len: int, batch_size: int) -> dict:
    rows = [
        _method_plan(lay, method, checkpointing, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)
        for method in METHODS
        for checkpointing in (True, False)
    ]
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "rank": rank,
        "lora_trainable": lora_trainable,
        "lora_dropout": dropout,
        "rows": rows,
        # What lora train's offloaded checkpointing (kernels.py, on GPUs) keeps in host memory instead: each
        # decoder layer's bf16 input. Measured: QLoRA 7.37 -> 6.56 GiB on the Llama-3.1-8B shape (plan: 1.0 GiB).
        "offloaded": lay.layers * batch_size * seq_len * lay.hidden * 2,
        "assumptions": (
            "peak = torch.cuda.max_memory_allocated of a TRL SFTTrainer step: bf16 autocast, AdamW, SDPA, "
            "TRL's chunked LM head; LoRA adapters fp32 (PEFT), QLoRA adapters bf16 (TRL); full fine-tuning keeps "
            f"fp32 weights. device = peak x {1 + ALLOCATOR_SLACK:g} + {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context."
        ),
    }


def _match(module_path: str, names) -> bool:
    return any(module_path == n or module_path.endswith("." + n) for n in names)


def memory_plan(config, lora_trainable: int, seq_len: int = 2048, batch_size: int = 1, lora_modules=None,
                rank: int = 16, dropout: float = 0.0, dora: bool = False) -> dict:
    """The memory plan for training this config (a transformers config) with lora_trainable adapter parameters.

    lora_modules: the target module names as in a recipe, "all-linear" for every Linear of a decoder layer, or
    None for PEFT's default for the architecture. Returns a JSON-serialisable dict; format_memory_plan prints it.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    lay = layout_of(build_meta_model(config))
    if lora_modules is None:
        lora_modules = PEFT_DEFAULTS.get(lay.model_type) or "all-linear"
    if lora_modules == "all-linear":
        trained = lay.layer_modules
    else:
        names = [lora_modules] if isinstance(lora_modules, str) else list(lora_modules)
        trained = [m for m in lay.layer_modules if _match(m.path, names)]
    return _plan(lay, lora_trainable, trained, rank, dropout, dora, seq_len, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# LoRA targets and PEFT


def _preset_paths(lay: Layout, preset: str) -> list[str]:
    return [m.path for m in lay.layer_modules if m.role == preset]


def resolve_target(target, model, lay: Layout):
    """LoraConfig.target_modules for --target or a recipe's target_modules; LoraError for unknown names.

    Names are the last part of module names, as in a recipe; the presets attention and mlp expand to the
    layer's modules of that kind, as a regex over their paths where a name is in both (GPT-2's c_proj).
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from lora_cli.train import linear_module_names

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
    import torch
    from peft import get_peft_model

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
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix, _ = _decoder_layers(model)
    targeted = {_layer_key(name.removeprefix("base_model.model."), prefix)
                for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)}
    rows: dict[tuple, dict] = {}
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape:
            key = _layer_key(name, prefix)
            row = rows.setdefault((key, shape), {"module": key, "type": type(module).__name__, "count": 0,
                                                 "in_features": shape[0], "out_features": shape[1],
                                                 "lora": key in targeted})
            row["count"] += 1
    return list(rows.values())


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
    from lora_cli.train import lora_config

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
    targeted = [m for m in lay.layer_modules if any(row["lora"] and row["module"] == m.path for row in modules)]
    config_target = first.peft_config["default"].target_modules
    plan = _plan(lay, rows[0]["trainable"], targeted, ranks[0], lora.dropout, lora.use_dora, seq_len, batch_size)
    notes = []
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
        },
        "modules": modules,
        "ranks": rows,
        "memory": plan,
        "notes": notes,
    }


def inspect_params(model: str, ranks=None, target=None, alpha: float | None = None, dora: bool | None = False,
                   rslora: bool | None = False, dropout: float | None = None, seq_len: int | None = DEFAULT_SEQ_LEN,
                   batch_size: int | None = DEFAULT_BATCH_SIZE, trust_remote_code: bool = False) -> dict:
    """Exact PEFT counts for each rank (an int, a list, or "4,8,16") and a memory plan at the first rank.

    JSON-serialisable. None means the default: the recipe's for LoRA (recipe.LoraSection: r 16, alpha 32,
    dropout 0.05), PEFT's target modules for the architecture, 2048 tokens, batch 1.
    """
    defaults = LoraSection()
    lora = LoraSection(
        alpha=defaults.alpha if alpha is None else alpha,
        dropout=defaults.dropout if dropout is None else dropout,
        target_modules=target,
        use_dora=bool(dora),
        use_rslora=bool(rslora),
    )
    return _inspect(model, lora, defaults.r if ranks is None else ranks,
                    DEFAULT_SEQ_LEN if seq_len is None else seq_len,
                    DEFAULT_BATCH_SIZE if batch_size is None else batch_size, trust_remote_code)


def inspect_recipe(recipe_path, overrides=(), model: str | None = None, ranks=None, target=None, alpha=None,
                   dora: bool | None = None, rslora: bool | None = None, dropout=None, seq_len: int | None = None,
                   batch_size: int | None = None) -> dict:
    """What a recipe would train: its model and lora section, its max_length and batch size; arguments override."""
    from lora_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    lora = recipe.lora
    changes = {"target_modules": target, "alpha": alpha, "use_dora": dora, "use_rslora": rslora, "dropout": dropout}
    lora = dataclasses.replace(lora, **{k: v for k, v in changes.items() if v is not None})
    training = recipe.training
    if seq_len is None:
        seq_len = training.get("max_length") or _sft_default("max_length")
    if batch_size is None:
        batch_size = training.get("per_device_train_batch_size") or _sft_default("per_device_train_batch_size")
    report = _inspect(model or recipe.model.name_or_path, lora, ranks or [lora.r], seq_len, batch_size,
                      recipe.model.trust_remote_code)
    quantization = recipe.quantization
    checkpointing = training.get("gradient_checkpointing")
    report["recipe"] = {
        "path": str(recipe_path),
        "method": "qlora" if quantization is not None and quantization.load_in_4bit else "lora",
        "gradient_checkpointing": _sft_default("gradient_checkpointing") if checkpointing is None else checkpointing,
        "load_in_8bit": bool(quantization is not None and quantization.load_in_8bit),
    }
    return report


def _sft_default(name: str):
    from trl import SFTConfig

    return next(f.default for f in dataclasses.fields(SFTConfig) if f.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Text


def _gib(n: int) -> str:
    return "<0.01" if 0 < n < GIB / 200 else f"{n / GIB:.2f}"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_memory_plan(plan: dict, highlight: tuple[str, bool] | None = None) -> str:
    """The memory plan as a text table (GiB); highlight=(method, checkpointing) marks one row."""
    tokens = f"{plan['batch_size']} x {plan['seq_len']} tokens"
    title = f"Memory plan for one training step, batch {tokens}, LoRA r={plan['rank']} (GiB, peak = max allocated):"
    lines = [title]
    header = ["method", "checkpointing", "weights", "LoRA", "grads", "optimizer", "activations", "peak", "device"]
    rows = []
    for row in plan["rows"]:
        mark = "  <- recipe" if highlight == (row["method"], row["gradient_checkpointing"]) else ""
        rows.append([METHOD_NAMES[row["method"]], "on" if row["gradient_checkpointing"] else "off",
                     _gib(row["weights"]), "-" if row["method"] == "full" else _gib(row["lora_params"]),
                     _gib(row["gradients"]), _gib(row["optimizer"]), _gib(row["activations"]), _gib(row["peak"]),
                     _gib(row["device"]) + mark])
    lines += _table(header, rows, right=set(range(2, 9)))
    lines.append("  activations include the backward working set, the LM head's buffers and cuBLAS workspaces;")
    lines.append("  device adds the CUDA context and allocator slack. Measured on an H100: docs/inspect-params.md.")
    lines.append(f"  With checkpointing on a GPU, lora train keeps each layer's input in host memory "
                 f"(speed.offload_activations):\n  {_gib(plan['offloaded'])} GiB less on the rows with checkpointing on.")
    return "\n".join(lines)


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
    lines += _table(["module", "count", "shape (in -> out)", "LoRA"], rows, right={1})
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
        lines += ["", f"Recipe {recipe['path']}: {method}, gradient checkpointing {checkpointing}."]
        if recipe["load_in_8bit"]:
            lines.append("  8-bit loading is not modelled: expect a peak between the QLoRA and LoRA rows.")
    lines += ["", format_memory_plan(report["memory"], highlight)]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
