"""A built-in task for small real models: arithmetic word problems with one- and two-digit numbers.

    data.train = "builtin:arithmetic/train"     data.eval = "builtin:arithmetic/eval"

Each problem is a one- or two-step story ("Maya has 34 stickers. Maya gives away 12 of them. How
many stickers does Maya have left?") whose answer is a non-negative integer. The stories come
from a few templates (addition, subtraction, a one-digit multiplication, and a two-step mix of
them); names, objects and numbers are drawn from a seeded generator, so the sets are unlimited,
reproducible, and need no download. A problem's split is a fixed hash of its text: held-out
problems never occur in training.

Why this task: SmolLM2-135M-Instruct answers such problems right about a quarter of the time at
the first attempt, greedy (with three-digit numbers under 2 %, so those are left out): far from
both 0 and 100 %, so a second attempt has room to fix wrong answers and to break right ones,
which is what the SCoRe table measures. The answers are integers,
checked by `reward.kind = "integer"` (rewards/integer_reward.py), which reads the paper's
"The final answer is N" and falls back to the last number of the reply: a 135M model does not
keep to an answer format. The prompts of that kind (prompts.py, INTEGER_*) are the paper's with
that answer format.
"""

from __future__ import annotations

import random
import zlib

from .data import Problem

SPLITS = ("train", "eval")
SOURCE_PREFIX = "builtin:arithmetic/"
# Problems per split a `builtin:arithmetic/SPLIT` source holds.
SPLIT_SIZE = {"train": 4096, "eval": 512}

_NAMES = ("Maya", "Liam", "Sofia", "Noah", "Emma", "Omar", "Aisha", "Lucas", "Mei", "Ivan", "Zara", "Tom")
_THINGS = ("stickers", "marbles", "apples", "books", "coins", "stamps", "shells", "cards", "pencils", "beads")


def _add(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return f"{name} has {a} {thing}. {name} finds {b} more. How many {thing} does {name} have now?", a + b


def _subtract(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(6, 40)
    b = rng.randint(1, a - 1)
    return f"{name} has {a} {thing}. {name} gives away {b} of them. How many {thing} does {name} have left?", a - b


def _multiply(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    boxes, each = rng.randint(2, 6), rng.randint(2, 10)
    return f"{name} has {boxes} boxes with {each} {thing} in each box. How many {thing} does {name} have?", boxes * each


def _two_steps(rng: random.Random) -> tuple[str, int]:
    name, friend, thing = *rng.sample(_NAMES, 2), rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} has {a} {thing} and {friend} gives {name} {b} more. Then {name} uses {c} of them. "
        f"How many {thing} does {name} have now?",
        a + b - c,
    )


_TEMPLATES = (_add, _subtract, _multiply, _two_steps)


def split_of(question: str) -> str:
    """'eval' for one problem in eight (a fixed hash of its text), else 'train'."""
    return "eval" if zlib.crc32(question.encode()) % 8 == 0 else "train"


def problems(n: int, split: str, seed: int = 0) -> list[Problem]:
    """`n` distinct problems of one split, reproducible from `seed`; templates in turn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"arithmetic-{split}-{seed}")
    seen, out = set(), []
    while len(out) < n:
        question, answer = _TEMPLATES[len(out) % len(_TEMPLATES)](rng)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        out.append(Problem(id=f"arith-{split}-{len(out)}", question=question, answer=str(answer)))
    return out


def is_source(path: str) -> bool:
    return isinstance(path, str) and path.startswith(SOURCE_PREFIX)


def load_source(path: str) -> list[Problem]:
    """The problems of `builtin:arithmetic/SPLIT` (SPLIT_SIZE of them, seed 0)."""
    split = path.removeprefix(SOURCE_PREFIX)
    if split not in SPLITS:
        raise ValueError(f"data source {path!r}: the split must be one of {SPLITS}, e.g. {SOURCE_PREFIX}train")
    return problems(SPLIT_SIZE[split], split)
