"""Tiny random models of every architecture family in the model matrix (tests/test_model_matrix.py), from configs
built here: hidden 64, 2 layers, 4 experts where there are experts, the tokenizer fixture's vocabulary.

A family whose model_type the installed transformers lacks is skipped by the tests (the GPU image may be older).
"""

from dataclasses import dataclass, field

# Sizes shared by every family; each family adds or overrides what its config calls them.
DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024}
EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
VOCAB = "the tokenizer's vocabulary size"  # a placeholder tiny_config fills in
GATED_DELTA = {"linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
               "linear_num_value_heads": 4, "layer_types": ["linear_attention", "full_attention"]}
GEMMA4 = {**DENSE, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "sliding_window": 64,
          "layer_types": ["sliding_attention", "full_attention"]}
LLAMA4 = {**DENSE, "intermediate_size_mlp": 128, "num_local_experts": 4, "num_experts_per_tok": 1,
          "attention_chunk_size": 64}


@dataclass
class Family:
    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    moe: bool = False
    multimodal: bool = False  # an image-text config: its language model trains on text


FAMILIES = [
    Family("llama", "llama", DENSE),
    Family("mistral", "mistral", DENSE),
    Family("mixtral", "mixtral", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
    Family("qwen2", "qwen2", DENSE),
    Family("qwen3", "qwen3", DENSE),
    Family("qwen3_moe", "qwen3_moe", {**DENSE, **EXPERTS, "num_experts": 4}, moe=True),
    Family("qwen3_next", "qwen3_next", {**DENSE, **EXPERTS, "num_experts": 4, "shared_expert_intermediate_size": 32,
                                        "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                        "layer_types": ["linear_attention", "full_attention"]}, moe=True),
    Family("gemma2", "gemma2", DENSE),
    Family("gemma3_text", "gemma3_text", {**DENSE, "sliding_window": 64}),
    Family("phi3", "phi3", DENSE),
    Family("gpt_oss", "gpt_oss", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
    Family("llama4_text", "llama4_text", LLAMA4, moe=True),
    Family("deepseek_v3", "deepseek_v3", {**DENSE, **EXPERTS, "n_routed_experts": 4, "n_shared_experts": 1,
                                          "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                                          "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                                          "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8}, moe=True),
    Family("olmo2", "olmo2", DENSE),
    Family("olmo3", "olmo3", {**DENSE, "sliding_window": 64}),
    Family("smollm3", "smollm3", DENSE),
    Family("granite", "granite", DENSE),
    Family("granitemoehybrid", "granitemoehybrid", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                    "shared_intermediate_size": 32, "mamba_n_heads": 4,
                                                    "mamba_d_head": 32, "mamba_d_state": 16, "mamba_chunk_size": 16,
                                                    "layer_types": ["mamba", "attention"]}, moe=True),
    Family("glm4", "glm4", DENSE),
    Family("glm4_moe", "glm4_moe", {**DENSE, **EXPERTS, "n_routed_experts": 4, "n_shared_experts": 1,
                                    "first_k_dense_replace": 1}, moe=True),
    Family("lfm2", "lfm2", {**DENSE, "layer_types": ["conv", "full_attention"]}),
    Family("falcon_h1", "falcon_h1", {**DENSE, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                                      "mamba_d_state": 16, "mamba_chunk_size": 16}),
    Family("qwen3_5_text", "qwen3_5_text", {**DENSE, **GATED_DELTA}),
    Family("qwen3_5_moe_text", "qwen3_5_moe_text", {**DENSE, **EXPERTS, **GATED_DELTA, "num_experts": 4,
                                                    "shared_expert_intermediate_size": 32}, moe=True),
    Family("gemma4_text", "gemma4_text", GEMMA4),
    Family("gemma4_moe_text", "gemma4_text", {**GEMMA4, "enable_moe_block": True, "num_experts": 4,
                                              "top_k_experts": 2, "moe_intermediate_size": 32}, moe=True),
    # Image-text checkpoints: a one-layer vision tower beside the language model
    Family("gemma3", "gemma3", {"text_config": {**DENSE, "sliding_window": 64}, "mm_tokens_per_image": 4,
                                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "image_size": 28, "patch_size": 14}},
           multimodal=True),
    Family("gemma4", "gemma4", {"text_config": GEMMA4,
                                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "num_key_value_heads": 2,
                                                  "head_dim": 16}}, multimodal=True),
    Family("qwen3_5", "qwen3_5", {"text_config": {**DENSE, **GATED_DELTA},
                                  "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64,
                                                    "num_heads": 2, "out_hidden_size": 64}}, multimodal=True),
    Family("llama4", "llama4", {"text_config": LLAMA4,
                                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "vision_output_dim": 64,
                                                  "projector_input_dim": 64, "projector_output_dim": 64,
                                                  "image_size": 28, "patch_size": 14}}, moe=True, multimodal=True),
]
FAMILY = {family.name: family for family in FAMILIES}


def tiny_config(family: Family, tokenizer):
    from transformers import AutoConfig

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}

    def filled(config: dict) -> dict:
        return {key: len(tokenizer) if value == VOCAB else value for key, value in config.items()}

    if family.multimodal:
        config = dict(family.config)
        config["text_config"] = {**filled(config["text_config"]), **ids}
        return AutoConfig.for_model(family.model_type, **config, **ids)
    return AutoConfig.for_model(family.model_type, **filled(family.config), **ids)
