"""Training data of the methods beyond SFT: preference pairs (DPO, ORPO, SimPO), labelled completions (KTO) and
prompts (GRPO): reading, format detection, checks with line numbers, and the audit before the first step.

Files are read as for SFT (data.read_rows: jsonl/json/csv/parquet/txt, folders, hub ids). TRL's trainers do the
tokenizing; what we add, and why:
- Detection from the columns, with an error naming the columns found and the formats the method takes.
- Every row checked before any weights load (a message list without roles, a missing label, a KTO label that is
  not true/false), with its line number, instead of a TRL traceback mid-tokenization.
- The implicit prompt (a `chosen` and a `rejected` conversation that share their first turns) split off with TRL's
  own extract_prompt, so every pair reaches the trainer, the audit and the resume fingerprint in one form.
- The audit: lengths of prompts and completions as the trainer tokenizes them, pairs whose completions lose their
  end (and EOS) to max_length, and pairs that truncation makes identical (a pair whose two sides are the same
  sequence teaches nothing: the DPO gradient of such a pair is zero). A dataset where that is every pair is refused.
"""

import copy
import statistics
import sys
from dataclasses import dataclass

from lora_cli.data import Rows, attach_chat_template, check_messages, read_rows, to_datasets
from lora_cli.errors import LoraError

PAIR_METHODS = ("dpo", "orpo", "simpo")
FORMATS = {  # data.format values each method takes, besides auto
    "dpo": ("preference",), "orpo": ("preference",), "simpo": ("preference",), "kto": ("unpaired", "preference"),
    "grpo": ("prompt",),
}
FORMAT_HELP = {
    "preference": "preference pairs ('prompt', 'chosen', 'rejected' as strings or message lists, or 'chosen' and "
                  "'rejected' conversations that share their prompt turns)",
    "unpaired": "labelled completions ('prompt', 'completion', 'label' true/false)",
    "prompt": "prompts ('prompt' as a string or a message list, plus any columns the rewards read)",
}
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
AUDIT_SAMPLE = 2000


def detect_format(rows: Rows, method: str) -> str:
    columns = set(rows.records[0])
    if {"chosen", "rejected"} <= columns and "preference" in FORMATS[method]:
        return "preference"
    if {"prompt", "completion", "label"} <= columns and "unpaired" in FORMATS[method]:
        return "unpaired"
    if "prompt" in columns and method == "grpo":
        return "prompt"
    expected = "; or ".join(FORMAT_HELP[f] for f in FORMATS[method])
    raise LoraError(
        f"data.train: cannot tell the format of '{rows.source}' from its columns ({', '.join(sorted(columns))}). "
        f"method: {method} trains on {expected}. Rename the columns, or check the recipe's method."
    )


def load_data(data_section, method: str, rewards=None) -> tuple[list[dict], list[dict] | None, str]:
    """Read, detect and check the train (and eval) data for the method. Runs before any weights load."""
    train_rows = read_rows(data_section.train, "data.train")
    if data_section.format == "auto":
        fmt = detect_format(train_rows, method)
    elif data_section.format in FORMATS[method]:
        fmt = data_section.format
    else:
        raise LoraError(f"data.format: {data_section.format} is not a format of method: {method}; it takes "
                        f"{', '.join(FORMATS[method])} (or auto).")
    train = convert(train_rows, fmt, "data.train")
    evaluation = convert(read_rows(data_section.eval, "data.eval"), fmt, "data.eval") \
        if isinstance(data_section.eval, str) else None
    if method == "grpo":
        check_reward_columns(rewards or [], train_rows)
    return train, evaluation, fmt


def check_reward_columns(rewards: list[str], rows: Rows) -> None:
    """exact_match reads the `answer` column: without it every reward would fail mid-run."""
    if "exact_match" in rewards and "answer" not in rows.records[0]:
        raise LoraError(f"rewards: exact_match compares each completion with the row's 'answer' column, and "
                        f"'{rows.source}' has none (its columns: {', '.join(rows.records[0])}). Add an 'answer' "
                        "column, or score with your own function (rewards: [my_rewards.py:my_function]).")


def convert(rows: Rows, fmt: str, field: str) -> list[dict]:
    """Rows as TRL's dataset types, checked: explicit-prompt pairs, labelled completions, or prompts with extras."""
    out = []
    for record, number in zip(rows.records, rows.line_numbers):
        where = f"{field}: {rows.source}, line {number}"
        if fmt == "preference":
            out.append(_pair(record, where))
        elif fmt == "unpaired":
            prompt, completion = _prompt(record, where), _completion(record, "completion", where)
            _same_kind(prompt, completion, where)
            out.append({"prompt": prompt, "completion": completion, "label": _label(record.get("label"), where)})
        else:
            extras = {k: v for k, v in record.items() if k != "prompt"}
            out.append({"prompt": _prompt(record, where), **extras})
    return out


