"""Padding-free packing (training.packing: true) is not faster by being wrong: the packed batch's loss equals the
loss of the same sequences run one by one, so no token attends across a sequence boundary.

lora_varlen is kernels.varlen_attention (varlen flash attention for packed rows on a GPU); on the CPU it runs
SDPA, so there the test checks that switching it on changes nothing; on a GPU it checks the varlen kernel."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lora_cli.kernels import sequence_bounds, use_varlen_attention

CASES = [("sdpa", "cpu"), ("eager", "cpu"), ("lora_varlen", "cpu")]
if torch.cuda.is_available():
    CASES += [("sdpa", "cuda"), ("lora_varlen", "cuda")]


@pytest.mark.parametrize(("attn", "device"), CASES)
def test_packed_loss_matches_the_sequences_run_apart(tiny_llama, attn, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # varlen flash attention is 16-bit only
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn.replace("lora_varlen", "sdpa"),
                                                 dtype=dtype, device_map={"": device}).eval()
    if attn == "lora_varlen":
        assert use_varlen_attention(model)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in (37, 5, 60)]
    examples = [{"input_ids": ids, "labels": ids} for ids in sequences]

    # The batch TRL's trainer builds with padding_free=True: one row, position ids restarting at each sequence.
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(map(len, sequences)))
    packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): with a cache, transformers does not look for packing.
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        packed_loss = torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), packed["labels"][0, 1:], ignore_index=-100, reduction="sum")

        apart_loss = sum(
            torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float(),
                torch.tensor(ids[1:], device=device), reduction="sum")
            for ids in sequences)
    # Each sequence's first token predicts nothing in either form (labels -100 at each boundary).
    assert packed_loss.item() == pytest.approx(apart_loss.item(), rel=1e-5 if dtype == torch.float32 else 1e-2)


def test_sequence_bounds_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 0, 1, 2, 0]])
    cu, longest = sequence_bounds(positions)
    # A row that starts mid-sequence (5, 6, ...) begins a sequence of its own: no attention across rows.
    assert cu.tolist() == [0, 3, 5, 9, 14, 17, 18] and longest == 5
    assert sequence_bounds(torch.arange(6).repeat(2, 1)) is None  # one sequence a row: plain SDPA


def test_sequence_bounds_are_not_reused_for_a_new_batch_at_the_same_address():
    """The next step's position ids often get the freed memory of the last ones: same address, same shape."""
    memory = np.array([[0, 1, 2, 0, 1, 2]])
    first = torch.from_numpy(memory)
    assert sequence_bounds(first)[0].tolist() == [0, 3, 6]
    memory[0] = [0, 1, 0, 1, 2, 3]
    second = torch.from_numpy(memory)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    assert sequence_bounds(second)[0].tolist() == [0, 2, 6]
