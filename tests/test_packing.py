"""Padding-free packing (training.packing: true) is not faster by being wrong: the packed batch's loss equals the
loss of the same sequences run one by one, so no token attends across a sequence boundary."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_matches_the_sequences_run_apart(tiny_llama, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in (37, 5, 60)]
    examples = [{"input_ids": ids, "labels": ids} for ids in sequences]

    # The batch TRL's trainer builds with padding_free=True: one row, position ids restarting at each sequence.
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(map(len, sequences)))
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): with a cache, transformers does not look for packing.
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        packed_loss = torch.nn.functional.cross_entropy(
            logits[0, :-1], packed["labels"][0, 1:], ignore_index=-100, reduction="sum")

        apart_loss = sum(
            torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([ids])).logits[0, :-1],
                                              torch.tensor(ids[1:]), reduction="sum")
            for ids in sequences)
    # Each sequence's first token predicts nothing in either form (labels -100 at each boundary).
    assert packed_loss.item() == pytest.approx(apart_loss.item(), rel=1e-5)
