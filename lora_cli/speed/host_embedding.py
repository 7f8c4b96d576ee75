"""The input embedding matrix in pinned host memory while training on a GPU (`speed.offload_embeddings`).

Why: a frozen input embedding is the largest 16-bit tensor of a QLoRA model (1.0 GiB of the Llama-3.1-8B shape's
6.6 GiB peak: 128,256 x 4,096 values), yet a step reads only its batch's rows (32 MiB for 4,096 tokens). In pinned
host memory the GPU reads those rows across the host link, with the same embedding kernel (a CUDA view of the
pinned memory, below). The memory freed pays for what the fused MLP keeps between a rerun and its backward
(fused_mlp.keeps_weights).

Used for an embedding that is frozen and not tied to the LM head (which the loss reads whole every step), on one
GPU. When training ends the matrix goes back to the GPU, so the model is as it was loaded for what follows (saving,
merging, generating). tests/speed/test_host_embedding.py checks that it gives the same loss and gradients.
"""

import torch


def host_view(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over pinned host memory, read by kernels across the host link. torch takes any pointer the GPU
    can reach through the CUDA array interface; that interface has no bfloat16, so the view is made as integers of
    the same width and reinterpreted."""

    class Pinned:
        def __init__(self):
            self.host = host  # the view keeps this object, so the memory lives as long as the view
            self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": f"<i{host.element_size()}",
                                             "data": (host.data_ptr(), False), "version": 3, "strides": None}

    return torch.as_tensor(Pinned(), device=torch.device("cuda", torch.cuda.current_device())).view(host.dtype)


def offloadable_embedding(model):
    """The model's input embedding when it can wait in host memory (frozen, untied from the LM head), else None."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(embedding, torch.nn.Embedding) or weight is None or weight.requires_grad or not weight.is_cuda:
        return None
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == weight.data_ptr():
        return None
    return embedding


def offload_embedding(embedding: torch.nn.Embedding) -> None:
    """Move the matrix to pinned host memory; the module reads it there through host_view."""
    weight = embedding.weight
    weight.data = host_view(torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True).copy_(weight.data))


def restore_embedding(embedding: torch.nn.Embedding) -> None:
    weight = embedding.weight
    weight.data = weight.data.clone()  # a copy in GPU memory; the view and its pinned memory go
