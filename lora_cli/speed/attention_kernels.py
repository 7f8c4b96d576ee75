"""Other attention kernels for unpacked rows on Hopper GPUs: cuDNN's SDPA or FlexAttention (`speed.attention_kernel`).

Why: at 32,768 tokens and more, attention is about half of a QLoRA step of the Llama-3.1-8B shape. cuDNN's fused
attention (torch's SDPBackend.CUDNN_ATTENTION) uses Hopper's tensor-memory instructions, where SDPA's FlashAttention-2
kernel predates them; FlexAttention is torch's compiled attention. Measured at 65,536 tokens on an H100
(docs/long-sequences.md, row 2026-12-07-h100-4f914a4-2): cudnn ran at the speed of `sdpa`, whose kernel there
already is cuDNN's (torch 2.11 picks it); flex at 0.68x of it (8 layers, row 2026-12-07-h100-11c9166-2, where its
attention tensors did not reach host memory: 6.8 GiB of host memory against 20.8). The setting stays `sdpa`.
FlashAttention-3 is not installable from PyPI (its wheels are built from source or fetched from the Hugging Face
Hub), so it is not here.

- cudnn: transformers' SDPA attention inside `sdpa_kernel`, cuDNN first, then the other backends in torch's
  order (a call cuDNN does not take falls back instead of failing). The backward is the forward's kernel's.
- flex: transformers' own FlexAttention path (`flex_attention`, compiled by transformers; its mask is a block mask,
  no L x L tensor).
Packed rows keep the varlen path (varlen.py), which reads the sequence bounds.
"""

import functools
import inspect

import torch

CUDNN_ATTENTION = "lora_cudnn"


@functools.cache
def cudnn_first():
    """sdpa_kernel's arguments: cuDNN, then flash, memory-efficient and math attention, in that priority."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    priority = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}
    return backends, priority


def cudnn_attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function: its SDPA attention with cuDNN's kernel first."""
    from torch.nn.attention import sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    backends, priority = cudnn_first()
    with sdpa_kernel(backends, **priority):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_attention_kernel(model, kernel: str) -> bool:
    """Route the model's SDPA attention to kernel ("cudnn" or "flex"); False where its attention is not SDPA (a
    recipe's attn_implementation, or the varlen path for packed rows) or there is no GPU."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    configs = [module.config for module in model.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation")]
    if kernel == "sdpa" or not torch.cuda.is_available() or not configs or any(
            config._attn_implementation != "sdpa" for config in configs):
        return False
    name = "flex_attention"
    if kernel == "cudnn":
        AttentionInterface.register(CUDNN_ATTENTION, cudnn_attention)
        AttentionMaskInterface.register(CUDNN_ATTENTION, sdpa_mask)
        name = CUDNN_ATTENTION
    for config in configs:
        config._attn_implementation = name
    return True
