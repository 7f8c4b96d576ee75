"""PEFT's LoraConfig from the recipe's lora section, and what it targets in a model: its linear layers' names and
the adapter's size. Shared by training, the memory plan and inspect-params; imports nothing above errors.py.
"""

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

from lora_cli.errors import LoraError
from lora_cli.experts import (all_linear_targets, check_named_targets, expert_parameters, is_linear, language_layers,
                               language_model_targets)


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules matches), lm_head excluded."""
    names = set()
    for name, module in model.named_modules():
        if is_linear(module):
            names.add(name.split(".")[-1])
    names.discard("lm_head")
    return sorted(names)


def lora_config(section, model):
    """PEFT's LoraConfig from the recipe, with target modules checked against the loaded model; all-linear and
    the experts as experts.py defines them."""
    available = linear_module_names(model)
    targets = section.target_modules
    model_type = model.config.model_type
    experts = expert_parameters(model) if section.target_experts else None
    if section.target_experts and not experts:
        raise LoraError(f"lora.target_experts: the {model_type} model has no experts (it is not a mixture-of-experts "
                        "model); remove the key or set it to false.")
    if experts and section.dropout:
        raise LoraError("lora.dropout: PEFT's LoRA on the experts' weights (lora.target_experts: true) has no dropout; "
                        "set lora.dropout: 0.")
    if targets is None and model_type not in DEFAULT_TARGETS:
        raise LoraError(
            f"lora.target_modules: PEFT has no default target modules for the '{model_type}' architecture; "
            f"set lora.target_modules to all-linear or a list from the model's linear layers: {', '.join(available)}."
        )
    if isinstance(targets, list):
        missing = [t for t in targets if t not in available]
        if missing:
            raise LoraError(
                f"lora.target_modules: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a linear "
                f"layer of this model. Its linear layers are: {', '.join(available)} (or write all-linear)."
                + (" The routed experts are not linear layers: set lora.target_experts: true to train them."
                   if expert_parameters(model) else "")
            )
        check_named_targets(model, targets)
        targets = language_model_targets(model, targets)
    if targets == "all-linear":
        targets = all_linear_targets(model)
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        target_parameters=experts,
        bias=section.bias,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        modules_to_save=section.modules_to_save,
        task_type="CAUSAL_LM",
    )


def lora_parameter_count(model, lora_section) -> int:
    """r x (in + out) for every linear layer lora_config targets, matched as PEFT matches it (image-text models keep
    the decoder layers' names out of the vision tower), and the experts: the adapter size, before PEFT wraps the
    model."""
    config = lora_config(lora_section, model)
    if config.target_modules is None:
        config.target_modules = DEFAULT_TARGETS[model.config.model_type]
    output = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not is_linear(module) or module is output:
            continue
        if config.target_modules == "all-linear" or check_target_module_exists(config, name):
            total += lora_section.r * (module.in_features + module.out_features)
    if lora_section.target_experts:  # PEFT's ParamWrapper: A (r x experts, in), B (out, r x experts)
        _, layers = language_layers(model)
        for path in expert_parameters(model):
            for layer in layers:
                try:
                    experts, rows, columns = layer.get_parameter(path).shape
                except AttributeError:  # a layer without this expert weight (dense layers of a partly-MoE model)
                    continue
                total += lora_section.r * experts * (rows + columns)
    return total