def _pair(record: dict, where: str) -> dict:
    for column in ("chosen", "rejected"):
        if record.get(column) is None:
            raise LoraError(f"{where}: a preference pair needs '{column}'; this row has {', '.join(record)}.")
    if record.get("prompt") is None:
        from trl.data_utils import extract_prompt

        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise LoraError(f"{where}: without a 'prompt' column, 'chosen' and 'rejected' must be conversations "
                            "(message lists) that start with the same prompt turns.")
        chosen = check_messages(chosen, where)
        rejected = check_messages(rejected, where)
        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not split["prompt"]:
            raise LoraError(f"{where}: 'chosen' and 'rejected' share no first message, so there is no prompt to "
                            "answer; add a 'prompt' column or start both with the same user turn.")
        record = {**record, **split}
    prompt = _prompt(record, where)
    chosen, rejected = _completion(record, "chosen", where), _completion(record, "rejected", where)
    _same_kind(prompt, chosen, where)
    _same_kind(prompt, rejected, where)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(record: dict, where: str):
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list):
        messages = check_messages(prompt, where, need_assistant=False)
        if messages[-1]["role"] == "assistant":
            raise LoraError(f"{where}: the prompt ends with an assistant message; it must end with the turn to answer.")
        return messages
    raise LoraError(f"{where}: 'prompt' must be a non-empty string or a list of messages, got {prompt!r:.80}.")


def _completion(record: dict, column: str, where: str):
    value = record.get(column)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value:
        return check_messages(value, where)
    raise LoraError(f"{where}: '{column}' must be a non-empty string or a list of assistant messages, got {value!r:.80}.")


def _same_kind(prompt, completion, where: str) -> None:
    if isinstance(prompt, list) != isinstance(completion, list):
        raise LoraError(f"{where}: the prompt and its completions must all be strings or all message lists.")


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in LABEL_WORDS and not isinstance(value, float):
        return LABEL_WORDS[word]
    raise LoraError(f"{where}: 'label' must be true (a desirable completion) or false (an undesirable one), "
                    f"got {value!r}.")


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    eval: object | None
    format: str
    chat_template_note: str
    chat_template_source: str  # which chat template is used, for its errors


def prepare(train, evaluation, fmt: str, tokenizer, data_section, seed: int) -> PreparedData:
    """Attach a chat template where conversational data needs one, and build the datasets TRL takes."""
    note, source = attach_chat_template(tokenizer, data_section, isinstance(train[0]["prompt"], list))
    train_set, eval_set = to_datasets(train, evaluation, data_section, seed)
    return PreparedData(train_set, eval_set, fmt, note, source)


# ---------------------------------------------------------------------------------------------------------------
# The audit: each method's examples tokenized as its trainer tokenizes them, truncated as its collator truncates.


def _sample(train_set):
    return train_set if len(train_set) <= AUDIT_SAMPLE else train_set.shuffle(seed=0).select(range(AUDIT_SAMPLE))


def tokenized_sequences(trainer, method: str, sample) -> list[dict]:
    """[{prompt, completions: {name: ids}}] untruncated, through the trainer's own tokenization (TRL has no public
    "tokenize like the trainer" function; its preparation methods are the only way to see exactly its ids)."""
    if method in ("dpo", "kto"):
        untruncated = copy.copy(trainer.args)  # shallow: new TrainingArguments would reset accelerate's state
        untruncated.max_length = None
        prepared = trainer._prepare_dataset(sample, trainer.processing_class, untruncated, "audit")
        names = ("chosen", "rejected") if method == "dpo" else ("completion",)
        return [{"prompt": row["prompt_ids"], "completions": {n: row[f"{n}_ids"] for n in names},
                 "label": row.get("label")} for row in prepared]
    # ORPO and CPO tokenize row by row, cutting completions to max_length - prompt (what _truncate does below).
    from trl.data_utils import maybe_apply_chat_template

    kept, trainer.max_length = trainer.max_length, sys.maxsize
    try:
        rows = []
        for example in sample:
            row = trainer.tokenize_row(maybe_apply_chat_template(example, trainer.processing_class))
            prompt = row["prompt_input_ids"]
            rows.append({"prompt": prompt, "completions": {
                n: row[f"{n}_input_ids"][len(row[f"{n}_labels"]) - sum(1 for t in row[f"{n}_labels"] if t != -100):]
                for n in ("chosen", "rejected")}})
        return rows
    finally:
        trainer.max_length = kept


def _truncate(prompt: list[int], completion: list[int], max_length: int | None) -> list[int]:
    """What the trainers keep of a completion: prompt + completion cut to max_length from the start."""
    return completion if max_length is None else completion[: max(0, max_length - len(prompt))]


