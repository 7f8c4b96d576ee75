"""The LM head and loss of a training step through Liger's cross-entropy kernel, chunked (`speed.fused_loss`).

Why: TRL 1.16's SFTTrainer scores tokens with its own fused LM head (trl.kernels.chunked_logprob): the backward
recomputes the logits, so the LM head's weight goes through three matmuls, and the step reads values back from the
GPU several times (which positions have a label, the entropy and accuracy metrics, the token count), each a sync
that leaves the GPU idle while Python catches up. Liger's fused linear cross-entropy computes the loss and its
gradient in the forward pass, two matmuls over row chunks of the full vocabulary. On an H100 (Llama-3.1-8B shape,
QLoRA, 4,096 tokens a step; GPU traces of `BENCH_TRACE_DIR=... python benchmarks/speed.py --modes
qlora,qlora_trlloss`, read with benchmarks/trace_timeline.py) the LM head's matmuls went from 17.0 to 11.3 ms a step and the step ran
2.2% and 3.5% faster in two runs (`--modes qlora,qlora_trlloss`). TRL refuses Liger's model patch (it replaces the
model's forward, which TRL patches itself), so this runs from the trainer's compute_loss.

Liger's function itself still syncs twice a step: its forward reads the label count back (`.item()`, for a mean
this loss does not take) and its backward compares the incoming gradient with 1.0 (`torch.equal`). In a GPU trace
of the QLoRA step (same command) the GPU idled 0.6 ms before the loss and 2.4 ms between the loss and the first
layer's backward while the host caught up. So `LinearCrossEntropy` below runs Liger's chunk
loop for this one case (summed loss, frozen LM head without bias, no label smoothing or soft-capping) with its
cross-entropy kernel and no read-back.

How: compute_loss runs the decoder (the PEFT-wrapped backbone, under the accelerator's autocast), shifts the labels
as TRL's fused head does, and divides the summed loss by the token count TRL divides by. On an MoE model it adds
the router's load-balancing loss as TRL does (router_loss below). Token accuracy (the same kernel computes it), the
token count and the load-balancing loss stay on the GPU until a step logs. Entropy is not logged.
Used on one GPU (DDP and FSDP wrap the model's forward, which this bypasses), for the plain NLL loss of an LM head
without bias, scaling or soft-capping; anything else goes through TRL's own compute_loss. tests/test_train.py
checks that it trains TRL's adapter, tests/speed/test_fused_loss.py the loss and gradient against torch's and
TRL's, and the load-balancing loss against the model's own.
"""

import functools
import inspect
import sys
import types

import torch

from lora_cli.memory.lora_train import loss_chunk_rows

# Configs that scale or cap the logits before the loss (TRL's fused head reads the same ones).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


# The arguments LinearCrossEntropy gives Liger's kernel (liger_kernel.ops.cross_entropy, 0.8): a release that
# renames them leaves the loss to TRL's path instead of failing mid-run.
KERNEL_ARGUMENTS = {
    "X_stride": None, "Y_stride": None, "weight_ptr": None, "z_loss_ptr": None, "loss_stride": 1,
    "token_accuracy_stride": 1, "predicted_tokens_ptr": None, "predicted_tokens_stride": 0,
    "n_non_ignore": 1, "sum_non_ignore_weight": 1.0, "weight_sum": 0.0,  # read for a mean or class weights only
    "ignore_index": -100, "lse_square_scale": 0.0, "label_smoothing": 0.0, "reduction": "sum", "softcap": None,
    "RETURN_Z_LOSS": False, "RETURN_TOKEN_ACCURACY": True, "RETURN_PREDICTED_TOKENS": False, "HAS_WEIGHT": False,
    "HAS_SOFTCAPPING": False, "HAS_GRADIENTS": True}


@functools.cache
def liger_cross_entropy_kernel():
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel as kernel
    except ImportError:
        return None
    names = set(getattr(kernel, "arg_names", ()))
    return kernel if set(KERNEL_ARGUMENTS) | {"X_ptr", "Y_ptr", "loss_ptr", "n_cols", "BLOCK_SIZE"} <= names else None


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against labels (-100: no label) and the count of labels predicted
    right. The gradient at hidden is computed in the forward pass, chunk by chunk, as Liger's function does: the
    kernel writes the gradient at each chunk's logits over them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        import triton
        from liger_kernel.ops.fused_linear_cross_entropy import MAX_FUSED_SIZE  # the widest block Liger gives it

        rows, width = hidden.shape
        vocab = weight.shape[0]
        weight = weight.to(hidden.dtype)
        chunk = loss_chunk_rows(vocab, width, rows)  # Liger's chunk, bounded at long sequences (memory/lora_train.py)
        logits = hidden.new_empty(chunk, vocab)
        losses = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        right = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        kernel = liger_cross_entropy_kernel()
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            part = logits[: end - start]
            torch.mm(hidden[start:end], weight.t(), out=part)
            kernel[(end - start,)](
                X_ptr=part, Y_ptr=labels[start:end], loss_ptr=losses[start:end], token_accuracy_ptr=right[start:end],
                n_cols=vocab, BLOCK_SIZE=min(MAX_FUSED_SIZE, triton.next_power_of_2(vocab)), num_warps=32,
                **{**KERNEL_ARGUMENTS, "X_stride": part.stride(0), "Y_stride": labels.stride(0)})
            torch.mm(part, weight, out=grad_hidden[start:end])
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(right)
        return losses.sum(), right.sum()

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), None, None


