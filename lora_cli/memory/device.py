"""Units, and what every planned step adds on a GPU beside its tensors: the CUDA context, cuBLAS's workspaces and the
caching allocator's slack (measured on an H100; docs/inspect-params.md)."""

GIB = 2**30
MIB = 2**20
CUBLAS_WORKSPACES = 64 * MIB  # 32 MiB per cuBLAS handle on Hopper, one for the forward and one for autograd's thread
CUDA_CONTEXT_BYTES = int(1.35 * GIB)  # measured on an H100 (torch 2.11, CUDA 13, bitsandbytes loaded)
ALLOCATOR_SLACK = 0.10  # reserved over allocated: 2-14% measured, the most on the smallest models
