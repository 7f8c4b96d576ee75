"""The LM head and loss of a training step through Liger's fused linear cross-entropy (`speed.fused_loss`).

Why: TRL 1.16's SFTTrainer scores tokens with its own fused LM head (trl.kernels.chunked_logprob): the backward
recomputes the logits, so the LM head's weight goes through three matmuls, and the step reads values back from the
GPU several times (which positions have a label, the entropy and accuracy metrics, the token count), each a sync
that leaves the GPU idle while Python catches up. Liger's fused linear cross-entropy computes the loss and its
gradient in the forward pass, two matmuls over row chunks of the full vocabulary, with two syncs. TRL refuses
Liger's version (it replaces the model's forward, which TRL patches itself), so this calls Liger's function from
the trainer's compute_loss. On an H100 (Llama-3.1-8B shape, QLoRA, 4,096 tokens a step; GPU traces
`benchmarks/results/2026-11-23-h100-trace-qlora-{trl,fused}-loss.json.gz`, read with benchmarks/trace_timeline.py)
the LM head's matmuls went from 17.0 to 11.3 ms a step and the GPU's idle time between forward and backward from
about 6 to 2 ms; the step ran 2.2% and 3.5% faster in two runs (`--modes qlora,qlora_trlloss`).

How: compute_loss runs the decoder (the PEFT-wrapped backbone, under the accelerator's autocast), shifts the labels
as TRL's fused head does, and divides Liger's summed loss by the token count TRL divides by. Token accuracy (Liger
computes it in the same kernel) and the token count stay on the GPU until a step logs. Entropy is not logged.
Used on one GPU (DDP and FSDP wrap the model's forward, which this bypasses), for the plain NLL loss of an LM head
without bias, scaling or soft-capping; anything else goes through TRL's own compute_loss. tests/test_train.py
checks that it trains TRL's adapter.
"""

import types

import torch

# Liger bounds the logits it materializes at once to chunk_mem_const x (tokens x hidden size): 8 keeps a chunk of
# 1,024 rows for the Llama-3 vocabulary (256 MB in bf16), matmuls cuBLAS runs at full speed.
CHUNK_MEM_CONST = 8
# Configs that scale or cap the logits before the loss (TRL's fused head reads the same ones).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def liger_loss_function():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyFunction


def fused_loss_supported(trainer) -> bool:
    """Whether this run's loss is TRL's plain NLL over an LM head Liger's function computes exactly."""
    args = trainer.args
    if not torch.cuda.is_available() or liger_loss_function() is None or args.world_size > 1:
        return False
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or getattr(trainer, "aux_loss_enabled", False):
        return False
    if args.loss_type != "nll" or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return False
    causal_lm = causal_lm_of(trainer.model)
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config.get_text_config()
    return (isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
            and not any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS))


def causal_lm_of(model):
    """The transformers model inside PEFT's wrapper (the model itself without adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_fused_loss(trainer) -> None:
    """Route the trainer's training loss through Liger's function (see fused_loss_supported first)."""
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
    labels = inputs.get("shift_labels")
    with self.accelerator.autocast():
        hidden = causal_lm.base_model(**model_inputs, use_cache=False).last_hidden_state
        if labels is None:  # position t predicts label t + 1
            hidden, labels = hidden[:, :-1], inputs["labels"][:, 1:]
        loss_sum, _, accuracy, _ = liger_loss_function().apply(
            hidden.reshape(-1, hidden.size(-1)), causal_lm.get_output_embeddings().weight, labels.reshape(-1),
            None, None, -100, 0.0, 0.0, "sum", None, False, None, False, True, False, None, None, CHUNK_MEM_CONST)
    num_tokens = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
    metrics = self._metrics["train"]
    metrics["mean_token_accuracy"].append(torch.nan_to_num(accuracy.detach()))  # 0, as TRL's, without labels
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
