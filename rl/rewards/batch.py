"""Batch reward functions selected by `reward.kind`: texts + problems -> binary rewards.

- "math": the final answer (`Final Answer: The final answer is X`, else the last `\\boxed{}`) equals
  the reference by math-verify, graded in worker processes (parse failures and timeouts give 0 and
  are counted by the grader, never crash a step);
- "exact": the same final-answer extraction, compared as a string (procedural tasks with canonical
  answers, e.g. the demo; no sympy in the loop);
- "integer": an integer answer read robustly from free-form text (integer_reward.py: the paper's
  "The final answer is N", else the last number), equal to the reference (procedural arithmetic
  for small real models);
- "code": every unit test of the problem passes in the sandbox (`problem.meta["code"]` holds the
  HumanEval/MBPP problem dict).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..data import Problem
from .integer_reward import extract_integer, integer_reward
from .math_reward import MathGrader, extract_final_answer

KINDS = ("math", "exact", "integer", "code")
RewardFn = Callable[[Sequence[str], Sequence[Problem]], list]


def exact_answer_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer` (surrounding spaces ignored)."""
    found = extract_final_answer(completion)
    return 1.0 if found is not None and found.strip() == answer.strip() else 0.0


def answer_reader(reward_fn) -> Callable[[str], str | None]:
    """How `reward_fn` reads a final answer (BatchReward.answer_of), for logs and eval records; any
    other callable gets the paper's extraction."""
    return getattr(reward_fn, "answer_of", extract_final_answer)


class BatchReward:
    """Callable `(texts, problems) -> list[float]`; `close()` stops grading workers."""

    def __init__(self, kind: str, *, timeout_s: float = 5.0, workers: int = 1, memory_mb: int = 1024):
        if kind not in KINDS:
            raise ValueError(f"reward kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._grader = MathGrader(workers=workers, timeout_s=timeout_s) if kind == "math" else None

    def __call__(self, texts: Sequence[str], problems: Sequence[Problem]) -> list:
        if len(texts) != len(problems):
            raise ValueError(f"got {len(texts)} completions for {len(problems)} problems")
        if self.kind == "exact":
            return [exact_answer_reward(t, p.answer) for t, p in zip(texts, problems, strict=True)]
        if self.kind == "integer":
            return [integer_reward(t, p.answer) for t, p in zip(texts, problems, strict=True)]
        if self.kind == "math":
            return [float(r) for r in self._grader.grade(list(texts), [p.answer for p in problems])]
        from .code_reward import code_rewards  # the sandbox is only started for code runs

        missing = [p.id for p in problems if "code" not in p.meta]
        if missing:
            raise ValueError(
                f"code rewards need problem.meta['code'] (a HumanEval/MBPP dict); missing for {missing[:3]}"
            )
        return [
            float(r)
            for r in code_rewards(
                list(texts), [p.meta["code"] for p in problems], timeout_s=self.timeout_s, memory_mb=self.memory_mb
            )
        ]

    def answer_of(self, text: str) -> str | None:
        """The final answer this reward reads from `text` (None: none found), for logs and records."""
        if self.kind == "integer":
            value = extract_integer(text)
            return None if value is None else str(value)
        return extract_final_answer(text)

    def close(self) -> None:
        if self._grader is not None:
            self._grader.close()
            self._grader = None
