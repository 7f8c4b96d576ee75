"""`lora export ADAPTER OUT --format gguf-lora`: the adapter alone as a GGUF LoRA, for `llama-cli --lora` and
Ollama's ADAPTER, applied to a GGUF of the same base.

Written as llama.cpp's convert_lora_to_gguf.py lays it out (general.type "adapter", tensors named after the base's
GGUF tensors with .lora_a/.lora_b, Llama's q/k permutation applied to lora_b's rows), with one difference: PEFT's
per-layer scale (alpha/r, alpha/sqrt(r) for rsLoRA, rank_pattern and alpha_pattern) is folded into lora_b and no
alpha is written, so llama.cpp applies each layer exactly as PEFT does whatever the scaling rule.

Verified by reading the file back: each pair is dequantized, mapped to the base's parameter with transformers'
GGUF name map and un-permuted with its GGUF tensor processor (not our code), added to the float32 base, and the
logits compared with PEFT's unmerged adapter on lora merge's probes.
"""

import math
import re

from lora_cli.errors import LoraError

LORA_QUANTS = ("f16", "q8_0")
# How much of the adapter's own effect on the logits the file may miss (16-bit / 8-bit rounding of A and B).
MISSED_EFFECT = {"f16": 0.05, "q8_0": 0.2}


def export_gguf_lora(source, out, staging, quant: str, verify: bool, progress):
    import gguf

    from lora_cli.export import ExportResult
    from lora_cli.export.gguf import _permute, check_quant, family_of, gguf_tensor_name
    from lora_cli.models import load_config, read_adapter, resolve_model_path

    quant = check_quant(quant, LORA_QUANTS)
    info = read_adapter(source.folder, source.base)
    config = load_config(resolve_model_path(info.base, info.field), info.model.trust_remote_code, info.field)
    family = family_of(config)
    _check_adapter(info)
    pairs = _lora_pairs(info)
    result = ExportResult(out, "gguf-lora", quant, f"{source.name} (on {info.base})")

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.arch)
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    file = staging / f"{source.stem}-lora-{quant}.gguf"
    writer = gguf.GGUFWriter(file, family.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(source.stem)
    progress(f"Writing {out / file.name} ...")
    types: dict[str, int] = {}
    for module, (a, b, scale) in pairs.items():
        name = gguf_tensor_name(tensor_map, module + ".weight")
        if name is None:
            raise LoraError(f"The adapter's layer '{module}' has no place in llama.cpp's {family.arch} layout.")
        b = b * scale
        if family.permute_qk and module.endswith("q_proj"):
            b = _permute(b, config.num_attention_heads)
        elif family.permute_qk and module.endswith("k_proj"):
            b = _permute(b, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            qtype = getattr(gguf.GGMLQuantizationType, quant.upper())
            try:
                packed = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # a rank below the 32-value block: F16, as llama.cpp's converter falls back
                qtype = gguf.GGMLQuantizationType.F16
                packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name + suffix, packed, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result.report.append(f"wrote:     {len(pairs)} LoRA layers for llama.cpp's {family.arch}, tensors "
                         + ", ".join(f"{n} {t}" for t, n in sorted(types.items())) + "; PEFT's scale folded into lora_b")
    if verify:
        progress("Verifying: the file read back onto the base, against PEFT's unmerged adapter ...")
        _verify(result, file, info, quant)
    base_file = "BASE.gguf"
    result.notes.append(f"Use it:   llama-cli -m {base_file} --lora {out / file.name}   (BASE.gguf: lora export "
                        f"{info.base} DIR --format gguf)")
    result.notes.append(f"Ollama:   a Modelfile with FROM <the base> and ADAPTER {out / file.name}")
    return result


def _check_adapter(info) -> None:
    config = info.peft_config
    where = info.folder / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{where}: a {config['peft_type']} adapter; GGUF adapters are LoRA only.")
    if config.get("use_dora"):
        raise LoraError(f"{where}: DoRA adapters have no GGUF form (llama.cpp applies plain LoRA); export the merged "
                        "model with --format gguf instead.")
    if config.get("modules_to_save"):
        raise LoraError(f"{where}: modules_to_save ({', '.join(config['modules_to_save'])}) are full layers, which a "
                        "GGUF adapter cannot carry; export the merged model with --format gguf instead.")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{where}: bias '{config['bias']}' trains biases, which a GGUF adapter cannot carry; export "
                        "the merged model with --format gguf instead.")


def _lora_pairs(info) -> dict:
    """{base module name: (A, B, PEFT's scale)} from adapter_model.safetensors, as float32 numpy arrays."""
    from safetensors import safe_open

    config = info.peft_config
    weights = info.folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraError(f"'{info.folder}' has no adapter_model.safetensors (pickled .bin adapters are not read).")
    parts: dict[str, dict] = {}
    with safe_open(weights, framework="pt") as tensors:
        for key in tensors.keys():
            found = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if found is None:
                raise LoraError(f"{weights}: '{key}' is not a LoRA A/B matrix of a linear layer (embedding LoRAs and "
                                "trained full layers have no GGUF adapter form); export the merged model instead.")
            parts.setdefault(found[1], {})[found[2]] = tensors.get_tensor(key).float().numpy()
    pairs = {}
    for module, ab in parts.items():
        rank = ab["A"].shape[0]
        alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[module] = (ab["A"], ab["B"], scale)
    return pairs


def _pattern(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _verify(result, file, info, quant: str) -> None:
    import torch
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    import gguf
    from lora_cli.merge import max_diff, probe_inputs, probe_logits
    from lora_cli.models import attach_adapter, load_adapter_base, load_tokenizer

    base, path = load_adapter_base(info, torch.float32)
    tokenizer = load_tokenizer(str(info.folder) if info.has_tokenizer else path, info.model.trust_remote_code)
    probes = probe_inputs(tokenizer)
    peft_model = attach_adapter(base, info).eval()
    reference = probe_logits(peft_model, probes)
    with peft_model.disable_adapter():
        plain = probe_logits(peft_model, probes)
    effect = max_diff(reference, plain)
    model = peft_model.unload()  # the base alone, to add the file's adapter to

    reader = gguf.GGUFReader(file)
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    loaded = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in loaded.items():
            if not name.endswith(".lora_a"):
                continue
            base_name = name.removesuffix(".lora_a")
            b = torch.from_numpy(processor.process(loaded[base_name + ".lora_b"].numpy(), base_name).weights.copy())
            parameters[names[base_name]].add_(b.reshape(-1, a.shape[0]) @ a)
    difference = max_diff(reference, probe_logits(model.eval(), probes))
    limit = MISSED_EFFECT[quant] * effect
    result.report.append(
        f"verify:    the file applied to the base differs from PEFT's unmerged adapter by up to {difference:.3g} "
        f"in the logits; the adapter moves them by up to {effect:.3g} (at most {MISSED_EFFECT[quant]:.0%} of that "
        f"may be lost in {quant})"
    )
    if not difference <= limit:
        raise LoraError(
            f"Verification failed: the GGUF adapter applied to the base differs from PEFT's by up to "
            f"{difference:.4g} in the logits, more than {MISSED_EFFECT[quant]:.0%} of the adapter's own effect "
            f"({effect:.4g}). Nothing was written to {result.out_dir}; --no-verify skips the check."
        )
    result.verified = True
