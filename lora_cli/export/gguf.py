"""Write a transformers model folder as one GGUF file for llama.cpp, Ollama and LM Studio, in pure Python.

Why this module exists rather than a call to llama.cpp's convert_hf_to_gguf.py: that script is not part of the
`gguf` package (it lives in the llama.cpp repository and moves with it, which is how other tools' GGUF exports
break), and below 8 bits it leaves quantizing to the compiled llama-quantize. What it knows about the families
lora trains is small and is followed here, on top of the gguf package's own pieces:
- tensor names come from gguf's TensorNameMap, hyperparameters are written with GGUFWriter under gguf's keys;
- Llama's q/k projections are permuted to llama.cpp's rotary layout (transformers' GGUF reader undoes it);
- Gemma's RMSNorm weights are stored as 1 + w, since llama.cpp multiplies by the stored weight;
- Llama 3's rope scaling is a rope_freqs tensor, Phi-3's long-context one two factor tensors;
- the vocabulary goes in as llama.cpp lays it out (tokens, types, merges or scores), with gguf's SpecialVocab
  for special ids, add_bos/add_eos and the chat template; the pre-tokenizer of a byte-level BPE vocabulary is
  named from the pre-tokenizer in tokenizer.json.
Weights are quantized by gguf.quants. K-quants (Q4_K_M, ...) have no Python quantizer there: Ollama's
`ollama create --quantize` or llama-quantize make them from the F16 or Q8_0 file written here.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_cli.errors import LoraError, did_you_mean

QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")  # the embedding and output matrices stay in Q8_0 (llama-quantize: Q6_K)


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False  # Llama's rotary halves are interleaved in llama.cpp
    norm_plus_one: bool = False  # Gemma's RMSNorm computes x * (1 + w)


# config.json model_type -> how llama.cpp runs it (and transformers reads it back).
FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as Llama
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma2": Family("gemma2", norm_plus_one=True),
    "gemma3_text": Family("gemma3", norm_plus_one=True),
    "phi3": Family("phi3"),
}

# Byte-level BPE pre-tokenizers (tokenizer.json) and llama.cpp's name for each (tokenizer.ggml.pre).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
    ("Split:" + _LLAMA3_SPLIT, "ByteLevel"): "llama-bpe",
    ("Split:" + _QWEN2_SPLIT, "ByteLevel"): "qwen2",
}


def family_of(config) -> Family:
    model_type = config.model_type
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise LoraError(
            f"lora export cannot write GGUF for the architecture '{model_type}' "
            f"({', '.join(getattr(config, 'architectures', None) or [model_type])}): it writes {known}, the "
            f"families whose llama.cpp layout it knows and checks. Export with --format vllm for a transformers "
            f"folder, or convert with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports this architecture."
            f"{did_you_mean(model_type, FAMILIES)}"
        )
    return FAMILIES[model_type]


def check_quant(quant: str, allowed=QUANTS) -> str:
    name = quant.lower()
    if name not in allowed:
        hint = (" K-quants such as q4_k_m have no pure-Python quantizer: export q8_0 or f16 and let "
                "`ollama create --quantize q4_K_M` or llama-quantize make them." if name.startswith(("q2_k", "q3_k",
                "q4_k", "q5_k", "q6_k")) else did_you_mean(name, allowed))
        raise LoraError(f"--quant must be one of {', '.join(allowed)}; got '{quant}'.{hint}")
    return name


def write_gguf(model_dir: Path, out_file: Path, quant: str, name: str, progress=lambda message: None) -> dict:
    """Write the transformers model in MODEL_DIR as OUT_FILE; returns what was written (types, counts)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(out_file, family.arch, use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + quant.upper()))
    _write_hyperparameters(writer, config, family)
    vocab = _write_vocabulary(writer, model_dir, tokenizer, config)
    types = _write_tensors(writer, model_dir, config, family, quant, progress)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": family.arch, "tensor_types": types, **vocab}


