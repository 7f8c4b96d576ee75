"""What LoRA targets in a model beyond PEFT's plain rules: `all-linear` on mixture-of-experts, hybrid and
image-text models, and the experts themselves (`lora.target_experts`). Imports nothing above errors.py.

What `all-linear` means here: every linear layer of the language model's decoder layers, that is attention, the
dense MLP layers and shared experts, and the linear mixers of hybrid layers (Mamba, gated delta nets, short
convolutions). Left out, and why:
- Routers (`gate`, `router`, `shared_expert_gate`): a router picks experts; training it moves which expert sees
  which token, and Llama 4's router returns a tuple that PEFT's LoRA layer cannot wrap. Name one in
  lora.target_modules to train it anyway.
- The routed experts: in transformers 5 they are one 3-D weight per projection for all experts, not linear layers.
  `lora.target_experts: true` adds them through PEFT's `target_parameters` (its ParamWrapper), which has no dropout.
- The vision tower of an image-text model: text data never runs it.
- Modules PEFT refuses on an architecture (the Mamba `out_proj` of Falcon-H1).
- On the MoE families whose transformers-4 checkpoints had one Linear per expert (Qwen3-MoE, Qwen3-Next, DeepSeek-V3,
  GLM-4-MoE, Mixtral), PEFT reads the names gate_proj, up_proj and down_proj as those experts' wherever they appear
  (huggingface/peft#3711): 0.21 moves them to the experts' 3-D weights, 0.22 adds those weights to them (through
  its ParamWrapper, which refuses dropout). So the shared experts' and dense layers' projections of those names
  cannot get an adapter of their own: they are left out too.
When nothing is left out, PEFT gets "all-linear" itself; otherwise a regex over the kept modules' paths.

Named modules (lora.target_modules: [q_proj, v_proj]) on an image-text model: PEFT matches a name in the vision and
audio towers too, where text data never runs it and where Gemma 4's modules of that name are wrappers it cannot
adapt. A name the decoder layers have is kept to them, as PEFT's own default for Gemma 4 is.
"""

import re

import torch

from lora_cli.errors import LoraError

LINEAR_TYPE_NAMES = ("Conv1D", "Linear4bit", "Linear8bitLt")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in LINEAR_TYPE_NAMES


def language_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(path, ModuleList) of the language model's decoder layers, also inside an image-text model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        for name, module in model.named_modules():
            if module is layers:
                return name, layers
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return name, module
    raise LoraError(f"Cannot find the {count} decoder layers of the {model.config.model_type} model.")


def is_router(path: str) -> bool:
    """A layer-relative module path that belongs to a router: mlp.gate, feed_forward.router, router.layer."""
    return any(part in ROUTER_NAMES for part in path.split("."))


def experts_modules(model) -> dict[str, torch.nn.Module]:
    """Layer-relative path -> module, for every module of the decoder layers that holds experts' 3-D weights
    (mlp.experts, feed_forward.experts, block_sparse_moe.experts; not the 3-D kernels of convolutions)."""
    _, layers = language_layers(model)
    found = {}
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, CONVOLUTIONS):
                continue
            if any(param.dim() == 3 for param in module.parameters(recurse=False)):
                found.setdefault(name, module)
    return found


def expert_parameters(model) -> list[str]:
    """Layer-relative names of the experts' 3-D weights (mlp.experts.gate_up_proj, ...): target_parameters."""
    return [f"{path}.{name}" for path, module in experts_modules(model).items()
            for name, param in module.named_parameters(recurse=False) if param.dim() == 3]


def layer_linears(model) -> list[str]:
    """Layer-relative paths of the linear modules in any decoder layer, in order of first appearance."""
    _, layers = language_layers(model)
    paths = {}
    for layer in layers:
        for name, module in layer.named_modules():
            if is_linear(module):
                paths[name] = None
    return list(paths)