def _stats(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1],
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def audit(trainer, method: str, prepared: PreparedData, max_length: int | None) -> dict:
    """The method's audit report (JSON-serialisable); check_audit refuses what cannot train."""
    sample = _sample(prepared.train)
    report = {
        "method": method,
        "examples": {"train": len(prepared.train), "eval": len(prepared.eval) if prepared.eval is not None else 0},
        "audited_examples": len(sample),
        "max_length": max_length,
    }
    if method == "grpo":
        return {**report, **_prompt_audit(trainer, sample)}
    rows = tokenized_sequences(trainer, method, sample)
    eos = trainer.processing_class.eos_token_id
    names = list(rows[0]["completions"])
    report["tokens"] = {"prompt": _stats([len(r["prompt"]) for r in rows]),
                        **{n: _stats([len(r["completions"][n]) for r in rows]) for n in names}}
    report["prompt_fills_max_length"] = sum(max_length is not None and len(r["prompt"]) >= max_length for r in rows)
    for name in names:
        cut = [(r["completions"][name], _truncate(r["prompt"], r["completions"][name], max_length)) for r in rows]
        report[f"{name}_truncated"] = sum(len(kept) < len(full) for full, kept in cut)
        report[f"{name}_eos_lost"] = sum(bool(full) and full[-1] == eos and (not kept or kept[-1] != eos)
                                         for full, kept in cut)
    if method == "kto":
        labels = [bool(r["label"]) for r in rows]
        report["labels"] = {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}
    else:
        report["identical_pairs"] = sum(r["completions"]["chosen"] == r["completions"]["rejected"] for r in rows)
        report["identical_after_truncation"] = sum(
            _truncate(r["prompt"], r["completions"]["chosen"], max_length)
            == _truncate(r["prompt"], r["completions"]["rejected"], max_length) for r in rows)
    report["example"] = _render(trainer.processing_class, rows[0])
    return report


def _prompt_audit(trainer, sample) -> dict:
    from trl.data_utils import maybe_apply_chat_template

    tokenizer = trainer.processing_class
    texts = [maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"] for row in sample]
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    args = trainer.args
    return {
        "tokens": {"prompt": _stats(lengths)},
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "reward_functions": [getattr(f, "__name__", str(f)) for f in trainer.reward_funcs],
        "columns_for_rewards": sorted(c for c in sample.column_names if c != "prompt"),
        "example": texts[0] + "⟦generated⟧",
    }


def _render(tokenizer, row: dict) -> str:
    prompt = tokenizer.decode(row["prompt"])
    return "\n".join(f"{prompt}⟦{tokenizer.decode(ids)}⟧" + ("" if len(row["completions"]) == 1 else f"  ({name})")
                     for name, ids in row["completions"].items())


def check_audit(report: dict) -> None:
    """Refuse data that cannot train: every pair the same after truncation, or every prompt filling max_length."""
    audited = report["audited_examples"]
    if report.get("prompt_fills_max_length", 0) == audited:
        raise LoraError(
            f"Every audited example's prompt is at least training.max_length={report['max_length']} tokens long "
            f"(the longest prompt: {report['tokens']['prompt']['max']}), so nothing of any completion would be "
            "trained (TRL drops such examples). Raise training.max_length or shorten the prompts."
        )
    if report.get("identical_after_truncation", 0) == audited:
        cause = ("chosen and rejected are the same in every pair" if report["identical_pairs"] == audited else
                 f"truncation at training.max_length={report['max_length']} cuts every pair where chosen and "
                 f"rejected still agree (prompts up to {report['tokens']['prompt']['max']} tokens, chosen up to "
                 f"{report['tokens']['chosen']['max']}, rejected up to {report['tokens']['rejected']['max']}); "
                 "raise training.max_length")
        raise LoraError(f"No audited pair differs between its chosen and rejected completion as the trainer would "
                        f"see them, so there is no preference to learn: {cause}.")


def format_audit(report: dict) -> str:
    method = report["method"]
    examples = report["examples"]
    lines = [f"Data audit ({method})",
             f"  examples: {examples['train']} train, {examples['eval']} eval"
             + (f" (audited {report['audited_examples']})" if report["audited_examples"] < examples["train"] else "")]
    for name, t in report["tokens"].items():
        lines.append(f"  tokens of the {name}: min {t['min']}, median {t['median']:g}, p95 {t['p95']}, max {t['max']}")
    if method == "grpo":
        lines += [f"  {report['num_generations']} completions a prompt, up to {report['max_completion_length']} tokens "
                  f"each, scored by {', '.join(report['reward_functions'])}",
                  f"  columns the rewards receive: {', '.join(report['columns_for_rewards']) or 'none'}"]
    else:
        names = ["completion"] if method == "kto" else ["chosen", "rejected"]
        for name in names:
            lines.append(f"  {name} cut by max_length={report['max_length']}: {report[f'{name}_truncated']}, "
                         f"{report[f'{name}_eos_lost']} of them lose their EOS")
        if report["prompt_fills_max_length"]:
            lines.append(f"  prompts filling max_length (TRL drops them): {report['prompt_fills_max_length']}")
        if method == "kto":
            labels = report["labels"]
            lines.append(f"  labels: {labels['desirable']} desirable, {labels['undesirable']} undesirable")
        else:
            lines.append(f"  pairs with chosen == rejected: {report['identical_pairs']}; identical after truncation: "
                         f"{report['identical_after_truncation']}")
    lines.append("  one example, trained (for grpo: generated) tokens inside ⟦ ⟧:")
    lines += ["    " + line for line in report["example"][-1500:].splitlines()]
    return "\n".join(lines)
