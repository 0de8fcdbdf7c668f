"""Integer answers, read robustly from a small model's free-form reply.

`extract_integer(text)` takes, in order: the number after the last "final answer is" (the paper's
format), the number in the last `\\boxed{}`, the number after the last "answer is" / "answer:",
and otherwise the last number of the reply. Numbers may carry thousands separators ("1,234") and
a sign; a decimal with a non-zero fraction is not an integer answer ("12.5" gives None, "12.0"
gives 12). `integer_reward` is 1.0 when that number equals the reference.
"""

from __future__ import annotations

import re

from ..data import last_boxed

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.])-?\d+(?:\.\d+)?")
_MARKERS = (
    re.compile(r"final answer is", re.IGNORECASE),
    None,  # the last \boxed{}
    re.compile(r"answer\s*(?:is|:)", re.IGNORECASE),
)


def _as_integer(number: str) -> int | None:
    whole, _, fraction = number.replace(",", "").partition(".")
    if fraction.strip("0"):
        return None
    return int(whole)


def _first_number(text: str) -> int | None:
    match = _NUMBER.search(text)
    return None if match is None else _as_integer(match.group())


def extract_integer(text: str) -> int | None:
    if not isinstance(text, str):
        raise ValueError(f"extract_integer expects a str, got {type(text).__name__}")
    for marker in _MARKERS:
        if marker is None:
            boxed = last_boxed(text)
            if boxed is not None and (value := _first_number(boxed)) is not None:
                return value
            continue
        found = list(marker.finditer(text))
        if found and (value := _first_number(text[found[-1].end() :][:40])) is not None:
            return value
    numbers = _NUMBER.findall(text)
    return _as_integer(numbers[-1]) if numbers else None


def integer_reward(completion: str, answer: str) -> float:
    """1.0 when the reply's integer answer equals `answer` (an integer string), else 0.0."""
    found = extract_integer(completion)
    return 1.0 if found is not None and found == int(answer) else 0.0
