"""The built-in registry of popular architectures, so `lora inspect-params` works offline.

Each entry is the part of the model's config.json that fixes its shapes (sizes, layer and head counts,
vocabulary, tied embeddings, model_type, experts; for an image-text checkpoint its text_config and vision_config,
so that the whole checkpoint is built), copied from the published config; `params` is the published parameter
count, which the tests check against the model that transformers builds from the entry: exactly where the
publisher gives it to the parameter (safetensors metadata, which also counts the multi-token-prediction layer of
Qwen3.5 that transformers does not load), else `published` as its model card rounds it ("8.2B"), and the built
model must round to it (the language model's count alone where the card gives that, as Gemma 4's larger cards do).
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
_OLMO3 = {"model_type": "olmo3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": 100278,
          "max_position_embeddings": 65536, "sliding_window": 4096, "tie_word_embeddings": False}

_GEMMA3_TEXT = {"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
                "query_pre_attn_scalar": 256, "vocab_size": 262208, "max_position_embeddings": 131072,
                "sliding_window": 1024}
_GEMMA3_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_attention_heads": 16, "num_hidden_layers": 27, "image_size": 896, "patch_size": 14,
                  "vision_use_head": False}

# Gemma 4: heads of 256 in the sliding-window layers, of 512 (global_head_dim) in the full-attention ones
_GEMMA4_TEXT = {"model_type": "gemma4_text", "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 262144,
                "head_dim": 256, "global_head_dim": 512, "final_logit_softcapping": 30.0, "tie_word_embeddings": True}
_GEMMA4_SMALL = {**_GEMMA4_TEXT, "max_position_embeddings": 131072, "sliding_window": 512,
                 "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144}
_GEMMA4_LARGE = {**_GEMMA4_TEXT, "max_position_embeddings": 262144, "sliding_window": 1024, "attention_k_eq_v": True,
                 "hidden_size_per_layer_input": 0}
_GEMMA4_LARGE_VISION = {"model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304,
                        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
                        "global_head_dim": 72, "standardize": True}

_QWEN3_5_TEXT = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": 248320, "max_position_embeddings": 262144,
                 "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                 "linear_num_key_heads": 16, "mtp_num_hidden_layers": 1}
_QWEN3_5_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304}
_QWEN3_5_SMALL_VISION = {**_QWEN3_5_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096}
_QWEN3_5_TINY_VISION = {**_QWEN3_5_VISION, "depth": 12, "hidden_size": 768, "intermediate_size": 3072, "num_heads": 12}

_LLAMA4_TEXT = {"model_type": "llama4_text", "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": 202048,
                "head_dim": 128, "use_qk_norm": True, "max_position_embeddings": 262144, "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 1, "tie_word_embeddings": False}
_LLAMA4_VISION = {"model_type": "llama4_vision_model", "hidden_size": 1408, "intermediate_size": 5632,
                  "num_attention_heads": 16, "num_hidden_layers": 34, "image_size": 336, "patch_size": 14,
                  "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
                  "vision_output_dim": 4096, "multi_modal_projector_bias": False}


def _layer_types(layers: int, full_every: int) -> list[str]:
    """Sliding-window layers with full attention every `full_every` layers, as Gemma 4's config.json lists them."""
    return ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(layers)]


def _image_text(model_type: str, text: dict, vision: dict, **extra) -> dict:
    """An image-text checkpoint; its tied embeddings are set on the outer config too, where transformers reads them."""
    return {"model_type": model_type, "text_config": text, "vision_config": vision,
            "tie_word_embeddings": text["tie_word_embeddings"], **extra}


def _gemma3(hidden, intermediate, layers, heads, kv_heads, **extra):
    text = _decoder(_GEMMA3_TEXT, hidden, intermediate, layers, heads, kv_heads, tie_word_embeddings=True, **extra)
    return _image_text("gemma3", text, _GEMMA3_SIGLIP, mm_tokens_per_image=256)


