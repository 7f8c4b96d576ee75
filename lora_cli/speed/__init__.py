"""The GPU levers: what lora adds to the libraries' training step where their generic code costs time or memory.

Each lever was measured with benchmarks/speed.py on the Llama-3.1-8B shape (docs/performance.md) and has a
recipe key to turn it off. Two layers, as in Liger-Kernel: the levers (autograd functions and module patches,
Triton kernels apart in kernels/) never import the Trainer-facing modules; policy.py decides which levers a run
gets and wiring.py installs them into the Trainer.

- lora_linear.py: fused LoRA linear layers (`speed.fused_lora`).
- checkpointing.py: checkpointed layer inputs offloaded to host memory on a side stream
  (`speed.offload_activations`), or made again from the layer before's where neither memory holds them, with lean
  recomputation (recomputation.py, `speed.lean_recompute`).
- fused_mlp.py: gate and up projections, their adapters and SwiGLU (and down_proj, when its adapter has no dropout)
  in one function (`speed.fused_mlp`).
- offloaded_attention.py: what the attention's backward reads waits in host memory, and the rerun skips the
  attention (`speed.offload_attention`).
- cuda_graphs.py: CUDA graphs of the checkpointed layers on one GPU (`speed.cuda_graphs`).
- varlen.py: packed rows through varlen flash attention (`speed.varlen_attention`, with `training.packing`).
- fused_loss.py: the LM head and loss through Liger's cross-entropy kernel, chunked (`speed.fused_loss`).
- host_embedding.py: the input embedding in pinned host memory for QLoRA (`speed.offload_embeddings`).
- tiled_mlp.py: the MLP a tile of tokens at a time at long sequences (`speed.tiled_mlp`).
- grouped_experts.py: MoE experts' LoRA as grouped low-rank products, not PEFT's W + BA (`speed.grouped_experts`).
- attention_kernels.py: cuDNN's SDPA or FlexAttention for unpacked rows (`speed.attention_kernel`, off until measured).
- policy.py: Liger's kernels, gradient checkpointing from the memory plan, non-blocking batch copies, and the levers
  that pin host memory fitted to the machine (docs/long-sequences.md).
- step_overhead.py: Python the Trainer runs every step, taken out (on any device).
"""
