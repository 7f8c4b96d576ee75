"""Padding-free packing (training.packing: true) is not faster by being wrong: the packed batch's loss equals the
loss of the same sequences run one by one, so no token attends across a sequence boundary.

lora_varlen is lora_cli/speed/varlen.py's varlen_attention (varlen flash attention for packed rows on a GPU); on the
CPU it runs SDPA, so there the test checks that switching it on changes nothing; on a GPU it checks the varlen
kernel."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lora_cli.speed.varlen import FixedShapePackedBatches, use_varlen_attention

CASES = [("sdpa", "cpu"), ("eager", "cpu"), ("lora_varlen", "cpu")]
if torch.cuda.is_available():
    CASES += [("sdpa", "cuda"), ("lora_varlen", "cuda")]


@pytest.mark.parametrize("fixed_shape", [False, True], ids=["trl-batch", "fixed-shape"])
@pytest.mark.parametrize(("attn", "device"), CASES)
def test_packed_loss_matches_the_sequences_run_apart(tiny_llama, attn, device, fixed_shape):
    """Also with the batch padded to a fixed shape for CUDA graphs: filler sequences and empty ones change nothing."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # varlen flash attention is 16-bit only
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn.replace("lora_varlen", "sdpa"),
                                                 dtype=dtype, device_map={"": device}).eval()
    if attn == "lora_varlen":
        assert use_varlen_attention(model)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in (37, 5, 60)]
    examples = [{"input_ids": ids, "labels": ids} for ids in sequences]

    # The batch TRL's trainer builds with padding_free=True: one row, position ids restarting at each sequence, and
    # the sequence bounds for varlen kernels.
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    if fixed_shape:
        collator = FixedShapePackedBatches(collator, tokens=160, longest=64)  # a filler of 58 tokens, 12 empty
    packed = collator(examples)
    assert packed["input_ids"].shape == (1, 160 if fixed_shape else sum(map(len, sequences)))
    packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): with a cache, transformers does not look for packing.
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
        packed_loss = torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), packed["labels"][0, 1:], ignore_index=-100, reduction="sum")

        apart_loss = sum(
            torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float(),
                torch.tensor(ids[1:], device=device), reduction="sum")
            for ids in sequences)
    # Each sequence's first token predicts nothing in either form (labels -100 at each boundary).
    assert packed_loss.item() == pytest.approx(apart_loss.item(), rel=1e-5 if dtype == torch.float32 else 1e-2)


def test_fixed_shape_batches_pad_rows_and_bounds():
    """Every batch gets the same row length, a power-of-two count of sequence starts and the same longest bound."""
    collator = FixedShapePackedBatches(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
                                       tokens=100, longest=40)
    batch = collator([{"input_ids": list(range(1, 11))}, {"input_ids": list(range(1, 6))}])
    # 15 real tokens, then 85 filler tokens in sequences of at most 40: 40, 40, 5.
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 100)
    assert batch["position_ids"][0, 15:].tolist() == list(range(40)) * 2 + list(range(5))
    assert (batch["labels"][0, 15:] == -100).all() and (batch["input_ids"][0, 15:] == 0).all()
    assert batch["cu_seq_lens_q"].tolist() == [0, 10, 15, 55, 95] + [100] * 12  # 16 sequences, 11 of them empty
    assert batch["max_length_q"] == batch["max_length_k"] == 40
    assert batch["seq_idx"].shape == (1, 100) and batch["seq_idx"][0, -1].item() == 4
    full = collator([{"input_ids": list(range(1, 41))}] * 2 + [{"input_ids": list(range(1, 21))}])
    assert full["cu_seq_lens_q"].tolist() == [0, 40, 80] + [100] * 14 and full["input_ids"].shape == (1, 100)
