"""Variable-length attention for packed rows, and packed batches of fixed shapes for CUDA graphs.

Why our own: with padding-free packing (training.packing) transformers gives SDPA a block-diagonal mask, and SDPA
then runs a masked kernel over whole rows: packed QLoRA ran at 45% of the fixed-length rate on an H100. torch's
varlen flash attention takes the sequence bounds instead and computes only the blocks inside each sequence.
transformers' own varlen path needs the flash-attn package, which is not installable everywhere; this one needs
only torch.

Off with `speed.varlen_attention: false`; tests/speed/test_varlen.py checks that a packed batch's loss is that of
its sequences run apart.
"""

import functools
import inspect

import torch

VARLEN_ATTENTION = "lora_varlen"


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """A transformers attention function: varlen flash attention for packed rows (the sequence bounds TRL's
    padding-free collator computes on the host, which reach every layer as keyword arguments), SDPA for anything
    else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or not query.is_cuda or dropout > 0 or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    out = _varlen_call(*flat, cu_seq_lens_q, max_length_q, scaling)
    return out.view(batch, length, heads, dim), None


class FixedShapePackedBatches:
    """TRL's padding-free collator, with every batch of one shape, so CUDA graphs (cuda_graphs.py) replay packed rows.

    TRL flattens a batch of packed rows into one row of however many tokens they hold, and gives the varlen
    kernel the sequence starts and the longest sequence: all change from batch to batch. Here the row is padded to
    `tokens` (batch size x max_length) with filler sequences (labels -100, none longer than `longest`), the starts
    are padded with empty sequences to a count that is a power of two (a few shapes in all), and the longest is
    always `longest`, a bound no sequence exceeds.
    """

    def __init__(self, collator, tokens: int, longest: int):
        self.collator, self.tokens, self.longest = collator, tokens, longest

    def __call__(self, examples):
        batch = self.collator(examples)
        length = batch["input_ids"].shape[1]
        if "cu_seq_lens_q" not in batch or length > self.tokens:
            return batch
        fill = self.tokens - length
        fillers = [min(self.longest, fill - at) for at in range(0, fill, self.longest)]
        starts = batch["cu_seq_lens_q"][:-1].tolist() + [length + sum(fillers[:i]) for i in range(len(fillers))]
        if fill:
            batch["input_ids"] = torch.cat([batch["input_ids"],
                                            batch["input_ids"].new_full((1, fill), self.collator.pad_token_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, fill), -100)], 1)
            batch["position_ids"] = torch.cat([batch["position_ids"], *(torch.arange(n)[None] for n in fillers)], 1)
        count = max(16, 1 << (len(starts) - 1).bit_length())
        cu = torch.tensor(starts + [self.tokens] * (count + 1 - len(starts)), dtype=torch.int32)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = self.longest
        if "seq_idx" in batch:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(count, dtype=torch.int32), cu.diff())[None]
        return batch


@functools.cache
def _varlen_options() -> frozenset:
    """The keyword options of this torch's varlen_attn (2.11 has scale and window_size, 2.13 also enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_call(query, key, value, cu, longest, scaling):
    """torch.nn.attention.varlen.varlen_attn, causal, across the torch versions that spell its options apart."""
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options()
    kwargs = {"scale": scaling} if "scale" in options else {}
    kwargs.update({"is_causal": True} if "is_causal" in options else {"window_size": (-1, 0)})
    # Grouped-query attention: the flash kernel takes fewer key/value heads as they are (torch 2.11 without a flag,
    # later releases with enable_gqa). Repeating them instead made attention 1.5x slower on an H100 (forward and
    # backward of the Llama-3.1-8B shape, 4,096 packed tokens: 1.50 ms against 1.03 ms, benchmarks/probe.py).
    if key.shape[1] != query.shape[1] and "enable_gqa" in options:
        kwargs["enable_gqa"] = True
    return varlen_attn(query, key, value, cu, cu, longest, longest, **kwargs)


def varlen_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def varlen_mask(*args, attention_mask=None, config=None, device=None, **kwargs):
    """transformers' mask for the varlen path: none for rows without padding on a GPU, SDPA's otherwise.

    Why: for packed rows (position ids that restart, no attention mask) SDPA's mask function builds a block-diagonal
    batch x 1 x L x L mask: 1 GiB at 32,768 tokens, 256 GiB at 524,288, which varlen_attention never reads (it
    takes the sequence bounds). Unpacked rows without padding need none either (SDPA's is_causal). A sliding window
    keeps SDPA's mask, which carries it."""
    from transformers.masking_utils import sdpa_mask

    if (attention_mask is None and device is not None and torch.device(device).type == "cuda"
            and getattr(config, "sliding_window", None) is None):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, config=config, device=device, **kwargs)


def use_varlen_attention(model) -> bool:
    """Route the model's SDPA attention through varlen_attention (registered once with transformers); rows with
    padding keep SDPA's mask and attention, as before (varlen_mask)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    configs = [module.config for module in model.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation")]
    if not configs or any(config._attn_implementation != "sdpa" for config in configs):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    for config in configs:
        config._attn_implementation = VARLEN_ATTENTION
    return True
