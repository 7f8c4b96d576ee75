"""LoRA on the routed experts as grouped low-rank products: y_e = x W_e^T + s (x A_e^T) B_e^T for every expert e in
the grouped matrix products transformers' MoE layers already use, instead of PEFT's W + s B A.

Why our own: PEFT's ParamWrapper (lora.target_experts) folds the adapter into the experts' 3-D weight on every
forward (`baddbmm` into a copy of the whole expert stack: 1.2 GiB a layer for Qwen3-30B-A3B in bf16) and hands
that copy to the experts' forward. Autograd then computes the gradient of the whole stack, a matrix product as large
as the forward's own, only to reduce it to A's and B's gradients. Here the base weights stay frozen and untouched
(their product needs no weight gradient) and the adapter runs on the tokens each expert received: two grouped
products of rank r a projection. transformers' grouped_mm routing (sort by expert, offsets, gather) is kept as it
is in its `grouped_mm_experts_forward`, with its `_grouped_linear` for the base weights.

Applies to experts classes built with transformers' `use_experts_implementation` (Qwen3-MoE, Mixtral,
DeepSeek-V3, gpt-oss, GLM-4-MoE, Qwen3-Next, ...), one adapter at a time; PEFT's forward runs otherwise (adapters
disabled or merged, several adapters, expert parallelism, a rank not a multiple of 8). Off with
`speed.grouped_experts: false`; tests/speed/test_grouped_experts.py checks outputs and gradients against PEFT's.
"""

import types

import torch

FIRST_PROJECTION = {True: "gate_up_proj", False: "up_proj"}  # by has_gate


def grouped_linear_available() -> bool:
    try:
        from transformers.integrations.moe import _grouped_linear  # noqa: F401
    except ImportError:
        return False
    return True


def wrapped_experts(model) -> list:
    """The outermost PEFT ParamWrapper of each experts module whose weights it adapts: one per MoE layer."""
    from peft.tuners.lora.layer import ParamWrapper

    inner = {id(module.base_layer) for module in model.modules() if isinstance(module, ParamWrapper)}
    return [module for module in model.modules() if isinstance(module, ParamWrapper) and id(module) not in inner
            and hasattr(module.get_base_layer(), "has_gate")]


def adapted_parameters(outer) -> dict:
    """parameter name -> the ParamWrapper adapting it, down the chain of nested wrappers."""
    from peft.tuners.lora.layer import ParamWrapper

    found, wrapper = {}, outer
    while isinstance(wrapper, ParamWrapper):
        found[wrapper.parameter_name] = wrapper
        wrapper = wrapper.base_layer
    return found


def active_adapter(wrappers: dict) -> str | None:
    """The one adapter all wrappers train now, or None where PEFT's own forward must run."""
    adapters = {tuple(w.active_adapters) for w in wrappers.values()}
    if len(adapters) != 1:
        return None
    (names,) = adapters
    if len(names) != 1 or any(w.disable_adapters or w.merged or names[0] not in w.lora_A for w in wrappers.values()):
        return None
    return names[0]


def low_rank(x, wrapper, adapter: str, offsets):
    """s (x A_e^T) B_e^T for the rows of each expert e, as two grouped products (PEFT's layout of A and B: A's rows
    are expert-major, B's columns rank-major)."""
    from transformers.integrations.moe import _grouped_linear

    experts = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight.to(x.dtype)  # (experts * r, in)
    b = wrapper.lora_B[adapter].weight.to(x.dtype)  # (out, r * experts)
    a = a.view(experts, -1, a.shape[-1])  # (experts, r, in)
    b = b.view(b.shape[0], -1, experts).permute(2, 0, 1).contiguous()  # (experts, out, r)
    return _grouped_linear(_grouped_linear(x, a, offsets), b, offsets) * wrapper.scaling[adapter]


def rows_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many rows each expert receives. histc, as transformers' grouped_mm path counts them: bincount on a GPU
    reads the largest id back to the host to size its output: the host waited for the GPU in every call of an MoE
    layer's experts (forward and rerun). histc takes floats on the CPU and integers on a GPU."""
    ids = expert_ids.int() if expert_ids.is_cuda else expert_ids.float()
    return torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)


def grouped_lora_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """Replaces the outermost ParamWrapper's forward while training: transformers' grouped_mm experts forward with
    the adapters added after each base product."""
    from transformers.integrations.moe import _grouped_linear

    experts = self.get_base_layer()
    adapter = active_adapter(self.grouped_wrappers)
    # transformers before 5.2x has neither expert parallelism nor post-expert norms on its experts classes
    if (args or kwargs or adapter is None or getattr(experts, "_is_expert_parallel", False)
            or getattr(experts, "has_post_expert_norm", False)):
        return self.peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    num_top_k, num_tokens, hidden = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[order // num_top_k]
    weights = top_k_weights.reshape(-1)[order]
    offsets = torch.cumsum(rows_per_expert(expert_ids, experts.num_experts), dim=0, dtype=torch.int32)

    def project(x, name: str):
        bias = getattr(experts, f"{name}_bias")[expert_ids] if experts.has_bias else None
        out = _grouped_linear(x, getattr(experts, name), offsets, bias=bias, is_transposed=experts.is_transposed)
        wrapper = self.grouped_wrappers.get(name)
        return out if wrapper is None else out + low_rank(x.to(out.dtype), wrapper, adapter, offsets)

    first = project(rows, FIRST_PROJECTION[experts.has_gate])
    inner = experts._apply_gate(first) if experts.has_gate else experts.act_fn(first)
    out = project(inner, "down_proj") * weights.unsqueeze(-1)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel(), device=order.device)
    return out[restore].view(num_tokens, num_top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def aligned(wrappers: dict) -> bool:
    """Every rank a multiple of 8: CUDA's grouped product wants each row of a bf16 operand on a 16-byte boundary."""
    return all(r % 8 == 0 for wrapper in wrappers.values() for r in wrapper.r.values())


def group_expert_adapters(model) -> int:
    """Route the adapted experts of the model through grouped_lora_forward; returns how many MoE layers."""
    count = 0
    for outer in wrapped_experts(model):
        wrappers = adapted_parameters(outer)
        if hasattr(outer, "peft_forward") or not aligned(wrappers):
            continue
        outer.grouped_wrappers = wrappers  # a plain dict: the wrappers stay where they are registered
        outer.peft_forward = outer.forward
        outer.forward = types.MethodType(grouped_lora_forward, outer)
        count += 1
    return count
