"""GRPO's reward functions: the built-in ones a recipe names, and the user's own (`rewards: [my_rewards.py:fn]`).

TRL ships think_format and the repetition penalty, used as they are. exact_match is ours: TRL's accuracy_reward
needs the math_verify package and LaTeX answers, while most tasks with a known answer (a number, a word, a label)
only need the completion's final answer compared with the row's `answer` column.

A reward function is called by TRL's GRPOTrainer with the prompts, the completions (strings, or one-message lists
for conversational data), the completion token ids and every other column of the dataset as keyword lists, and
returns one float per completion. Only the standard library is imported at the top: recipe.py reads
BUILTIN_REWARDS before anything heavy loads.
"""

import importlib.util
import re
import sys
from pathlib import Path

from lora_cli.errors import LoraError

BUILTIN_REWARDS = ("exact_match", "think_format", "repetition_penalty")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_MARKERS = re.compile(r"(?:####|answer\s*(?:is)?\s*[:=]?|\\boxed\{)\s*", re.IGNORECASE)


def completion_text(completion) -> str:
    """A completion as text: conversational completions are a list with one assistant message."""
    if isinstance(completion, list):
        return "".join(message.get("content") or "" for message in completion if isinstance(message, dict))
    return str(completion)


def final_answer(text: str) -> str:
    """The completion's final answer: what follows the last answer marker (####, 'answer:', \\boxed{), else its
    last number, else its last line; lower-cased, without surrounding punctuation and thousands separators."""
    markers = list(ANSWER_MARKERS.finditer(text))
    if markers:
        text = text[markers[-1].end():].strip().splitlines()[0] if text[markers[-1].end():].strip() else ""
        text = text.rstrip("}")
    else:
        numbers = NUMBER.findall(text)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = numbers[-1] if numbers else (lines[-1] if lines else "")
    return normalise(text)


def normalise(text: str) -> str:
    text = str(text).strip().lower().strip(" .,;:!?\"'`*$")
    return text.replace(",", "") if NUMBER.fullmatch(text) else text


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion's final answer equals the row's `answer` column (final_answer, normalised), else 0."""
    return [float(final_answer(completion_text(c)) == normalise(a)) for c, a in zip(completions, answer)]


def builtin(name: str):
    if name == "exact_match":
        return exact_match
    if name == "think_format":
        from trl.rewards import think_format_reward

        return think_format_reward
    from trl.rewards import get_repetition_penalty_reward

    penalty = get_repetition_penalty_reward()
    penalty.__name__ = "repetition_penalty"  # GRPOTrainer logs each reward under its function's name
    return penalty


def load_reward_functions(entries: list[str], say=print) -> list:
    """The recipe's resolved `rewards` entries as functions. A user's file is imported, which runs its code: that is
    said before it happens."""
    functions = []
    for entry in entries:
        if entry in BUILTIN_REWARDS:
            functions.append(builtin(entry))
            continue
        file_name, name = entry.rsplit(":", 1)
        path = Path(file_name)
        say(f"rewards: importing {path} for {name}(): this runs the code in that file, as Python, on this machine.")
        module_name = f"lora_rewards_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so pickling (dataloader workers) and tracebacks find it
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise LoraError(f"rewards: importing {path} failed: {type(e).__name__}: {e}") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise LoraError(f"rewards: {path} has no function '{name}' once imported.")
        functions.append(function)
    return functions