def _gemma4_small(hidden, intermediate, layers, heads, kv_heads, shared_kv_layers, full_every, double_wide_mlp):
    """Gemma 4 E2B and E4B: per-layer embeddings, the last layers reuse earlier layers' keys and values, audio."""
    text = _decoder(_GEMMA4_SMALL, hidden, intermediate, layers, heads, kv_heads, num_kv_shared_layers=shared_kv_layers,
                    use_double_wide_mlp=double_wide_mlp, layer_types=_layer_types(layers, full_every))
    vision = {"model_type": "gemma4_vision", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
              "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64}
    audio = {"model_type": "gemma4_audio", "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8,
             "output_proj_dims": 1536}
    return _image_text("gemma4", text, vision, audio_config=audio)


def _gemma4_large(hidden, intermediate, layers, heads, kv_heads, global_kv_heads, **moe):
    """Gemma 4 26B-A4B and 31B: keys double as values in the full-attention layers, a larger vision tower, no audio."""
    text = _decoder(_GEMMA4_LARGE, hidden, intermediate, layers, heads, kv_heads,
                    num_global_key_value_heads=global_kv_heads, layer_types=_layer_types(layers, 6), **moe)
    return _image_text("gemma4", text, _GEMMA4_LARGE_VISION, audio_config=None)


def _qwen3_5(hidden, intermediate, layers, heads, kv_heads, value_heads, vision, tied):
    text = _decoder({**_QWEN3_5_TEXT, "model_type": "qwen3_5_text"}, hidden, intermediate, layers, heads, kv_heads,
                    linear_num_value_heads=value_heads, tie_word_embeddings=tied)
    return _image_text("qwen3_5", text, {**vision, "model_type": "qwen3_5_vision", "out_hidden_size": hidden})


def _qwen3_5_moe(hidden, expert_size, layers, heads, kv_heads, value_heads, experts, experts_per_token):
    text = {**_QWEN3_5_TEXT, "model_type": "qwen3_5_moe_text", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "linear_num_value_heads": value_heads,
            "num_experts": experts, "num_experts_per_tok": experts_per_token, "moe_intermediate_size": expert_size,
            "shared_expert_intermediate_size": expert_size, "tie_word_embeddings": False}
    vision = {**_QWEN3_5_VISION, "model_type": "qwen3_5_moe_vision", "out_hidden_size": hidden}
    return _image_text("qwen3_5_moe", text, vision)


def _entry(hub_id: str, params: int, config: dict, *aliases: str) -> dict:
    return {"hub_id": hub_id, "params": params, "config": config, "aliases": list(aliases)}


def _carded(hub_id: str, published: str, config: dict, *aliases: str, language_model_only: bool = False) -> dict:
    """An entry whose parameter count is published rounded, on its model card ("8.2B", "21B"); of the language
    model alone, without the vision and audio towers, where the card counts that."""
    return {"hub_id": hub_id, "params": None, "published": published, "config": config, "aliases": list(aliases),
            "language_model_only": language_model_only}


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
    # Gemma 3 from 4B, Gemma 4, Qwen3.5 and Llama 4 are image-text checkpoints, built whole: vision towers counted
    "gemma-3-1b": _entry("google/gemma-3-1b-pt", 999_885_952,
                         _decoder(_GEMMA3_TEXT, 1152, 6912, 26, 4, 1, vocab_size=262144, max_position_embeddings=32768,
                                  sliding_window=512, tie_word_embeddings=True)),
    "gemma-3-4b": _entry("google/gemma-3-4b-pt", 4_300_079_472, _gemma3(2560, 10240, 34, 8, 4)),
    "gemma-3-12b": _entry("google/gemma-3-12b-pt", 12_187_325_040, _gemma3(3840, 15360, 48, 16, 8)),
    "gemma-3-27b": _entry("google/gemma-3-27b-pt", 27_432_406_640,
                          _gemma3(5376, 21504, 62, 32, 16, head_dim=128, query_pre_attn_scalar=168)),
    "gemma-4-e2b": _carded("google/gemma-4-E2B", "5.1B",
                           _gemma4_small(1536, 6144, 35, 8, 1, shared_kv_layers=20, full_every=5,
                                         double_wide_mlp=True)),
    "gemma-4-e4b": _carded("google/gemma-4-E4B", "8B",
                           _gemma4_small(2560, 10240, 42, 8, 2, shared_kv_layers=18, full_every=6,
                                         double_wide_mlp=False)),
    "gemma-4-26b-a4b": _carded("google/gemma-4-26B-A4B", "25.2B",
                               _gemma4_large(2816, 2112, 30, 16, 8, global_kv_heads=2, enable_moe_block=True,
                                             num_experts=128, top_k_experts=8, moe_intermediate_size=704),
                               language_model_only=True),
    "gemma-4-31b": _carded("google/gemma-4-31B", "30.7B", _gemma4_large(5376, 21504, 60, 32, 16, global_kv_heads=4),
                           language_model_only=True),
    "qwen3.5-0.8b": _entry("Qwen/Qwen3.5-0.8B", 873_438_784,
                           _qwen3_5(1024, 3584, 24, 8, 2, value_heads=16, vision=_QWEN3_5_TINY_VISION, tied=True)),
    "qwen3.5-2b": _entry("Qwen/Qwen3.5-2B", 2_274_069_824,
                         _qwen3_5(2048, 6144, 24, 8, 2, value_heads=16, vision=_QWEN3_5_SMALL_VISION, tied=True)),
    "qwen3.5-4b": _entry("Qwen/Qwen3.5-4B", 4_659_865_088,
                         _qwen3_5(2560, 9216, 32, 16, 4, value_heads=32, vision=_QWEN3_5_SMALL_VISION, tied=True)),
    "qwen3.5-9b": _entry("Qwen/Qwen3.5-9B", 9_653_104_368,
                         _qwen3_5(4096, 12288, 32, 16, 4, value_heads=32, vision=_QWEN3_5_VISION, tied=False)),
    "qwen3.5-27b": _entry("Qwen/Qwen3.5-27B", 27_781_427_952,
                          _qwen3_5(5120, 17408, 64, 24, 4, value_heads=48, vision=_QWEN3_5_VISION, tied=False)),
    "qwen3.5-35b-a3b": _entry("Qwen/Qwen3.5-35B-A3B", 35_951_822_704,
                              _qwen3_5_moe(2048, 512, 40, 16, 2, value_heads=32, experts=256, experts_per_token=8)),
    "qwen3.5-122b-a10b": _entry("Qwen/Qwen3.5-122B-A10B", 125_086_497_008,
                                _qwen3_5_moe(3072, 1024, 48, 32, 2, value_heads=64, experts=256, experts_per_token=8)),
    "qwen3.5-397b-a17b": _entry("Qwen/Qwen3.5-397B-A17B", 403_397_928_944,
                                _qwen3_5_moe(4096, 1024, 60, 32, 2, value_heads=64, experts=512, experts_per_token=10)),
    "llama-4-scout-17b-16e": _entry("meta-llama/Llama-4-Scout-17B-16E", 108_641_793_536,
                                    _image_text("llama4", _decoder(_LLAMA4_TEXT, 5120, 8192, 48, 40, 8,
                                                                   intermediate_size_mlp=16384, num_local_experts=16),
                                                _LLAMA4_VISION),
                                    "llama-4-scout"),
    "olmo-3-7b": _entry("allenai/Olmo-3-1025-7B", 7_298_011_136, _decoder(_OLMO3, 4096, 11008, 32, 32, 32),
                        "olmo-3-7b-think"),
    "olmo-3-32b": _entry("allenai/Olmo-3-1125-32B", 32_233_522_176, _decoder(_OLMO3, 5120, 27648, 64, 40, 8),
                         "olmo-3-32b-think"),
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
