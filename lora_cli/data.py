"""Training data: read files or hub datasets, detect the format, convert for TRL, and audit the labels.

TRL's SFTTrainer does the tokenizing, loss masking and packing. What we add, and why:
- Reading local files ourselves, so a malformed JSONL line is reported with its line number instead of
  an Arrow traceback.
- Format detection from columns (messages, ShareGPT, Alpaca, prompt/completion, text), with an error that
  names the columns a file has when it matches none.
- Loss on the assistant's words only, for any chat template: TRL masks multi-turn conversations when the
  template has `{% generation %}` markers (or TRL knows how to add them); for other templates we hand TRL
  the conversation as a prompt and a completion (the last assistant turn), which TRL masks for any template.
- The data audit: token lengths, truncation, and whether the end-of-turn/EOS token is really trained.
"""

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import LoraError, first_line
from lora_cli.models import end_of_turn_id

ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Used when a tokenizer has no chat template (base models such as GPT-2). The assistant's words and the
# EOS token sit inside generation markers, so TRL trains exactly those and the model learns to stop.
SIMPLE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{%- else -%}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)
TEXT_ENCODING = "utf-8-sig"  # UTF-8, accepting the byte-order mark Windows editors and spreadsheet exports write
AUDIT_SAMPLE = 2000  # examples tokenized for the audit; enough for the spread, quick on a large set


@dataclass
class Rows:
    """Examples as read, with the line (or row) number each came from, for error messages."""

    records: list[dict]
    line_numbers: list[int]
    source: str