def peft_refuses(model, leaf: str) -> bool:
    """Whether PEFT refuses LoRA on modules of this name in this architecture (Mamba's out_proj and conv1d)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba

    try:
        _check_lora_target_modules_mamba(LoraConfig(), model, leaf)
    except ValueError:
        return True
    return False


def taken_for_experts(model, leaves) -> set[str]:
    """The names that PEFT's conversion for transformers-5 MoE layouts reads as the experts' weights (module
    docstring above): PEFT 0.21 moves them there, 0.22 also adds the experts' weights to them. Each name is probed
    alone, since a fused pair (gate_proj and up_proj) is converted together. An empty set for other architectures."""
    from peft import LoraConfig

    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # transformers 4: nothing is converted
        return set()
    taken = set()
    for leaf in leaves:
        probe = LoraConfig(target_modules={leaf})
        try:
            convert_peft_config_for_transformers(probe, model, None)
        except ValueError:  # half of a fused pair: PEFT reads it as the experts' too
            taken.add(leaf)
            continue
        if leaf not in set(probe.target_modules or ()) or probe.target_parameters:
            taken.add(leaf)
    return taken


def peft_converts_experts(model) -> bool:
    """Whether PEFT reads `all-linear` on this model as the routed experts and routers too (the families of the
    module docstring's last point)."""
    return bool(taken_for_experts(model, {"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}))


def trainable_linears(model) -> list[str]:
    """Layer-relative paths that get LoRA for all-linear, with the exclusions of the module docstring."""
    paths = [p for p in layer_linears(model) if not is_router(p)]
    leaf = {path: path.rpartition(".")[2] for path in paths}
    taken = taken_for_experts(model, {leaf[p] for p in paths})
    return [p for p in paths if leaf[p] not in taken and not peft_refuses(model, leaf[p])]


def all_linear_targets(model):
    """target_modules for `all-linear`: the string itself when PEFT's meaning is ours, else a regex of the paths."""
    prefix, _ = language_layers(model)
    kept = trainable_linears(model)
    ours = {f"{prefix}.{i}.{path}" for i, layer in enumerate(language_layers(model)[1])
            for path, module in layer.named_modules() if path in kept and is_linear(module)}
    output = model.get_output_embeddings()
    peft_all_linear = {name for name, module in model.named_modules() if is_linear(module) and module is not output}
    if ours == peft_all_linear and not peft_converts_experts(model):
        return "all-linear"
    if not kept:
        raise LoraError(f"The {model.config.model_type} model has no linear layer that LoRA can train in its decoder "
                        "layers; name modules in lora.target_modules.")
    return re.escape(prefix) + r"\.\d+\.(?:" + "|".join(re.escape(path) for path in kept) + ")"


def language_model_targets(model, names: list[str]):
    """target_modules for module names: the names, or where a module outside the decoder layers has one of the
    decoder layers' names, a regex that keeps those names to the decoder layers (the others match anywhere)."""
    prefix, _ = language_layers(model)
    in_layers = {path.rpartition(".")[2] for path in layer_linears(model)}
    outside = {name.rpartition(".")[2] for name, _ in model.named_modules() if not name.startswith(prefix + ".")}
    kept = [name for name in names if name in in_layers and name in outside]
    if not kept:
        return names
    others = [name for name in names if name not in kept]
    pattern = re.escape(prefix) + r"\.\d+\.(?:.*\.)?(?:" + "|".join(map(re.escape, kept)) + ")"
    return pattern + (r"|(?:.*\.)?(?:" + "|".join(map(re.escape, others)) + ")" if others else "")


def check_named_targets(model, names: list[str]) -> None:
    """LoraError for module names that PEFT reads as the experts' (see the module docstring)."""
    leaves = {path.rpartition(".")[2] for path in layer_linears(model)}
    taken = sorted(taken_for_experts(model, [n for n in names if n in leaves]))
    if taken:
        raise LoraError(
            f"lora.target_modules: on the {model.config.model_type} model, PEFT reads {', '.join(taken)} as "
            "the routed experts' weights (its conversion of transformers-4 MoE adapters, huggingface/peft#3711), "
            "so the shared experts' and dense layers' modules of that name cannot be trained on their own. Leave "
            f"{'it' if len(taken) == 1 else 'them'} out, or set lora.target_experts: true to train the experts."
        )