# TRL 1.16 adds an MoE router's load-balancing loss by default (router_aux_loss_coef from the model's config).
ROUTER_LOSS = ("MoE: TRL adds the router's load-balancing loss, which this model's module does not compute as TRL "
               "does; training.router_aux_loss_coef: 0 drops that loss")


def router_loss(causal_lm, backbone_outputs, attention_mask):
    """The router's load-balancing loss from the backbone's router logits (asked for with output_router_logits;
    offloaded checkpointing passes on their gradient: router_logits.py), as the model's CausalLM forward computes
    it: its module's load_balancing_loss_func with its num_experts and num_experts_per_tok. Without an attention mask
    (TRL's padding-free rows) every token counts; there transformers 5.17's copy counts the experts with bincount, a
    read-back per MoE layer (later releases use histc), as in TRL's."""
    load_balancing_loss = sys.modules[type(causal_lm).__module__].load_balancing_loss_func
    return load_balancing_loss(backbone_outputs.router_logits, causal_lm.num_experts, causal_lm.num_experts_per_tok,
                               attention_mask)


def router_loss_is_trls(causal_lm) -> bool:
    """Whether router_loss computes the loss TRL 1.16 adds. Its fused LM head (trl.trainer.utils.add_fused_lm_head)
    calls Mixtral's copy of load_balancing_loss_func for every family, with the text config's num_experts and
    num_experts_per_tok; transformers copies the function into each MoE family's module (the same source)."""
    from transformers.models.mixtral import modeling_mixtral

    function = getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)
    experts = getattr(causal_lm, "num_experts", None)
    config = causal_lm.config.get_text_config()
    return (function is not None and experts is not None
            and inspect.getsource(function) == inspect.getsource(modeling_mixtral.load_balancing_loss_func)
            and experts == getattr(config, "num_experts", None)
            and getattr(causal_lm, "num_experts_per_tok", None) == getattr(config, "num_experts_per_tok", None))


def fused_loss_unsupported(trainer) -> str | None:
    """None where this run's loss is TRL's plain NLL over an LM head Liger's function computes exactly (plus an MoE
    router's load-balancing loss, where router_loss computes TRL's); else why not, for the lever line ("" where the
    lever line need not say: no GPU, several processes, another loss)."""
    args = trainer.args
    if not torch.cuda.is_available():
        return ""
    if trainer.aux_loss_enabled and not router_loss_is_trls(causal_lm_of(trainer.model)):
        return ROUTER_LOSS
    if (liger_cross_entropy_kernel() is None or args.world_size > 1 or trainer.is_fsdp_enabled
            or trainer.is_deepspeed_enabled):
        return ""
    if args.loss_type != "nll" or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return ""
    causal_lm = causal_lm_of(trainer.model)
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config.get_text_config()
    exact = (isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
             and not any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS))
    return None if exact else ""


def causal_lm_of(model):
    """The transformers model inside PEFT's wrapper (the model itself without adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_fused_loss(trainer) -> None:
    """Route the trainer's training loss through LinearCrossEntropy (where fused_loss_unsupported says None)."""
    trainer.trl_compute_loss, trainer.trl_log = trainer.compute_loss, trainer.log
    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    trainer.log = types.MethodType(log, trainer)


def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """SFTTrainer.compute_loss for a training step: TRL's loss and metrics, computed as its fused LM head path does
    (same inputs to the backbone, same label shift, same divisor)."""
    if return_outputs or not model.training:
        return self.trl_compute_loss(model, inputs, return_outputs, num_items_in_batch)
    causal_lm = causal_lm_of(model)
    model_inputs = {name: value for name, value in inputs.items() if name not in ("labels", "shift_labels")}
    if self.aux_loss_enabled:
        model_inputs["output_router_logits"] = True
    labels = inputs.get("shift_labels")
    with self.accelerator.autocast():  # the load-balancing loss too, as TRL computes it inside the model's forward
        outputs = causal_lm.base_model(**model_inputs, use_cache=False)
        aux_loss = router_loss(causal_lm, outputs, inputs.get("attention_mask")) if self.aux_loss_enabled else None
    hidden = outputs.last_hidden_state
    if labels is None:  # position t predicts label t + 1
        hidden, labels = hidden[:, :-1], inputs["labels"][:, 1:]
    labels = labels.reshape(-1)
    loss_sum, right = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)),
                                               causal_lm.get_output_embeddings().weight, labels)
    labelled = (labels != -100).sum()
    num_tokens = labelled if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
    metrics = self._metrics["train"]
    if aux_loss is not None:
        # A mean over this micro-batch: with num_items_in_batch the Trainer leaves gradient accumulation to the loss.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.router_aux_loss_coef * aux_loss / steps
        metrics["aux_loss"].append(aux_loss.detach())
    metrics["mean_token_accuracy"].append(right / labelled.clamp(min=1))  # 0, as TRL's, without labels
    if "attention_mask" in inputs:
        self._total_train_tokens = self._total_train_tokens + inputs["attention_mask"].sum()
    else:
        self._total_train_tokens = self._total_train_tokens + inputs["position_ids"].size(1)
    metrics["num_tokens"] = [self._total_train_tokens]
    return loss


def log(self, logs, start_time=None):
    """TRL's log, once the metrics kept on the GPU are read back (a sync only on the steps that log). TRL's eval
    metrics get the running token count too."""
    for metrics in self._metrics.values():
        for values in metrics.values():
            values[:] = [value.item() if isinstance(value, torch.Tensor) else value for value in values]
    return self.trl_log(logs, start_time)