def read_rows(spec: str, field: str) -> Rows:
    """Rows from a local file, a folder of files, or a hub dataset id."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in READERS)
        if not files:
            raise LoraError(f"{field}: the folder '{spec}' has no .jsonl, .json, .csv, .parquet or .txt file.")
        parts = [read_rows(str(p), field) for p in files]
        return Rows(
            [r for part in parts for r in part.records], [n for part in parts for n in part.line_numbers], spec
        )
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise LoraError(f"{field}: '{spec}' is not a .jsonl, .json, .csv, .parquet or .txt file.")
        try:
            records, numbers = reader(path, field)
        except UnicodeDecodeError as e:
            message = f"{field}: '{spec}' is not UTF-8 text (byte {e.start} cannot be read); save it as UTF-8."
            raise LoraError(message) from None
        if not records:
            raise LoraError(f"{field}: '{spec}' has no examples.")
        return Rows(records, numbers, spec)
    return _read_hub(spec, field)


def _read_jsonl(path: Path, field: str):
    records, numbers = [], []
    with path.open(encoding=TEXT_ENCODING) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoraError(f"{field}: {path}, line {number}: not valid JSON ({e.msg}, column {e.colno}).") from None
            if not isinstance(record, dict):
                raise LoraError(f"{field}: {path}, line {number}: each line must be a JSON object, got {line.strip()[:60]!r}.")
            records.append(record)
            numbers.append(number)
    return records, numbers


def _read_json(path: Path, field: str):
    try:
        data = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except json.JSONDecodeError as e:
        raise LoraError(f"{field}: {path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LoraError(f"{field}: {path} must hold a JSON list of objects (or use .jsonl, one object a line).")
    return data, list(range(1, len(data) + 1))


def _read_csv(path: Path, field: str):
    records, numbers = [], []
    with path.open(encoding=TEXT_ENCODING, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for record in reader:
                # DictReader files extra values under None and fills missing ones with None (an empty value is "").
                if None in record or None in record.values():
                    raise LoraError(
                        f"{field}: {path}, line {reader.line_num}: this row does not have the header's "
                        f"{len(reader.fieldnames)} values ({', '.join(reader.fieldnames)}); quote values that "
                        'contain commas, such as "a, b".'
                    )
                records.append(record)
                numbers.append(reader.line_num)  # a quoted value may span lines: where the row ends
        except csv.Error as e:
            raise LoraError(f"{field}: {path}, line {reader.line_num}: not valid CSV ({e}).") from None
    return records, numbers


def _read_parquet(path: Path, field: str):
    import pyarrow.parquet  # what datasets reads parquet with; directly, it neither caches nor logs a traceback

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except (ValueError, OSError) as e:  # ArrowInvalid: not a parquet file, or a damaged one
        raise LoraError(f"{field}: {path} cannot be read as parquet: {first_line(e)}") from None
    return records, list(range(1, len(records) + 1))


def _read_text(path: Path, field: str):
    records, numbers = [], []
    for number, line in enumerate(path.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
        if line.strip():
            records.append({"text": line})
            numbers.append(number)
    return records, numbers


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_text}


def _read_hub(spec: str, field: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(spec, split="train")
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise LoraError(
            f"{field}: '{spec}' is not a local file or folder, and loading it as a hub dataset failed: {first_line(e)}"
        ) from None
    records = dataset.to_list()
    return Rows(records, list(range(1, len(records) + 1)), spec)


def detect_format(rows: Rows, field: str) -> str:
    columns = set(rows.records[0])
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    if "input_ids" in columns:
        return "tokenized"
    raise LoraError(
        f"{field}: cannot tell the format of '{rows.source}' from its columns ({', '.join(sorted(columns))}). "
        "Known formats: messages (a 'messages' list of role/content), sharegpt ('conversations' of from/value), "
        "alpaca (instruction, input, output), prompt_completion (prompt, completion), text ('text'), "
        "tokenized ('input_ids', already tokenized; optional 'labels'). "
        "Rename the columns or set data.format."
    )


REQUIRED_COLUMNS = {
    "messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"), "text": ("text",), "tokenized": ("input_ids",),
}


def to_trl_records(rows: Rows, fmt: str, field: str) -> list[dict]:
    """Convert every row to one of TRL's dataset types: messages, prompt/completion or text."""
    out = []
    for record, number in zip(rows.records, rows.line_numbers):
        where = f"{field}: {rows.source}, line {number}"
        for column in REQUIRED_COLUMNS[fmt]:
            if column not in record or record[column] is None:
                raise LoraError(f"{where}: the {fmt} format needs a '{column}' column; this row has {', '.join(record)}.")
        if fmt == "messages":
            out.append({"messages": _check_conversation(record["messages"], where)})
        elif fmt == "sharegpt":
            turns = record["conversations"]
            if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
                raise LoraError(f"{where}: 'conversations' must be a list of objects with 'from' and 'value'.")
            messages = []
            for turn in turns:
                role = ROLE_ALIASES.get(str(turn["from"]).lower())
                if role is None:
                    raise LoraError(f"{where}: unknown speaker '{turn['from']}' (known: {', '.join(ROLE_ALIASES)}).")
                messages.append({"role": role, "content": turn["value"]})
            out.append({"messages": _check_conversation(messages, where)})
        elif fmt == "alpaca":
            instruction, extra = str(record["instruction"]), str(record.get("input") or "")
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"])}]
            out.append({"messages": check_messages(messages, where)})
        elif fmt == "prompt_completion":
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, list) and isinstance(completion, list):
                out.append({"prompt": check_messages(prompt, where, need_assistant=False),
                            "completion": check_messages(completion, where)})
            elif isinstance(prompt, str) and isinstance(completion, str):
                if not completion.strip():
                    raise LoraError(f"{where}: the completion is empty, so there is nothing to train on.")
                out.append({"prompt": prompt, "completion": completion})
            else:
                raise LoraError(f"{where}: prompt and completion must both be strings or both lists of messages.")
        elif fmt == "tokenized":
            ids = record["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise LoraError(f"{where}: 'input_ids' must be a non-empty list of token ids.")
            out.append({"input_ids": ids, **({"labels": record["labels"]} if "labels" in record else {})})
        else:
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise LoraError(f"{where}: 'text' must be a non-empty string.")
            out.append({"text": text})
    return out


def _check_conversation(messages, where: str) -> list[dict]:
    """A whole conversation: its messages, and something before its last assistant message for that to answer
    (TRL's prompt-completion path, which conversations take when the chat template cannot mask every turn, fails on
    an empty prompt with an IndexError)."""
    clean = check_messages(messages, where)
    if max(i for i, m in enumerate(clean) if m["role"] == "assistant") == 0:
        raise LoraError(f"{where}: the conversation's only assistant message comes first, with nothing before it to "
                        "answer; check that the user and assistant roles are not swapped.")
    return clean


def check_messages(messages, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LoraError(f"{where}: messages must be a non-empty list of {{role, content}} objects.")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LoraError(f"{where}: message {i + 1} must be an object with 'role' and 'content'.")
        role = ROLE_ALIASES.get(str(message["role"]).lower(), message["role"])
        if role not in CHAT_ROLES:
            raise LoraError(f"{where}: message {i + 1} has the role '{message['role']}'; roles are {', '.join(CHAT_ROLES)}.")
        if not isinstance(message["content"], str):
            raise LoraError(f"{where}: message {i + 1} has content that is not a string.")
        clean.append({"role": role, "content": message["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in clean):
        raise LoraError(f"{where}: the conversation has no assistant message, so there is nothing to train on.")
    return clean


@dataclass
class PreparedData:
    train: object  # datasets.Dataset in a TRL format
    eval: object | None
    format: str
    assistant_only_loss: bool  # True: TRL masks by generation markers; False: by prompt/completion or nothing
    chat_template_note: str
    chat_template_source: str  # which chat template is used, for its errors


def load_data(data_section) -> tuple[list[dict], list[dict] | None, str]:
    """Read and convert the train (and eval) data. Runs before any weights load, so data errors come first."""
    train_rows = read_rows(data_section.train, "data.train")
    fmt = detect_format(train_rows, "data.train") if data_section.format == "auto" else data_section.format
    train = to_trl_records(train_rows, fmt, "data.train")
    evaluation = None
    if isinstance(data_section.eval, str):
        eval_rows = read_rows(data_section.eval, "data.eval")
        evaluation = to_trl_records(eval_rows, fmt, "data.eval")
    return train, evaluation, fmt


def attach_chat_template(tokenizer, data_section, conversational: bool) -> tuple[str, str]:
    """data.chat_template, or lora's simple template for conversations and a tokenizer without one; returns the
    audit's note and the name errors give the template by."""
    if data_section.chat_template:
        tokenizer.chat_template = _read_template(data_section.chat_template)
        return "chat template: from data.chat_template", "data.chat_template"
    if conversational and not tokenizer.chat_template:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
        return ("chat template: the tokenizer has none, so lora's simple '### User:/### Assistant:' template is used",
                "lora's simple chat template")
    return "", "the model's chat template (model.name_or_path)"


def prepare_for_trl(train, evaluation, fmt, tokenizer, data_section, seed: int) -> PreparedData:
    """Attach a chat template, choose how the loss is masked, and build the datasets TRL takes."""
    conversational = "messages" in train[0] or isinstance(train[0].get("prompt"), list)
    note, source = attach_chat_template(tokenizer, data_section, conversational)

    assistant_only = False
    if "messages" in train[0]:
        if supports_assistant_masks(tokenizer):
            assistant_only = True
        else:
            train = [_last_turn_as_completion(r) for r in train]
            evaluation = [_last_turn_as_completion(r) for r in evaluation] if evaluation else evaluation
            note = (note + "; " if note else "") + (
                "loss on the last assistant turn of each conversation (the template has no generation markers "
                "for per-turn masking)"
            )

    train_set, eval_set = to_datasets(train, evaluation, data_section, seed)
    return PreparedData(train_set, eval_set, fmt, assistant_only, note, source)


def to_datasets(train, evaluation, data_section, seed: int):
    """The train and eval datasets TRL takes; a data.eval fraction is held out of train."""
    import datasets

    train_set = datasets.Dataset.from_list(train)
    eval_set = datasets.Dataset.from_list(evaluation) if evaluation else None
    if isinstance(data_section.eval, float):
        split = train_set.train_test_split(test_size=data_section.eval, seed=seed)
        if len(split["test"]) == 0 or len(split["train"]) == 0:
            raise LoraError(f"data.eval: holding out {data_section.eval} of {len(train_set)} examples leaves a split empty.")
        train_set, eval_set = split["train"], split["test"]
    return train_set, eval_set


def _read_template(value: str) -> str:
    path = Path(value)
    if path.suffix in (".jinja", ".j2") or (len(value) < 256 and path.is_file()):
        if not path.is_file():
            raise LoraError(f"data.chat_template: the file '{value}' does not exist.")
        return path.read_text(encoding=TEXT_ENCODING)
    if "{%" not in value and "{{" not in value:
        raise LoraError("data.chat_template: give a Jinja template (containing {% or {{) or a .jinja file path.")
    return value


def supports_assistant_masks(tokenizer) -> bool:
    """Whether TRL can mask every assistant turn with this template (its own markers, or a patch TRL ships)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if tokenizer.chat_template and has_generation_markers(tokenizer.chat_template):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def _last_turn_as_completion(record: dict) -> dict:
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def end_of_turn_ids(tokenizer) -> set[int]:
    """The EOS token and the special token that closes an assistant turn in the chat template."""
    return {i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None}


def audit(trainer, train_set, max_length: int | None) -> dict:
    """Tokenize (a sample of) the train set exactly as the trainer does, without truncation, and report."""
    import copy

    sample = train_set if len(train_set) <= AUDIT_SAMPLE else train_set.shuffle(seed=0).select(range(AUDIT_SAMPLE))
    # A shallow copy: building new TrainingArguments would reset accelerate's state under the trainer.
    unpacked = copy.copy(trainer.args)
    unpacked.max_length, unpacked.packing, unpacked.shuffle_dataset = None, False, False
    # TRL has no public "tokenize like the trainer" function; its own preparation method is the only way to see
    # exactly the labels the trainer will use (chat template, masks, EOS) before truncation.
    prepared = trainer._prepare_dataset(sample, trainer.processing_class, unpacked, False, None, "audit")
    tokenizer = trainer.processing_class
    stop_ids = end_of_turn_ids(tokenizer)
    limit = max_length or math.inf
    lengths, truncated, eos_lost, eos_trained, trained_tokens = [], 0, 0, 0, 0
    for example in prepared:
        labels = example["labels"]
        lengths.append(len(labels))
        kept = labels[: int(min(len(labels), limit))]
        trained_tokens += sum(1 for t in kept if t != -100)
        had_eos = any(t in stop_ids for t in labels if t != -100)
        keeps_eos = any(t in stop_ids for t in kept if t != -100)
        truncated += len(labels) > limit
        eos_lost += had_eos and not keeps_eos
        eos_trained += keeps_eos
    ordered = sorted(lengths)
    report = {
        "examples": {"train": len(train_set), "eval": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0},
        "audited_examples": len(lengths),
        "tokens": {
            "min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1),
        },
        "max_length": max_length,
        "truncated": truncated,
        "eos_lost_to_truncation": eos_lost,
        "eos_trained_share": round(eos_trained / len(lengths), 4),
        "trained_token_share": round(trained_tokens / max(1, sum(min(n, limit) for n in lengths)), 4),
        "end_of_turn_tokens": [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)],
        "example": render_trained(tokenizer, prepared[0]["input_ids"], prepared[0]["labels"]),
    }
    return report


def render_trained(tokenizer, input_ids, labels) -> str:
    """The example's text with the trained tokens inside ⟦ ⟧."""
    pieces, inside, run = [], False, []
    for token_id, label in zip(input_ids, labels):
        trained = label != -100
        if trained != inside:
            pieces.append(tokenizer.decode(run))
            pieces.append("⟦" if trained else "⟧")
            run, inside = [], trained
        run.append(token_id)
    pieces.append(tokenizer.decode(run))
    if inside:
        pieces.append("⟧")
    return "".join(pieces)


def check_audit(report: dict) -> None:
    """Refuse a run whose labels never contain the end-of-turn/EOS token: that model would never stop.

    Pre-tokenized data is the user's own business (benchmarks feed random tokens), so it is only reported.
    """
    if report["eos_trained_share"] == 0 and report.get("format") != "tokenized":
        tokens = ", ".join(report["end_of_turn_tokens"]) or "(none known)"
        lost = report["eos_lost_to_truncation"]
        cause = (
            f"truncation at training.max_length={report['max_length']} cuts it from {lost} of them; raise max_length"
            if lost
            else "the chat template or data never puts it in the trained part; check data.chat_template and the "
            "rendered example in the audit"
        )
        raise LoraError(
            f"No audited example has its end-of-turn/EOS token ({tokens}) among the trained labels, so the model "
            f"would never learn to stop generating: {cause}."
        )


def format_audit(report: dict) -> str:
    t = report["tokens"]
    lines = [
        "Data audit",
        f"  examples: {report['examples']['train']} train, {report['examples']['eval']} eval"
        + (f" (audited {report['audited_examples']})" if report["audited_examples"] < report["examples"]["train"] else ""),
        f"  tokens per example: min {t['min']}, median {t['median']:g}, mean {t['mean']:g}, p95 {t['p95']}, max {t['max']}",
        f"  truncated at max_length={report['max_length']}: {report['truncated']} examples, "
        f"{report['eos_lost_to_truncation']} of them lose their EOS",
        f"  examples whose trained labels include the end-of-turn/EOS ({', '.join(report['end_of_turn_tokens'])}): "
        f"{report['eos_trained_share']:.1%}",
        f"  share of tokens trained: {report['trained_token_share']:.1%}",
        "  one example, trained tokens inside ⟦ ⟧:",
        *("    " + line for line in _shorten(report["example"]).splitlines()),
    ]
    return "\n".join(lines)


def _shorten(text: str, limit: int = 1500) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]} [... {len(text) - limit} characters ...] {text[-limit // 2:]}"


def template_error(error, source: str) -> str:
    import jinja2

    message = " ".join(str(error.message or error).split()).rstrip(".")
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"{source} cannot be read: {message} (template line {error.lineno})."
    return (f"{source} failed on the training data: {message}. Check that the conversations have the roles and "
            "order this template expects, or set data.chat_template.")
