"""`lora eval --data`: loss and perplexity on a dataset, prepared exactly as `lora train` prepares its data.

The rows are read, detected and converted by data.py, and tokenized and masked by TRL's SFTTrainer (the chat template,
loss on the assistant's words, EOS, truncation at the run's max_length), so the loss is the run's eval loss on
another file. The trainer only prepares and batches; the loss is summed over every scored token here, since the
Trainer's evaluate() averages per-batch means, which weighs a token by the size of the batch it fell in.
"""

import copy
import math
import tempfile
import time
from pathlib import Path

from lora_cli import data as data_mod
from lora_cli.errors import LoraError
from lora_cli.recipe import DataSection, resolve_data_path


def read_loss_data(spec: str, field: str = "--data") -> tuple[list[dict], str]:
    """The records in TRL's form and their format; runs before any weights load, so bad rows fail first."""
    try:
        spec = resolve_data_path(spec, Path("."))
    except FileNotFoundError:
        raise LoraError(f"{field}: the file '{spec}' does not exist.") from None
    rows = data_mod.read_rows(spec, field)
    fmt = data_mod.detect_format(rows, field)
    return data_mod.to_trl_records(rows, fmt, field), fmt


def data_loss(target, records: list[dict], fmt: str, batch_size: int, max_length: int | None,
              use_adapter: bool = True) -> dict:
    """Token-weighted mean loss over the trained (unmasked) tokens, its perplexity, and how many tokens were scored."""
    import contextlib

    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from lora_cli.models import has_accelerator

    datasets.disable_progress_bars()  # the per-map bars of TRL's preparation say nothing to a user
    tokenizer = copy.copy(target.tokenizer)  # prepare_for_trl may give it a chat template; the answers keep theirs
    prepared = data_mod.prepare_for_trl(records, None, fmt, tokenizer, DataSection(train="--data"), seed=0)
    model = target.model
    with tempfile.TemporaryDirectory(prefix="lora-eval-") as scratch:
        args = SFTConfig(
            output_dir=scratch, per_device_eval_batch_size=batch_size, max_length=max_length, report_to="none",
            assistant_only_loss=prepared.assistant_only_loss, gradient_checkpointing=False, bf16=False, fp16=False,
            use_cpu=not has_accelerator(), dataloader_pin_memory=False, disable_tqdm=True,
        )
        # SFTTrainer insists on a train set; one row keeps its preparation cheap. The eval set is the data.
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=prepared.train.select(range(1)), eval_dataset=prepared.train)
        by_length = trainer.eval_dataset.map(lambda row: {"length": len(row["input_ids"])})
        trainer.eval_dataset = by_length.sort("length", reverse=True)  # rows of one batch need little padding
        loader = trainer.get_eval_dataloader()
        examples = len(trainer.eval_dataset)  # TRL drops examples that truncation leaves with nothing to score
        off = model.disable_adapter() if target.is_adapter and not use_adapter else contextlib.nullcontext()
        total, tokens = 0.0, 0
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        with off, torch.no_grad():
            for batch in loader:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                scored = int((batch["labels"][:, 1:] != -100).sum())
                if scored:
                    total += float(model(**batch).loss) * scored  # the model's loss is the mean over these tokens
                    tokens += scored
        model.train(was_training)
    if tokens == 0:
        raise LoraError("--data: no token of the data is scored: every example is masked out (check the format).")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": tokens, "examples": examples,
            "seconds": round(time.perf_counter() - started, 2)}
