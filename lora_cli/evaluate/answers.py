"""`lora eval --answers`: the user's own questions, answered greedily, checked against the expected answers.

lm-evaluation-harness checks answers too, but only inside its task format (a YAML per task, a dataset, filters);
a JSONL of questions and answers with a match mode per row is what a user writes in a minute, so the reading
and the five match modes are ours. The answers themselves come from `lora generate`'s path (generate.py): the
same loading, chat template and stop tokens, with the prompts batched (left padding) instead of one at a time.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_cli.data import TEXT_ENCODING
from lora_cli.errors import LoraError, did_you_mean
from lora_cli.recipe import MATCH_MODES

DEFAULT_MATCH = "contains"
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Question:
    prompt: object  # generate.Prompt
    answer: object  # as the file gives it
    expected: list  # acceptable answers, parsed: strings, numbers, compiled patterns or option letters
    match: str
    line: int
    choices: list[str] | None = None

    def is_correct(self, answer: str) -> bool:
        return any(_MATCHERS[self.match](answer, expected, self) for expected in self.expected)

    def to_json(self) -> dict:
        return {"line": self.line, "prompt": self.prompt.label, "expected": self.answer, "match": self.match}


def check_match_mode(mode: str, where: str) -> str:
    if mode not in MATCH_MODES:
        raise LoraError(f"{where}: unknown match mode '{mode}'.{did_you_mean(mode, MATCH_MODES)} "
                        f"Match modes: {', '.join(MATCH_MODES)}.")
    return mode


def read_answers(path, default_match: str = DEFAULT_MATCH, field: str = "--answers") -> list[Question]:
    """Rows of 'prompt' (or 'messages') and 'answer', optional 'match' and 'choices': JSONL, or a JSON list."""
    from lora_cli.generate import prompt_from_row

    path = Path(path)
    check_match_mode(default_match, "--match")
    if not path.is_file():
        raise LoraError(f"{field}: the file '{path}' does not exist.")
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as e:
        raise LoraError(f"{field}: '{path}' is not UTF-8 text (byte {e.start} cannot be read).") from None
    rows = _rows(text, path, field)
    if not rows:
        raise LoraError(f"{field}: '{path}' has no questions.")
    questions = []
    for line, row in rows:
        where = f"{field}: {path}, line {line}"
        if not isinstance(row, dict):
            raise LoraError(f"{where}: each row must be a JSON object with 'prompt' (or 'messages') and 'answer'.")
        if "answer" not in row:
            raise LoraError(f"{where}: the row has no 'answer' (its keys: {', '.join(row) or 'none'}); each row needs "
                            "'prompt' (or 'messages') and the expected 'answer'.")
        prompt = prompt_from_row({k: v for k, v in row.items() if k in ("prompt", "messages")}, where)
        match = check_match_mode(row.get("match", default_match), f"{where}, 'match'")
        choices = row.get("choices")
        if choices is not None and not (isinstance(choices, list) and choices
                                        and all(isinstance(c, str) for c in choices)):
            raise LoraError(f"{where}: 'choices' must be a non-empty list of option texts (option A first).")
        expected = _expected(row["answer"], match, choices, where)
        questions.append(Question(prompt, row["answer"], expected, match, line, choices))
    return questions


def _rows(text: str, path: Path, field: str) -> list[tuple[int, object]]:
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise LoraError(f"{field}: {path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}).") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LoraError(f"{field}: {path}, line {number}, column {e.colno}: not valid JSON ({e.msg}); an answers "
                            "file has one JSON object a line.") from None
    return rows


def _expected(answer, match: str, choices, where: str) -> list:
    values = answer if isinstance(answer, list) else [answer]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise LoraError(f"{where}: 'answer' must be a string, a number or a list of them (any one counts); "
                        f"got {answer!r}.")
    if match == "number":
        return [_number(v, where) for v in values]
    if match == "regex":
        try:
            return [re.compile(str(v)) for v in values]
        except re.error as e:
            raise LoraError(f"{where}: the answer is not a valid regular expression for match 'regex': {e}.") from None
    if match == "choice":
        return [_letter(str(v), choices, where) for v in values]
    return [str(v) for v in values]


def _number(value, where: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    found = NUMBER.fullmatch(value.strip())
    if not found:
        raise LoraError(f"{where}: match 'number' needs a number as the answer, got {value!r}.")
    return float(found.group().replace(",", ""))


def _letter(value: str, choices, where: str) -> str:
    letters = LETTERS[: len(choices)] if choices else LETTERS
    if value.strip().upper() in letters and len(value.strip()) == 1:
        return value.strip().upper()
    if choices and value in choices:
        return LETTERS[choices.index(value)]
    options = f"one of its choices or a letter {letters[0]}-{letters[-1]}" if choices else "a letter such as B"
    raise LoraError(f"{where}: match 'choice' needs {options} as the answer, got {value!r}.")


def _normalized(text: str) -> str:
    return " ".join(text.split()).rstrip(".").casefold()


def _exact(answer: str, expected: str, question) -> bool:
    return _normalized(answer) == _normalized(expected)


def _contains(answer: str, expected: str, question) -> bool:
    return _normalized(expected) in _normalized(answer)


def _regex(answer: str, pattern, question) -> bool:
    return pattern.search(answer) is not None


def _number_matches(answer: str, expected: float, question) -> bool:
    found = NUMBER.findall(answer)
    if not found:
        return False
    return math.isclose(float(found[-1].replace(",", "")), expected, rel_tol=1e-6, abs_tol=1e-9)


def chosen_letter(answer: str, choices: list[str] | None) -> str | None:
    """The option an answer picks: a letter it starts with ('B', 'B)', '(B) ...', 'B. Paris'), or names after
    'answer', else the option whose text it mentions first, else a letter in parentheses anywhere."""
    letters = LETTERS[: len(choices)] if choices else LETTERS
    text = answer.strip()
    for pattern in (rf"^\(?([{letters}])(?:[.):]|\s*$)", rf"(?i:answer)(?:\s+is)?\s*:?\s*\(?([{letters}])\b"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    if choices:
        positions = [(text.casefold().find(c.casefold()), i) for i, c in enumerate(choices)]
        mentioned = [(position, i) for position, i in positions if position >= 0]
        if mentioned:
            return LETTERS[min(mentioned)[1]]
    found = re.search(rf"\(([{letters}])\)", text)
    return found.group(1) if found else None


def _choice(answer: str, expected: str, question) -> bool:
    return chosen_letter(answer, question.choices) == expected


_MATCHERS = {"exact": _exact, "contains": _contains, "regex": _regex, "number": _number_matches, "choice": _choice}


def answer_questions(target, questions: list[Question], batch_size: int, sampling, use_adapter: bool = True) -> dict:
    """Greedy answers in batches of similar length; returns accuracy and every row's answer and result."""
    import time

    from lora_cli.generate import complete_batch, encode

    encoded = [encode(target, q.prompt) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]), reverse=True)  # little padding per batch
    answers = [None] * len(questions)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        done = complete_batch(target, [questions[i].prompt for i in chunk], [encoded[i] for i in chunk], sampling,
                              use_adapter)
        for i, completion in zip(chunk, done):
            answers[i] = completion
    seconds = time.perf_counter() - started
    rows = [{**q.to_json(), "answer": a.text, "correct": q.is_correct(a.text)} for q, a in zip(questions, answers)]
    correct = sum(row["correct"] for row in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "questions": len(rows),
            "answer_tokens": sum(a.completion_tokens for a in answers), "seconds": round(seconds, 2), "rows": rows}
