"""The embedded demo's task: the last digit of a sum of four digits, with checkable answers.

Why this task: there are two ways to answer, and the demo measures how good each is before any RL
(`headroom` in measure.py). A *direct* answer (`\\boxed{4}` for "last digit of 7+5+3+9") asks a tiny
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

Two settings (`SETTINGS`, `WarmupMix`). In `recall` (the demo's default) RL trains on 32 problems
the base model half-remembers (the warm-up shows each with its right answer half the time and with
one wrong answer otherwise), so attempt 1 *can* be learned on the training problems while on
held-out ones it stays a guess, and the warm-up teaches how to go on with a worked attempt 2 but
rarely shows one started, so the base model seldom chooses it. That is where the paper's collapse
can happen: on the training problems "learn attempt 1, then restate it" earns as much as "work it
out", and only the held-out problems tell them apart. In `guess` RL trains on 4,000 problems and
attempt 1 is a guess on every one of them: there is nothing to collapse to.

Held-out problems (`split == "eval"`) are disjoint from every training and warm-up problem: a
problem's split is a fixed function of its operands.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ..data import Problem
from ..rewards.math_reward import extract_final_answer

OPERANDS = 4
LOW, HIGH = 0, 9
TASK = f"the last digit of a sum of {OPERANDS} digits"
# The first words of the two answer paths (measure.py forces a path by appending them to a context).
DIRECT_PREFIX = "\\boxed{"
QUESTION_PREFIX = "last digit of "
# Worked answers shown on their own are asked for by this cue, so that the plain prompt keeps
# meaning "answer directly" (attempt 1's budget holds nothing else).
WORKED_CUE = "work out the "
WORKED_PREFIX = "Work: "
# Correction instruction of the demo: the paper's, minus the answer-format sentence (the demo's
# answers are \boxed{}); like the paper's, it does not say whether attempt 1 was right.
CORRECTION_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution."
)


@dataclass(frozen=True)
class WarmupMix:
    """What the supervised warm-up shows, as fractions of its sequences.

    `direct`, `worked`: direct answers alone, worked answers alone (after WORKED_CUE); the rest are
    two-attempt traces, whose second attempt restates attempt 1 (`restate`), re-guesses a nearby digit
    (`reguess`) or works the sum out (the rest); `wrong_first`: chance that a trace's attempt 1 is
    wrong (shown, never trained on). `worked_start`: share of the traces' worked second attempts whose
    first words (WORKED_PREFIX) carry loss; the others teach how to go on with a worked attempt 2, not
    when to start one, so the base model can work a sum out in attempt 2 yet seldom chooses to.
    `recall`: share of the direct answers that are about the recall set (run.py passes the RL
    training problems), so that attempt 1 on those problems can be learned while on held-out problems
    it stays a guess; `recall_right`: share of those answers that are right, the others being the
    problem's one remembered wrong answer (`misremembered`). `slip`: chance that a step of a shown
    worked answer is a near miss (the answer follows from it), so that a sampled worked answer is
    sometimes wrong while the most likely one is right."""

    direct: float = 0.25
    worked: float = 0.15
    restate: float = 0.50
    reguess: float = 0.30
    wrong_first: float = 0.5
    worked_start: float = 1.0
    recall: float = 0.0
    recall_right: float = 1.0
    slip: float = 0.0

    def __post_init__(self):
        names = (
            "direct",
            "worked",
            "restate",
            "reguess",
            "wrong_first",
            "worked_start",
            "recall",
            "recall_right",
            "slip",
        )
        for name in names:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WarmupMix.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.direct + self.worked > 1.0 or self.restate + self.reguess > 1.0:
            raise ValueError(f"WarmupMix fractions add up to more than 1: {self}")


@dataclass(frozen=True)
class DemoSetting:
    """What the demo's base model is shown in its warm-up (`mix`), how many training problems RL
    trains on (the warm-up's recall set when `mix.recall` > 0) and how many of them an RL step takes."""

    mix: WarmupMix
    train_problems: int
    prompts_per_step: int
    about: str


SETTINGS = {
    # Attempt 1 can be learned on the training problems (the base model half-remembers each: its
    # right answer and one wrong one) but not on held-out ones, and the base model's attempt 2 seldom
    # works a sum out: multi-turn RL can collapse (PAPER.md section 5). Every step takes all 32
    # problems: twice the samples of `guess`, so that Stage I finds the worked answer on every seed.
    "recall": DemoSetting(
        WarmupMix(worked_start=0.08, recall=1.0, recall_right=0.5),
        32,
        32,
        "32 training problems the base model half-remembers",
    ),
    # Attempt 1 is a guess on every problem, seen or not: nothing to collapse to.
    "guess": DemoSetting(WarmupMix(), 4000, 16, "4,000 training problems, attempt 1 a guess on each"),
}
DEFAULT_SETTING = "recall"


@dataclass(frozen=True)
class WarmupExample:
    """One supervised sequence as text pieces; `trained[i]` says whether piece i carries loss, except
    for `untrained_start`, the first words of the last attempt, which carry none when given.

    Pieces: [question, attempt1] or [question, attempt1, attempt2] (the prompt and instruction
    around them are added token-in-token-out by the caller's PromptBuilder)."""

    question: str
    attempts: tuple[str, ...]
    trained: tuple[bool, ...]
    untrained_start: str = ""


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


def worked_solution(operands: tuple[int, ...], slip: float = 0.0, rng: random.Random | None = None) -> str:
    """Running last digits: 7+5+3+9 -> 'Work: 7+5=2, 2+3=5, 5+9=4. \\boxed{4}'. With `slip` > 0 each
    step's result is a near miss with that chance (drawn from `rng`), and the sum goes on from it."""
    steps, acc = [], operands[0]
    for x in operands[1:]:
        result = (acc + x) % 10
        if slip and rng.random() < slip:
            result = near_miss(result, rng)
        steps.append(f"{acc}+{x}={result}")
        acc = result
    return WORKED_PREFIX + ", ".join(steps) + ". " + direct_answer(acc)


def near_miss(value: int, rng: random.Random) -> int:
    """A plausible wrong last digit: one or two off."""
    while True:
        wrong = (value + rng.choice((-2, -1, 1, 2))) % 10
        if wrong != value:
            return wrong


def misremembered(operands: tuple[int, ...]) -> int:
    """The one wrong last digit remembered for a recall problem: one or two off, fixed by its operands."""
    offset = (-2, -1, 1, 2)[zlib.crc32(("wrong:" + ",".join(map(str, operands))).encode()) % 4]
    return (sum(operands) + offset) % 10


def check_answer(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer`, else 0.0."""
    found = extract_final_answer(completion)
    return 1.0 if found is not None and found.strip() == answer.strip() else 0.0


def warmup_example(
    rng: random.Random, mix: WarmupMix = WarmupMix(), recall: tuple[tuple[int, ...], ...] = ()
) -> WarmupExample:
    """One warm-up sequence: a direct answer, a worked answer, or a two-attempt trace with a careless
    second attempt (module docstring); direct answers are about `recall` with chance `mix.recall`."""
    if mix.recall and not recall:
        raise ValueError("WarmupMix.recall > 0 needs the recall problems")
    operands = sample_operands(rng, "train")
    question, total = question_text(operands), sum(operands) % 10
    u = rng.random()
    if u < mix.direct:
        if mix.recall and rng.random() < mix.recall:
            operands = recall[rng.randrange(len(recall))]
            question, total = question_text(operands), sum(operands) % 10
            if mix.recall_right < 1.0 and rng.random() >= mix.recall_right:
                total = misremembered(operands)
        return WarmupExample(question, (direct_answer(total),), (True,))
    if u < mix.direct + mix.worked:
        return WarmupExample(WORKED_CUE + question, (worked_solution(operands, mix.slip, rng),), (True,))
    first_right = rng.random() >= mix.wrong_first
    first = total if first_right else near_miss(total, rng)
    u = rng.random()
    if u < mix.restate:
        second = direct_answer(first)
    elif u < mix.restate + mix.reguess:  # right answers get broken, wrong ones rarely fixed
        if first_right:
            second = direct_answer(near_miss(total, rng))
        else:
            second = direct_answer(total if rng.random() < 0.25 else near_miss(first, rng))
    else:
        second = worked_solution(operands, mix.slip, rng)
        if mix.worked_start < 1.0 and rng.random() >= mix.worked_start:
            return WarmupExample(question, (direct_answer(first), second), (first_right, True), WORKED_PREFIX)
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
