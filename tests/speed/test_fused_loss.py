"""The LM head and loss through Liger's kernel (lora_cli/speed/fused_loss.py) against torch's and TRL's (GPU only),
and the MoE router's load-balancing loss against the model's own (on the CPU too)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lever_models import assert_close
from lora_cli.experts import is_router
from lora_cli.speed.fused_loss import router_loss, router_loss_is_trls
from tiny_models import FAMILY, tiny_config

VOCAB = 96
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's cross-entropy kernel runs on a GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_torch(dtype):
    """The fused loss's LM head and loss, over several chunks and with unlabelled rows: the summed loss, the count
    of labels predicted right and the gradient at the hidden states are torch's."""
    from lora_cli.speed.fused_loss import LinearCrossEntropy, liger_cross_entropy_kernel

    if liger_cross_entropy_kernel() is None:
        pytest.skip("needs liger-kernel")
    torch.manual_seed(0)
    rows, width, vocab = 300, 64, 5000  # ten chunks of 32 rows (CHUNK_MEM_CONST x 64 x 64 logits at most)
    hidden = torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, device="cuda", dtype=dtype) / width**0.5
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    loss, right = LinearCrossEntropy.apply(hidden, weight, labels)
    (loss / 10).backward()
    reference = hidden.detach().float().requires_grad_(True)
    logits = reference @ weight.float().t()
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    (expected / 10).backward()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    labelled = labels != -100
    assert right.item() == (logits.argmax(-1) == labels)[labelled].sum().item()
    assert torch.allclose(hidden.grad.float(), reference.grad, atol=tolerance * reference.grad.abs().max().item())


def tiny_moe(name):
    family = FAMILY[name]
    config = AutoConfig.for_model(family.model_type, **family.config, vocab_size=VOCAB, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def moe_inputs(layout):
    """Two rows, the second padded (attention mask), the same without a mask, or packed into one row as TRL's
    padding-free collator packs them (position ids restarting per sequence, no mask)."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    if layout == "padded":
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if layout == "rows":
        return {"input_ids": ids}
    return {"input_ids": ids.reshape(1, -1), "position_ids": torch.arange(12).repeat(2)[None]}


def aux_loss_and_grads(loss_of, model):
    model.zero_grad()
    loss = loss_of()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "rows", "packed"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_router_loss_is_the_models_own(name, layout):
    """router_loss from the backbone's outputs (the fused loss runs only the backbone) is the aux_loss of the model's
    own forward, and so are its gradients, at the routers and every layer below them."""
    model = tiny_moe(name)
    inputs = moe_inputs(layout)
    assert router_loss_is_trls(model)
    expected, expected_grads = aux_loss_and_grads(
        lambda: model(**inputs, output_router_logits=True, use_cache=False).aux_loss, model)
    loss, grads = aux_loss_and_grads(lambda: router_loss(
        model, model.base_model(**inputs, output_router_logits=True, use_cache=False), inputs.get("attention_mask")),
        model)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys() and any(is_router(param_name) for param_name in grads)
    for param_name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[param_name], rtol=0, atol=0, msg=param_name)


def test_router_loss_is_not_trls_where_the_forward_has_none():
    """Llama 4's forward computes no load-balancing loss, while TRL adds one (library_fixes.py): TRL's path keeps it."""
    assert not router_loss_is_trls(tiny_moe("llama4_text"))


def moe_trainer(tmp_path, tokenizer_dir, packing: bool, dtype):
    """TRL's SFTTrainer on a tiny random Qwen3-MoE with LoRA on every linear layer (in bf16 under bf16 autocast, as
    lora train sets it up on a GPU, or in fp32), its load-balancing loss weighted 1 (the config's 0.001 would leave
    its gradient below bf16's noise)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(FAMILY["qwen3_moe"], tokenizer), dtype=dtype)
    rows = Dataset.from_list([{"input_ids": list(range(10 + i, 10 + i + 10 + (i * 23) % 40))} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), bf16=dtype == torch.bfloat16, per_device_train_batch_size=4,
                     max_length=64, packing=packing, router_aux_loss_coef=1.0, report_to=[])
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # a fresh adapter has B = 0, which would hide errors in A's gradient
            torch.nn.init.normal_(param, std=0.05)
    return trainer


def step_loss_and_grads(trainer, model, inputs, num_items_in_batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)  # TRL's adds keys
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}


@needs_gpu
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_adds_trls_router_loss(tmp_path, tiny_llama, dtype, packing):
    """On an MoE model the fused loss is on, and a training step's loss, LoRA gradients and logged aux_loss are those
    of TRL's compute_loss with the router's load-balancing loss: padded rows (the loss reads the attention mask) and
    packed ones (no mask), the load-balancing loss divided over two accumulated micro-batches as TRL divides it."""
    from lora_cli.speed.fused_loss import fused_loss_unsupported, liger_cross_entropy_kernel, use_fused_loss

    if liger_cross_entropy_kernel() is None:
        pytest.skip("needs liger-kernel")
    trainer = moe_trainer(tmp_path, tiny_llama, packing, dtype)
    assert trainer.aux_loss_enabled and fused_loss_unsupported(trainer) is None
    model = trainer.accelerator.prepare_model(trainer.model)  # its forward under the autocast of training
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert ("attention_mask" in inputs) != packing
    trainer.current_gradient_accumulation_steps = 2  # the training loop's, with two micro-batches a step
    num_items_in_batch = 2 * (inputs["labels"][:, 1:] != -100).sum()
    metrics = trainer._metrics["train"]
    expected_loss, expected_grads = step_loss_and_grads(trainer, model, inputs, num_items_in_batch)
    expected_aux = metrics["aux_loss"].pop()
    use_fused_loss(trainer)
    loss, grads = step_loss_and_grads(trainer, model, inputs, num_items_in_batch)
    aux = metrics["aux_loss"].pop()
    assert isinstance(aux, torch.Tensor) and aux.item() == pytest.approx(expected_aux, rel=1e-5)  # read back at log
    # bf16: two kernels' roundings (on the CPU, through Triton's interpreter, 1.3% of a tensor's largest gradient)
    loss_tolerance, grad_tolerance = (1e-4, 1e-3) if dtype == torch.float32 else (2e-3, 3e-2)
    assert loss == pytest.approx(expected_loss, rel=loss_tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], grad_tolerance, name)
