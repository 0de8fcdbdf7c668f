"""The embedded demo's task: add four numbers from 10 to 29, with checkable integer answers.

Why this task: a tiny decoder trained for a minute from scratch answers `a+b+c+d` *directly* only
part of the time (the digits of the total need several additions with carries in one pass), while
it sums a handful of single digits reliably. So a second attempt has room to be better than the
first if it works column by column ("7+5+3+9=24, 2+1+1+2+1=7. \\boxed{74}" for 17+15+23+19), and the
question is whether RL finds that and learns when to change an answer.

The supervised warm-up data (`warmup_example`) makes a base model that answers attempt 1 directly
and self-corrects badly, like the paper's base model: its two-attempt traces show a careless second
attempt that mostly restates or re-guesses an answer (re-guesses of a right answer are wrong, so
the base model breaks right answers), and only sometimes works column by column. SCoRe then has to
learn, from the reward alone, when and how to change the answer. Nothing here knows about the
trainer; answers are checked by `check_answer` (exact match of the final `\\boxed{}` answer, the
same extraction the math reward uses).

Held-out problems (`split == "eval"`) are disjoint from every training and warm-up problem: a
problem's split is a fixed function of its operands.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .data import Problem
from .math_reward import extract_final_answer

OPERANDS = 4
LOW, HIGH = 10, 29
# Warm-up mixture: sums of single digits (the skill a column-wise attempt needs), direct answers
# to the task, two-attempt traces (the rest).
DIGIT_SUMS, DIRECT = 0.30, 0.20
# What the warm-up traces' second attempts do (fractions of traces; see the module docstring).
RESTATE, REGUESS, RECOMPUTE = 0.40, 0.25, 0.35
# Chance that a trace's attempt 1 is wrong (the wrong attempt is shown, never trained on).
WRONG_FIRST_ATTEMPT = 0.5
# Correction instruction of the demo: the paper's, minus the answer-format sentence (the demo's
# answers are \boxed{}); like the paper's, it does not say whether attempt 1 was right.
CORRECTION_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution."
)


@dataclass(frozen=True)
class WarmupExample:
    """One supervised sequence as text pieces; `trained[i]` says whether piece i carries loss.

    Pieces: [question] or [question, attempt1, attempt2] (the prompt and instruction around them
    are added token-in-token-out by the caller's PromptBuilder)."""

    question: str
    attempts: tuple[str, ...]
    trained: tuple[bool, ...]


def split_of(operands: tuple[int, ...]) -> str:
    """'eval' for one problem in eight (a fixed hash of the operands), else 'train'."""
    return "eval" if zlib.crc32(",".join(map(str, operands)).encode()) % 8 == 0 else "train"


def sample_operands(rng: random.Random, split: str) -> tuple[int, ...]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    while True:
        operands = tuple(rng.randint(LOW, HIGH) for _ in range(OPERANDS))
        if split_of(operands) == split:
            return operands


def make_problem(operands: tuple[int, ...]) -> Problem:
    question = "+".join(str(x) for x in operands)
    return Problem(id=f"sum-{'-'.join(map(str, operands))}", question=question, answer=str(sum(operands)),
                   meta={"operands": list(operands)})


def problems(n: int, split: str, seed: int) -> list[Problem]:
    """`n` distinct problems of one split, reproducible from `seed`."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"demo-{split}-{seed}")
    seen, out = set(), []
    while len(out) < n:
        operands = sample_operands(rng, split)
        if operands not in seen:
            seen.add(operands)
            out.append(make_problem(operands))
    return out


def direct_answer(value: int) -> str:
    return f"\\boxed{{{value}}}"


def worked_solution(operands: tuple[int, ...]) -> str:
    """Column addition, units then tens (with the carry), then the boxed total:
    17+45+32 -> '7+5+2=14, 1+1+4+3=9. \\boxed{94}'. Each step sums single digits."""
    units = [x % 10 for x in operands]
    tens = [x // 10 for x in operands]
    unit_sum = sum(units)
    carry = unit_sum // 10
    tens_sum = carry + sum(tens)
    steps = [f"{'+'.join(map(str, units))}={unit_sum}", f"{'+'.join(map(str, [carry] + tens))}={tens_sum}"]
    return ", ".join(steps) + ". " + direct_answer(sum(operands))


def near_miss(value: int, rng: random.Random) -> int:
    """A plausible wrong total: a carry or a digit off."""
    while True:
        wrong = value + rng.choice((-20, -10, -2, -1, 1, 2, 10, 20))
        if wrong > 0:
            return wrong


def check_answer(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer`, else 0.0."""
    found = extract_final_answer(completion)
    return 1.0 if found is not None and found.strip() == answer.strip() else 0.0


def warmup_example(rng: random.Random) -> WarmupExample:
    """One warm-up sequence: digit sums (the skill a column-wise attempt needs), direct answers to the
    task, and two-attempt traces with careless second attempts."""
    u = rng.random()
    if u < DIGIT_SUMS:
        while True:  # a digit sum may itself be a task problem: never one of the held-out split
            digits = tuple(rng.randint(0, 9) for _ in range(rng.randint(OPERANDS, OPERANDS + 1)))
            if len(digits) != OPERANDS or min(digits) < LOW or split_of(digits) == "train":
                break
        return WarmupExample("+".join(map(str, digits)), (direct_answer(sum(digits)),), (True,))
    operands = sample_operands(rng, "train")
    question, total = "+".join(map(str, operands)), sum(operands)
    if u < DIGIT_SUMS + DIRECT:
        return WarmupExample(question, (direct_answer(total),), (True,))
    first_right = rng.random() >= WRONG_FIRST_ATTEMPT
    first = total if first_right else near_miss(total, rng)
    u = rng.random()
    if u < RECOMPUTE:
        second = worked_solution(operands)
    elif u < RECOMPUTE + RESTATE:
        second = direct_answer(first)
    else:  # a careless re-guess: right answers get broken, wrong ones rarely fixed
        if first_right:
            second = direct_answer(near_miss(total, rng))
        else:
            second = direct_answer(total if rng.random() < 0.25 else near_miss(first, rng))
    return WarmupExample(question, (direct_answer(first), second), (first_right, True))


def tokenizer_corpus(n: int, seed: int) -> list[str]:
    """Texts covering every string the demo ever encodes (for training its BPE tokenizer)."""
    rng = random.Random(f"demo-tokenizer-{seed}")
    # The fixed texts are repeated so that BPE merges them into few tokens (short contexts are fast).
    texts = [CORRECTION_INSTRUCTION, "Problem:\n", "\n\nSolution:\n"] * max(1, n // 4)
    for _ in range(n):
        ex = warmup_example(rng)
        texts.append(ex.question)
        texts.extend(ex.attempts)
    return texts
