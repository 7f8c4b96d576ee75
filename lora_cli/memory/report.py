"""The memory plan as text: the tables lora inspect-params and lora train print (GiB)."""

from lora_cli.memory.device import GIB

METHOD_NAMES = {"full": "full (fp32 + AdamW)", "lora": "LoRA (bf16)", "qlora": "QLoRA (NF4 + DQ)"}


def gib_text(n: int) -> str:
    return "<0.01" if 0 < n < GIB / 200 else f"{n / GIB:.2f}"


def text_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_memory_plan(plan: dict, highlight: tuple[str, bool] | None = None) -> str:
    """The memory plan as a text table (GiB); highlight=(method, checkpointing) marks one row."""
    tokens = f"{plan['batch_size']} x {plan['seq_len']} tokens"
    title = f"Memory plan for one training step, batch {tokens}, LoRA r={plan['rank']} (GiB, peak = max allocated):"
    lines = [title]
    if plan.get("step"):
        lines.append(f"  a step of {plan['step']}")
    header = ["method", "checkpointing", "weights", "LoRA", "grads", "optimizer", "activations", "peak", "device"]
    rows = []
    for row in plan["rows"]:
        mark = "  <- recipe" if highlight == (row["method"], row["gradient_checkpointing"]) else ""
        rows.append([METHOD_NAMES[row["method"]], "on" if row["gradient_checkpointing"] else "off",
                     gib_text(row["weights"]), "-" if row["method"] == "full" else gib_text(row["lora_params"]),
                     gib_text(row["gradients"]), gib_text(row["optimizer"]), gib_text(row["activations"]), gib_text(row["peak"]),
                     gib_text(row["device"]) + mark])
    lines += text_table(header, rows, right=set(range(2, 9)))
    lines.append("  activations include the backward working set, the LM head's buffers and cuBLAS workspaces;")
    lines.append("  device adds the CUDA context and allocator slack. Measured on an H100: docs/inspect-params.md.")
    lines.append(f"  With checkpointing on a GPU, lora train keeps each layer's input in host memory "
                 f"(speed.offload_activations):\n  {gib_text(plan['offloaded'])} GiB less on the rows with checkpointing on.")
    lines += format_lora_train(plan.get("lora_train", {}))
    return "\n".join(lines)


def format_lora_train(lora_train: dict) -> list[str]:
    """lora train's own step on a GPU with its default levers: GPU and host memory (GiB)."""
    if not lora_train:
        return []
    lines = ["lora train on a GPU, its default levers (checkpointing, offloading; docs/long-sequences.md), GiB:"]
    header = ["method", "GPU peak", "device", "host: layer inputs", "attention", "embedding", "process", "host total"]
    rows = []
    for method, part in lora_train.items():
        gpu, host = part["gpu"], part["host"]
        rows.append([METHOD_NAMES[method], gib_text(gpu["peak"]), gib_text(gpu["device"]),
                     gib_text(host["layer_inputs"]), gib_text(host["attention"]), gib_text(host["embedding"]),
                     gib_text(host["process"]), gib_text(host["total"])])
    lines += text_table(header, rows, right=set(range(1, 8)))
    levers = next(iter(lora_train.values()))["levers"]
    lines.append(f"  tiled MLP {'on' if levers['tiled_mlp'] else 'off'}; host memory is pinned (page-locked): "
                 "lora train turns levers off or refuses before loading when it does not fit.")
    return lines
