"""The one exception type for problems a user can fix.

The CLI prints its message as one paragraph and exits with code 2, without a traceback.
Anything else that escapes is a bug in lora and keeps its traceback.
"""

import difflib


class LoraError(Exception):
    """A problem with the user's input (recipe, data, folders, arguments), explained for people."""


def first_line(error: Exception) -> str:
    """A library exception's first line, for our one-paragraph messages (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def did_you_mean(name: str, choices) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
