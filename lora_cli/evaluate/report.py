"""`lora eval`'s output: the side-by-side table, the answers that changed, eval.json, and the model card's section."""

import json
from pathlib import Path

from lora_cli.errors import LoraError

SIDES = ("base", "start", "target")  # left to right: where the target came from, then the target
TITLES = {"base": "base", "start": "start adapter", "target": "target"}
SHOWN_ROWS = 5  # answers listed per kind in the table; --json and eval.json have all of them


def add_changes(report: dict) -> None:
    """The questions the target answers differently from the base (and the starting adapter): fixed or broken."""
    target = report["target"].get("answers")
    for reference in ("base", "start"):
        other = report.get(reference, {}).get("answers")
        if target is None or other is None:
            continue
        changes = {"fixed": [], "broken": []}
        for before, after in zip(other, target):
            if before["correct"] != after["correct"]:
                row = {k: after[k] for k in ("line", "prompt", "expected", "match")}
                row.update({reference: before["answer"], "target": after["answer"]})
                changes["fixed" if after["correct"] else "broken"].append(row)
        report[f"changes_from_{reference}"] = changes


def metric_rows(report: dict) -> list[tuple[str, dict, str]]:
    """(label, {side: value}, kind) for every metric the target has; kind picks the number format."""
    target = report["target"]
    sides = [s for s in SIDES if s in report]
    rows = []
    if "loss" in target:
        rows.append((f"loss ({target['tokens_scored']:,} tokens)", {s: report[s]["loss"] for s in sides}, "loss"))
        rows.append(("perplexity", {s: report[s]["perplexity"] for s in sides}, "loss"))
    if "accuracy" in target:
        rows.append((f"answers correct (of {target['questions']})", {s: report[s]["accuracy"] for s in sides}, "share"))
    for task, metrics in target.get("tasks", {}).items():
        for metric in metrics:
            if metric != "examples":
                values = {s: report[s].get("tasks", {}).get(task, {}).get(metric) for s in sides}
                rows.append((f"{task} {metric}", values, "score"))
    return rows


def _value(value, kind: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if kind == "share" else f"{value:.4f}"


def _change(values: dict, kind: str) -> str:
    before, after = values.get("base"), values.get("target")
    if before is None or after is None:
        return ""
    delta = after - before
    return f"{100 * delta:+.1f} points" if kind == "share" else f"{delta:+.4f}"


def format_table(report: dict) -> str:
    sides = [s for s in SIDES if s in report]
    header = ["", *(TITLES[s] for s in sides), *(["change"] if "base" in report else [])]
    body = [[label, *(_value(values[s], kind) for s in sides), *([_change(values, kind)] if "base" in report else [])]
            for label, values, kind in metric_rows(report)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in [header, *body]]
    names = [f"{TITLES[s]}: {report[s]['model']}" for s in sides]
    lines = ["   ".join(names), *lines]
    lines += _answer_lines(report)
    return "\n".join(line.rstrip() for line in lines)


def _answer_lines(report: dict) -> list[str]:
    lines = []
    for reference in ("base", "start"):
        changes = report.get(f"changes_from_{reference}")
        if changes is None:
            continue
        lines.append(f"\nAnswers that changed from the {TITLES[reference]}: {len(changes['fixed'])} fixed, "
                     f"{len(changes['broken'])} broken")
        for kind in ("fixed", "broken"):
            for row in changes[kind][:SHOWN_ROWS]:
                lines += [f"  {kind} (line {row['line']}): {_short(row['prompt'])}  expected ({row['match']}): "
                          f"{_short(str(row['expected']))}",
                          f"      {TITLES[reference]}: {_short(row[reference])}",
                          f"      target: {_short(row['target'])}"]
            lines += _more(len(changes[kind]))
    if "base" not in report and "answers" in report["target"]:
        wrong = [row for row in report["target"]["answers"] if not row["correct"]]
        lines.append(f"\nWrong answers: {len(wrong)}")
        for row in wrong[:SHOWN_ROWS]:
            lines += [f"  line {row['line']}: {_short(row['prompt'])}  expected ({row['match']}): "
                      f"{_short(str(row['expected']))}", f"      answer: {_short(row['answer'])}"]
        lines += _more(len(wrong))
    return lines


def _more(count: int) -> list[str]:
    if count <= SHOWN_ROWS:
        return []
    return [f"  ... and {count - SHOWN_ROWS} more (--json or --output lists every answer)"]


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_card_section(report: dict) -> str:
    """Markdown for the adapter's README.md: the same rows as the table."""
    sides = [s for s in SIDES if s in report]
    has_base = "base" in report
    header = ["", *(f"{TITLES[s]} (`{report[s]['model']}`)" for s in sides), *(["change"] if has_base else [])]
    rows = [[label, *(_value(values[s], kind) for s in sides), *([_change(values, kind)] if has_base else [])]
            for label, values, kind in metric_rows(report)]
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    inputs = ", ".join(f"{key} `{value}`" for key, value in report["inputs"].items()
                       if key in ("data", "answers") and value) or "lm-evaluation-harness tasks"
    return (f"## Evaluation\n\nMeasured by `lora eval` at the end of training ({inputs}); every answer is in "
            f"`eval.json`.\n\n{table}\n")


def add_to_model_card(card: Path, report: dict) -> None:
    """Put the evaluation section into the model card before its usage section (or at its end)."""
    from lora_cli.checkpoints import write_atomically

    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    section = model_card_section(report)
    marker = "## Use it"
    text = text.replace(marker, f"{section}\n{marker}", 1) if marker in text else f"{text}\n{section}"
    write_atomically(card, text)


def write_json(path: Path, report: dict) -> None:
    """eval.json, written whole or not at all."""
    from lora_cli.checkpoints import write_atomically

    path = Path(path)
    if not path.parent.is_dir():
        raise LoraError(f"--output: the folder '{path.parent}' does not exist.")
    write_atomically(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
