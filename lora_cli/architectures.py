"""The built-in registry of popular architectures, so `lora inspect-params` works offline.

Each entry is the part of the model's config.json that fixes its shapes (sizes, layer and head counts,
vocabulary, tied embeddings, model_type, experts), copied from the published config; `params` is the published
parameter count, which the tests check against the model that transformers builds from the entry: exactly where
the publisher gives it to the parameter (safetensors metadata), else `published` as its model card rounds it
("8.2B"), and the built model must round to it.
Rope settings and token ids are left out: they change no shape. Names match case-insensitively, with or
without the organisation, and an instruct/chat variant finds its base (same shapes).
"""

# Suffixes that name a fine-tuned variant with the same shapes as its base model.
VARIANT_SUFFIXES = ("-instruct", "-chat", "-hf", "-it")

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5}
_LLAMA2 = {**_LLAMA, "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}
_LLAMA3 = {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 131072}
_MISTRAL = {"model_type": "mistral", "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
            "tie_word_embeddings": False}
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
_SMOLLM2 = {**_LLAMA, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
            "head_dim": 64}
_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "activation_function": "gelu_new",
         "tie_word_embeddings": True}


def _decoder(base, hidden, intermediate, layers, heads, kv_heads, **extra):
    return {**base, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, **extra}


def _gpt2(embd, layers, heads):
    return {**_GPT2, "n_embd": embd, "n_layer": layers, "n_head": heads}


_PHI3 = {"model_type": "phi3", "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": 32064,
         "max_position_embeddings": 4096, "tie_word_embeddings": False, "pad_token_id": 32000}
_GEMMA2 = {"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 256000,
           "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
           "sliding_window": 4096, "tie_word_embeddings": True}


_QWEN3 = {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": 151936,
          "max_position_embeddings": 40960, "head_dim": 128}
_QWEN3_MOE = {**_QWEN3, "model_type": "qwen3_moe", "tie_word_embeddings": False, "num_experts_per_tok": 8,
              "num_experts": 128}
_GPT_OSS = {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_experts_per_tok": 4,
            "sliding_window": 128, "max_position_embeddings": 131072, "tie_word_embeddings": False}
_SMOLLM3 = {"model_type": "smollm3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": 128256,
            "max_position_embeddings": 65536, "tie_word_embeddings": True}


def _entry(hub_id: str, params: int, config: dict, *aliases: str) -> dict:
    return {"hub_id": hub_id, "params": params, "config": config, "aliases": list(aliases)}


def _carded(hub_id: str, published: str, config: dict, *aliases: str) -> dict:
    """An entry whose parameter count is published rounded, on its model card ("8.2B", "21B")."""
    return {"hub_id": hub_id, "params": None, "published": published, "config": config, "aliases": list(aliases)}