def _rope(config) -> dict:
    """The rope settings of the full-attention layers (transformers 5 keeps them in rope_parameters)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params.get("full_attention", params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": theta}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hyperparameters(writer, config, family: Family) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    rope = _rope(config)
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    if family.arch == "phi3":
        rotary = int(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
                     * config.hidden_size) // config.num_attention_heads
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_scaling_orig_ctx_len(
            rope.get("original_max_position_embeddings")
            or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    else:
        writer.add_rope_dimension_count(_head_dim(config))
    if family.arch in ("gemma2", "gemma3"):
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(local)
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind in ("longrope", "su") and family.arch == "phi3":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):
        raise LoraError(
            f"config.json's rope scaling '{kind}' has no GGUF form lora writes for {config.model_type} (it writes "
            "default, linear, yarn and llama3 rope, and Phi-3's longrope)."
        )


def _extra_tensors(config, family: Family):
    """Tensors llama.cpp computes rope from that transformers derives from config.json."""
    rope = _rope(config)
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "llama3":  # Llama 3.1+: per-frequency factors
        dim, base = _head_dim(config), rope["rope_theta"]
        factor = rope.get("factor", 8.0)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_context = rope.get("original_max_position_embeddings", 8192)
        factors = []
        for i in range(0, dim, 2):
            wavelength = 2 * math.pi * base ** (i / dim)
            if wavelength < old_context / high:
                factors.append(1.0)
            elif wavelength > old_context / low:
                factors.append(factor)
            else:
                smooth = (old_context / wavelength - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        yield "rope_freqs.weight", np.array(factors, dtype=np.float32)
    elif kind in ("longrope", "su") and family.arch == "phi3":
        yield "rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary layout (halves) to llama.cpp's (interleaved pairs), head by head."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoraError(f"'{model_dir}' has no safetensors weights to export.")
    return files


def gguf_tensor_name(tensor_map, hf_name: str) -> str | None:
    return tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _write_tensors(writer, model_dir: Path, config, family: Family, quant: str, progress) -> dict:
    import gguf
    from safetensors import safe_open

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.arch)
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    counts: dict[str, int] = {}
    for name, data in _extra_tensors(config, family):
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
        counts["F32"] = counts.get("F32", 0) + 1
    for file in _safetensors_files(model_dir):
        progress(f"Converting {file.name} ({quant}) ...")
        with safe_open(file, framework="pt") as tensors:
            for hf_name in tensors.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                name = gguf_tensor_name(tensor_map, hf_name)
                if name is None:
                    raise LoraError(
                        f"The weight '{hf_name}' in {file} has no place in llama.cpp's {family.arch} layout; this "
                        f"{config.model_type} variant is not one lora can write as GGUF."
                    )
                data = tensors.get_tensor(hf_name).float().numpy()
                if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, heads)
                elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, kv_heads or heads)
                if family.norm_plus_one and hf_name.endswith("norm.weight"):
                    data = data + 1
                qtype = _tensor_type(name, data, quant)
                try:
                    packed = gguf.quants.quantize(data, qtype)
                except gguf.QuantError:  # rows not a multiple of the block size: llama.cpp falls back the same way
                    qtype = gguf.GGMLQuantizationType.F16
                    packed = gguf.quants.quantize(data, qtype)
                writer.add_tensor(name, packed, raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def _tensor_type(name: str, data: np.ndarray, quant: str):
    """F32 for vectors and norms (llama.cpp's rule), Q8_0 for the embedding/output of the 4/5-bit types."""
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return types.F32
    if quant in LOW_BIT and name in ("token_embd.weight", "output.weight"):
        return types.Q8_0
    return getattr(types, quant.upper())


def _write_vocabulary(writer, model_dir: Path, tokenizer, config) -> dict:
    """Tokens, their types and merges (byte-level BPE) or scores (sentencepiece-style BPE), then SpecialVocab."""
    import gguf

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise LoraError(f"'{model_dir}' has no tokenizer.json: lora writes GGUF vocabularies from a fast tokenizer.")
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    vocab_size = max(config.vocab_size, len(tokenizer))
    if model.get("type") == "BPE" and decoder == "ByteLevel":
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), tokenizer_file)
        tokens, types = _byte_level_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = True
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        pre = "default"
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        merges = False
    else:
        raise LoraError(
            f"{tokenizer_file}: a {model.get('type')} tokenizer (decoder {decoder}) is not one lora writes as a "
            "GGUF vocabulary; it writes byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2) and sentencepiece-style BPE "
            "with byte fallback (Llama 2, Mistral, Gemma, Phi-3)."
        )
    special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=len(tokens))
    if getattr(tokenizer, "chat_template", None) and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": "gpt2" if merges else "llama", "pre_tokenizer": pre, "tokens": len(tokens),
            "chat_template": special.chat_template is not None}


def _pre_tokenizer_name(pre_tokenizer: dict | None, where: Path) -> str:
    steps = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    key = tuple(
        f"Split:{step['pattern'].get('Regex')}" if step.get("type") == "Split" else step.get("type") for step in steps
    )
    if key not in PRE_TOKENIZERS:
        raise LoraError(
            f"{where}: the pre-tokenizer {' + '.join(map(str, key)) or 'none'} is not one lora can name for llama.cpp "
            f"(it names {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); without the right name llama.cpp would "
            "split text differently from the model's own tokenizer."
        )
    return PRE_TOKENIZERS[key]


def _byte_level_tokens(tokenizer, vocab_size: int):
    """Every id's token text and type, as llama.cpp expects them (added tokens as CONTROL or USER_DEFINED)."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
