"""The embedded demo's task: the last digit of a sum of four digits, with checkable answers.

Why this task: there are two ways to answer, and the demo measures how good each is before any RL
(`headroom` in demo.py). A *direct* answer (`\\boxed{4}` for "last digit of 7+5+3+9") asks a tiny
decoder for a sum modulo 10 in one pass; on problems it has never seen it does no better than a
guess (modular sums are parity-like: memorised cases do not generalise). A *worked* answer
(`Work: 7+5=2, 2+3=5, 5+9=4. \\boxed{4}`, a running last digit, each step one lookup of two digits)
it computes reliably. Attempt 1's token budget holds only a direct answer, attempt 2's holds a
worked one, so a second attempt *can* beat the first: that is the headroom SCoRe may learn to use.

The supervised warm-up data (`warmup_example`) makes a base model that answers attempt 1 directly
and self-corrects badly, like the paper's base model: its two-attempt traces show a careless second
attempt that mostly restates attempt 1 or re-guesses a nearby digit (re-guesses of a right answer are
wrong, so the base model breaks right answers) and only sometimes works the sum out. Worked answers
are also shown on their own, asked for by a cue (`WORKED_CUE`) that RL prompts never contain, so the
skill is there while the plain prompt keeps meaning "answer directly". SCoRe then has to learn from
the reward alone that attempt 2 should work the problem out. Nothing here knows about the trainer;
answers are checked by `check_answer` (exact match of the final `\\boxed{}` answer, the same
extraction as the rewards).

Held-out problems (`split == "eval"`) are disjoint from every training and warm-up problem: a
problem's split is a fixed function of its operands.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .data import Problem
from .rewards.math_reward import extract_final_answer

OPERANDS = 4
LOW, HIGH = 0, 9
TASK = f"the last digit of a sum of {OPERANDS} digits"
# The first words of the two answer paths (demo.py forces a path by appending them to a context).
DIRECT_PREFIX = "\\boxed{"
QUESTION_PREFIX = "last digit of "
# Worked answers shown on their own are asked for by this cue, so that the plain prompt keeps
# meaning "answer directly" (attempt 1's budget holds nothing else).
WORKED_CUE = "work out the "
WORKED_PREFIX = "Work: "
# Warm-up mixture: direct answers alone, worked answers alone (after WORKED_CUE), two-attempt
# traces (the rest).
DIRECT, WORKED = 0.25, 0.15
# What the warm-up traces' second attempts do (fractions of traces; see the module docstring).
RESTATE, REGUESS = 0.50, 0.30  # the rest recompute (a worked answer)
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

    Pieces: [question, attempt1] or [question, attempt1, attempt2] (the prompt and instruction
    around them are added token-in-token-out by the caller's PromptBuilder)."""

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


def question_text(operands: tuple[int, ...]) -> str:
    return QUESTION_PREFIX + "+".join(map(str, operands))


def make_problem(operands: tuple[int, ...]) -> Problem:
    question = question_text(operands)
    return Problem(
        id=f"sum-{'-'.join(map(str, operands))}",
        question=question,
        answer=str(sum(operands) % 10),
        meta={"operands": list(operands)},
    )


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
    return f"{DIRECT_PREFIX}{value}}}"


def worked_solution(operands: tuple[int, ...]) -> str:
    """Running last digits: 7+5+3+9 -> 'Work: 7+5=2, 2+3=5, 5+9=4. \\boxed{4}'."""
    steps, acc = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{acc}+{x}={(acc + x) % 10}")
        acc = (acc + x) % 10
    return WORKED_PREFIX + ", ".join(steps) + ". " + direct_answer(acc)


def near_miss(value: int, rng: random.Random) -> int:
    """A plausible wrong last digit: one or two off."""
    while True:
        wrong = (value + rng.choice((-2, -1, 1, 2))) % 10
        if wrong != value:
            return wrong


def check_answer(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer`, else 0.0."""
    found = extract_final_answer(completion)
    return 1.0 if found is not None and found.strip() == answer.strip() else 0.0


def warmup_example(rng: random.Random) -> WarmupExample:
    """One warm-up sequence: a direct answer, a worked answer, or a two-attempt trace with a careless
    second attempt (module docstring)."""
    operands = sample_operands(rng, "train")
    question, total = question_text(operands), sum(operands) % 10
    u = rng.random()
    if u < DIRECT:
        return WarmupExample(question, (direct_answer(total),), (True,))
    if u < DIRECT + WORKED:
        return WarmupExample(WORKED_CUE + question, (worked_solution(operands),), (True,))
    first_right = rng.random() >= WRONG_FIRST_ATTEMPT
    first = total if first_right else near_miss(total, rng)
    u = rng.random()
    if u < RESTATE:
        second = direct_answer(first)
    elif u < RESTATE + REGUESS:  # right answers get broken, wrong ones rarely fixed
        if first_right:
            second = direct_answer(near_miss(total, rng))
        else:
            second = direct_answer(total if rng.random() < 0.25 else near_miss(first, rng))
    else:
        second = worked_solution(operands)
    return WarmupExample(question, (direct_answer(first), second), (first_right, True))


def tokenizer_corpus(n: int, seed: int) -> list[str]:
    """Texts covering every string the demo ever encodes (for training its BPE tokenizer)."""
    rng = random.Random(f"demo-tokenizer-{seed}")
    # The fixed texts are repeated so that BPE merges them into few tokens (short contexts are fast).
    texts = [
        CORRECTION_INSTRUCTION,
        "Problem:\n",
        "\n\nSolution:\n",
        DIRECT_PREFIX,
        WORKED_PREFIX,
        QUESTION_PREFIX,
        WORKED_CUE,
    ] * max(1, n // 4)
    for _ in range(n):
        ex = warmup_example(rng)
        texts.append(ex.question)
        texts.extend(ex.attempts)
    return texts
