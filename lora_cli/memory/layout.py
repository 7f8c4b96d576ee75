"""A model's shapes as the memory plan reads them (Layout), from its config on the meta device: no weights."""

import re
import warnings
from dataclasses import dataclass, field

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

from lora_cli.errors import LoraError, first_line
from lora_cli.experts import language_layers
from lora_cli.multimodal import auto_class

OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h"}
# Activation functions written as several tensor ops in Python keep that many intermediates for backward.
ACTIVATION_SAVED = {"gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2}


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


def linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a Linear or transformers' Conv1D (GPT-2), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def build_meta_model(config, trust_remote_code: bool = False):
    """The model for this config on the meta device: every shape, no memory, no weights downloaded."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise LoraError(
            f"The model type '{config.model_type}' is not a causal language model: {first_line(error)}"
        ) from None


def layer_key(name: str, prefix: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj; lm_head stays lm_head. Outside the language layers
    (an image-text model's vision tower) layer numbers become *, so that a tower's layers share their rows:
    model.vision_tower.encoder.layers.*.mlp.fc1."""
    if name.startswith(prefix + "."):
        rest = name[len(prefix) + 1:]
        return rest.partition(".")[2]
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def _global(config, name: str):
    """A config value, or None where the config has none or sets it per layer (Gemma 4 refuses the global read)."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError, a class older versions lack
        return None


def layout_of(model) -> Layout:
    config = model.config.get_text_config()
    _, layers = language_layers(model)
    output_embeddings = model.get_output_embeddings()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    attention = getattr(layers[0], "self_attn", None)  # Gemma 4 sizes heads per layer: its first layer's
    head_dim = getattr(attention, "head_dim", None) or _global(config, "head_dim") or hidden // heads
    kv_heads = _global(config, "num_key_value_heads") or heads // getattr(attention, "num_key_value_groups", 1)
    quantizable, largest = 0, 0
    for module in model.modules():
        shape = linear_shape(module)
        if shape and module is not output_embeddings:
            quantizable += shape[0] * shape[1]
            largest = max(largest, shape[0] * shape[1])
    layer_modules, norm_widths, dropouts = [], [], 0
    for name, module in layers[0].named_modules():
        shape = linear_shape(module)
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


def _match(module_path: str, names) -> bool:
    return any(module_path == n or module_path.endswith("." + n) for n in names)


def layout_and_trained(config, lora_modules=None) -> tuple[Layout, list[LayerModule]]:
    """The config's Layout and the decoder-layer modules LoRA trains (lora_modules as memory_plan takes them)."""
    lay = layout_of(build_meta_model(config))
    if lora_modules is None:
        lora_modules = PEFT_DEFAULTS.get(lay.model_type) or "all-linear"
    if lora_modules == "all-linear":
        return lay, lay.layer_modules
    names = [lora_modules] if isinstance(lora_modules, str) else list(lora_modules)
    return lay, [m for m in lay.layer_modules if _match(m.path, names)]