# name -> hub id, published parameter count, config, other names
ARCHITECTURES: dict[str, dict] = {
    "gpt2": _entry("openai-community/gpt2", 124_439_808, _gpt2(768, 12, 12)),
    "gpt2-medium": _entry("openai-community/gpt2-medium", 354_823_168, _gpt2(1024, 24, 16)),
    "gpt2-large": _entry("openai-community/gpt2-large", 774_030_080, _gpt2(1280, 36, 20)),
    "gpt2-xl": _entry("openai-community/gpt2-xl", 1_557_611_200, _gpt2(1600, 48, 25)),
    "distilgpt2": _entry("distilbert/distilgpt2", 81_912_576, _gpt2(768, 6, 12)),
    "llama-2-7b": _entry("meta-llama/Llama-2-7b-hf", 6_738_415_616, _decoder(_LLAMA2, 4096, 11008, 32, 32, 32)),
    "llama-2-13b": _entry("meta-llama/Llama-2-13b-hf", 13_015_864_320, _decoder(_LLAMA2, 5120, 13824, 40, 40, 40)),
    "llama-2-70b": _entry("meta-llama/Llama-2-70b-hf", 68_976_648_192, _decoder(_LLAMA2, 8192, 28672, 80, 64, 8)),
    "llama-3.1-8b": _entry("meta-llama/Llama-3.1-8B", 8_030_261_248,
                           _decoder(_LLAMA3, 4096, 14336, 32, 32, 8, tie_word_embeddings=False), "meta-llama-3.1-8b"),
    "llama-3.1-70b": _entry("meta-llama/Llama-3.1-70B", 70_553_706_496,
                            _decoder(_LLAMA3, 8192, 28672, 80, 64, 8, tie_word_embeddings=False), "meta-llama-3.1-70b"),
    "llama-3.2-1b": _entry("meta-llama/Llama-3.2-1B", 1_235_814_400,
                           _decoder(_LLAMA3, 2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True)),
    "llama-3.2-3b": _entry("meta-llama/Llama-3.2-3B", 3_212_749_824,
                           _decoder(_LLAMA3, 3072, 8192, 28, 24, 8, head_dim=128, tie_word_embeddings=True)),
    "mistral-7b-v0.1": _entry("mistralai/Mistral-7B-v0.1", 7_241_732_096,
                              _decoder(_MISTRAL, 4096, 14336, 32, 32, 8, vocab_size=32000), "mistral-7b-v0.2"),
    "mistral-7b": _entry("mistralai/Mistral-7B-v0.3", 7_248_023_552,
                         _decoder(_MISTRAL, 4096, 14336, 32, 32, 8, vocab_size=32768), "mistral-7b-v0.3"),
    "qwen2.5-0.5b": _entry("Qwen/Qwen2.5-0.5B", 494_032_768,
                           _decoder(_QWEN2, 896, 4864, 24, 14, 2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": _entry("Qwen/Qwen2.5-1.5B", 1_543_714_304,
                           _decoder(_QWEN2, 1536, 8960, 28, 12, 2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-3b": _entry("Qwen/Qwen2.5-3B", 3_085_938_688,
                         _decoder(_QWEN2, 2048, 11008, 36, 16, 2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-7b": _entry("Qwen/Qwen2.5-7B", 7_615_616_512,
                         _decoder(_QWEN2, 3584, 18944, 28, 28, 4, vocab_size=152064, tie_word_embeddings=False)),
    "smollm2-135m": _entry("HuggingFaceTB/SmolLM2-135M", 134_515_008, _decoder(_SMOLLM2, 576, 1536, 30, 9, 3)),
    "smollm2-360m": _entry("HuggingFaceTB/SmolLM2-360M", 361_821_120, _decoder(_SMOLLM2, 960, 2560, 32, 15, 5)),
    "smollm2-1.7b": _entry("HuggingFaceTB/SmolLM2-1.7B", 1_711_376_384, _decoder(_SMOLLM2, 2048, 8192, 24, 32, 32)),
    "phi-3-mini": _entry("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, _decoder(_PHI3, 3072, 8192, 32, 32, 32),
                         "phi-3-mini-4k", "phi-3-mini-128k"),
    "gemma-2-2b": _entry("google/gemma-2-2b", 2_614_341_888,
                         _decoder(_GEMMA2, 2304, 9216, 26, 8, 4, head_dim=256, query_pre_attn_scalar=256)),
    # 2025-26 models; published counts from their model cards
    "qwen3-0.6b": _carded("Qwen/Qwen3-0.6B", "0.6B", _decoder(_QWEN3, 1024, 3072, 28, 16, 8, tie_word_embeddings=True)),
    "qwen3-1.7b": _carded("Qwen/Qwen3-1.7B", "1.7B", _decoder(_QWEN3, 2048, 6144, 28, 16, 8, tie_word_embeddings=True)),
    "qwen3-4b": _carded("Qwen/Qwen3-4B", "4.0B", _decoder(_QWEN3, 2560, 9728, 36, 32, 8, tie_word_embeddings=True)),
    "qwen3-8b": _carded("Qwen/Qwen3-8B", "8.2B", _decoder(_QWEN3, 4096, 12288, 36, 32, 8, tie_word_embeddings=False)),
    "qwen3-14b": _carded("Qwen/Qwen3-14B", "14.8B",
                         _decoder(_QWEN3, 5120, 17408, 40, 40, 8, tie_word_embeddings=False)),
    "qwen3-32b": _carded("Qwen/Qwen3-32B", "32.8B",
                         _decoder(_QWEN3, 5120, 25600, 64, 64, 8, tie_word_embeddings=False)),
    "qwen3-30b-a3b": _carded("Qwen/Qwen3-30B-A3B", "30.5B",
                             _decoder(_QWEN3_MOE, 2048, 6144, 48, 32, 4, moe_intermediate_size=768)),
    "qwen3-235b-a22b": _carded("Qwen/Qwen3-235B-A22B", "235B",
                               _decoder(_QWEN3_MOE, 4096, 12288, 94, 64, 4, moe_intermediate_size=1536)),
    "gpt-oss-20b": _carded("openai/gpt-oss-20b", "21B", {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32}),
    "gpt-oss-120b": _carded("openai/gpt-oss-120b", "117B",
                            {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128}),
    "llama-3.3-70b": _entry("meta-llama/Llama-3.3-70B-Instruct", 70_553_706_496,
                            _decoder(_LLAMA3, 8192, 28672, 80, 64, 8, tie_word_embeddings=False)),
    "smollm3-3b": _carded("HuggingFaceTB/SmolLM3-3B", "3B", _decoder(_SMOLLM3, 2048, 11008, 36, 16, 4)),
    "phi-4": _carded("microsoft/phi-4", "14.7B",
                     _decoder({**_PHI3, "vocab_size": 100352, "max_position_embeddings": 16384, "pad_token_id": 100349},
                              5120, 17920, 40, 40, 10)),
    "mistral-small-24b": _carded("mistralai/Mistral-Small-24B-Base-2501", "24B",
                                 _decoder(_MISTRAL, 5120, 32768, 40, 32, 8, head_dim=128, vocab_size=131072),
                                 "mistral-small-24b-2501", "mistral-small-24b-instruct-2501"),
}


def normalise(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b': no organisation, lower case, no variant suffix."""
    short = name.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    short = short.replace("-instruct", "")  # Mistral puts it before the version: Mistral-7B-Instruct-v0.3
    stripped = True
    while stripped:
        stripped = False
        for suffix in VARIANT_SUFFIXES:
            if short.endswith(suffix):
                short, stripped = short[: -len(suffix)], True
    return short


def _index() -> dict[str, str]:
    index = {}
    for key, entry in ARCHITECTURES.items():
        for name in (key, entry["hub_id"], *entry["aliases"]):
            index[normalise(name)] = key
    return index


def find_architecture(name: str) -> str | None:
    """The registry key for a hub id or short name, or None."""
    return _index().get(normalise(name))
