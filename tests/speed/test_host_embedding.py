"""The input embedding in pinned host memory (lora_cli/speed/host_embedding.py): same loss and gradients
(GPU only)."""

import pytest
import torch

from lever_models import assert_same, enable_checkpointing, loss_and_grads, peft_model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU reads the embedding from pinned host memory")
def test_embedding_in_host_memory_gives_the_same_loss_and_gradients(tiny_llama):
    """The input embedding moved to host memory frees its GPU memory and changes no number; it comes back to the
    GPU as it was. A tied embedding (the LM head's weight too) stays."""
    from lora_cli.speed.host_embedding import offload_embedding, offloadable_embedding, restore_embedding

    model = peft_model(tiny_llama, "cuda", untied=True)
    enable_checkpointing(model)
    reference = loss_and_grads(model, "cuda")
    embedding = offloadable_embedding(model)
    matrix = embedding.weight.detach().clone()
    before = torch.cuda.memory_allocated()
    offload_embedding(embedding)
    assert before - torch.cuda.memory_allocated() == matrix.numel() * matrix.element_size()
    assert embedding.weight.is_cuda and torch.equal(embedding.weight, matrix)
    assert_same(reference, loss_and_grads(model, "cuda"), 0.0)
    restore_embedding(embedding)
    assert torch.cuda.memory_allocated() == before
    assert torch.equal(embedding.weight, matrix)
    assert offloadable_embedding(peft_model(tiny_llama, "cuda")) is None
