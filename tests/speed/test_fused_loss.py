"""The LM head and loss through Liger's kernel (lora_cli/speed/fused_loss.py) against torch's (GPU only)."""

import pytest
import torch



@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's cross-entropy kernel runs on a GPU")
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
