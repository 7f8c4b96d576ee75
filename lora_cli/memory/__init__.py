"""The memory model: GPU memory of one LoRA, QLoRA or full fine-tuning step, from a model's config alone.

Why our own code: no library estimates the peak of a LoRA training step. It models
`torch.cuda.max_memory_allocated` during a step of TRL's SFTTrainer (bf16 autocast, AdamW, SDPA attention,
TRL's chunked LM head, which never materialises the logits), for T = batch_size x seq_len tokens:

  weights      bf16, 2 bytes a parameter. QLoRA: the decoder's Linear weights in NF4 with double quantization,
               0.5 + 1/64 + 4/(64*256) bytes (4-bit codes, an 8-bit absmax per 64 weights, an fp32 absmax per
               256 blocks), the rest bf16. Full fine-tuning: fp32 master weights, 4 bytes.
  LoRA params  trainable x 4 bytes for LoRA (PEFT upcasts adapters to fp32), x 2 for QLoRA (TRL casts them to
               bf16); gradients as much again; AdamW's two moments in the parameter's dtype.
  activations  what autograd keeps per layer and token: 4 bytes per normalised element (norms keep an fp32
               input), SDPA's q, k, v and output, the MLP activation's input and the two factors of its gate,
               the input of each trained module (one bf16 copy per module when the adapter is fp32 or LoRA
               dropout is on, else one per shared input), LoRA's r-wide intermediate, dropout masks. With
               gradient checkpointing each layer keeps only its input and one layer is recomputed at a time.
  buffers      one layer's backward working set (three intermediate-width gradients, the fp32 gradient of an
               upcast input, a dequantized weight for QLoRA), the LM head's tile (min(T, 4096) x
               min(vocab, 32768) x 2 bytes) and fp32 hidden-state gradient, the bf16 copies autocast makes of
               fp32 trainable weights, and two 32 MiB cuBLAS workspaces.
  peak         the largest of three moments: the LM head at the end of the forward pass, the backward pass of
               the last layer, the end of the backward pass (all gradients, for full fine-tuning).
  device       peak x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES: what to have free on the GPU.

Every term is counted from what the libraries allocate, not fitted. Against the three peaks measured for the
Llama-3.1-8B shape on an H100 (the plain stack, `python benchmarks/speed.py --modes baseline_*`) it gives
7.86 / 7.57, 18.05 / 17.81 and 42.83 / 42.60 GiB (+3.8%, +1.4%, +0.5%), and it is within 10% of eleven more measured runs; docs/inspect-params.md has the tables.

lora train's own step on a GPU keeps other tensors (its levers, speed/) and pins host memory: lora_train.py.

A module a concern:
  layout.py       a model's shapes as the plan reads them (Layout), from its config on the meta device
  device.py       units; the CUDA context, cuBLAS workspaces and allocator slack every planned step adds
  plain_stack.py  the rows above: full fine-tuning, LoRA and QLoRA, checkpointing on and off
  lora_train.py   lora train's step on a GPU with a choice of levers: GPU and host memory at any length
  plan.py         memory_plan(config, lora_trainable, seq_len=2048, batch_size=1, lora_modules=None, rank=16,
                  dropout=0.0, dora=False) -> dict, both in bytes (lora_modules: target module names as in a
                  recipe, "all-linear", or None for PEFT's default); method_step: the step a training method runs
  report.py       format_memory_plan(plan, highlight=None) -> str, the text tables; highlight=("qlora", True) marks
                  a row
"""
