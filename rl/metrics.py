"""Two-attempt self-correction metrics (Acc@t1, Acc@t2, Δ, Δi→c, Δc→i) and a table like the paper's.

- acc_t1, acc_t2: accuracy of attempt 1 and attempt 2.
- delta = acc_t2 - acc_t1; delta_i2c: fraction of ALL problems wrong at t1 and right at t2;
  delta_c2i: right at t1, wrong at t2. delta is computed as delta_i2c - delta_c2i, so that identity
  holds bit for bit (and delta equals acc_t2 - acc_t1 up to float rounding, since the integer counts
  satisfy #c2 - #c1 == #i2c - #c2i).
- changed_frac: fraction of problems whose attempt-2 final answer differs from attempt 1's (the
  paper's "frequency of proposing a different answer"); answers are compared as stripped strings,
  a missing answer (None) differs from any present one. None when answers are not given.
- edit_ratio: mean over problems of lev(y1, y2) / (|y1| + |y2|) on CHARACTERS (the paper does not say
  whether characters or tokens; characters make the figure independent of the tokenizer). 0 for two
  empty texts. None when texts are not given.

All values are fractions in [0, 1] (delta in [-1, 1]); `format_table` prints percentages.
Rewards must be binary (0 or 1), as the paper's oracle rewards are.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

TABLE_COLUMNS = (
    ("acc_t1", "Acc@t1"),
    ("acc_t2", "Acc@t2"),
    ("delta", "Δ(t1,t2)"),
    ("delta_i2c", "Δi→c"),
    ("delta_c2i", "Δc→i"),
)


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute; unit costs).

    Bit-parallel (Myers 1999, in Hyyrö's formulation for edit distance): one column of the DP table is
    held as +1/-1 vertical-delta bit vectors over the characters of `a` in Python ints, so each
    character of `b` costs a handful of big-int operations instead of len(a) cell updates.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise ValueError(f"levenshtein expects two str, got {type(a).__name__} and {type(b).__name__}")
    if not a or not b:
        return len(a) + len(b)
    match_masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        match_masks[ch] = match_masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    last = 1 << (len(a) - 1)
    plus_v, minus_v, distance = full, 0, len(a)
    for ch in b:
        eq = match_masks.get(ch, 0)
        x_v = eq | minus_v
        x_h = (((eq & plus_v) + plus_v) ^ plus_v) | eq
        plus_h = minus_v | (~(x_h | plus_v) & full)
        minus_h = plus_v & x_h
        if plus_h & last:
            distance += 1
        elif minus_h & last:
            distance -= 1
        plus_h = ((plus_h << 1) | 1) & full  # row 0 of the table grows by 1 per column
        minus_h = (minus_h << 1) & full
        plus_v = minus_h | (~(x_v | plus_h) & full)
        minus_v = plus_h & x_v
    return distance


def edit_distance_ratio(a: str, b: str) -> float:
    """lev(a, b) / (|a| + |b|) in characters: 0 for identical texts, 1 when nothing is shared."""
    total = len(a) + len(b)
    return levenshtein(a, b) / total if total else 0.0


def two_attempt_metrics(
    r1: Sequence[float],
    r2: Sequence[float],
    answers1: Sequence[str | None] | None = None,
    answers2: Sequence[str | None] | None = None,
    texts1: Sequence[str] | None = None,
    texts2: Sequence[str] | None = None,
) -> dict:
    """Paper metrics over n problems from per-problem binary rewards (and optionally answers/texts)."""
    c1, c2 = _binary("r1", r1), _binary("r2", r2)
    n = len(c1)
    if n == 0:
        raise ValueError("two_attempt_metrics needs at least one problem (r1 is empty)")
    if len(c2) != n:
        raise ValueError(f"r1 and r2 differ in length: {n} vs {len(c2)}")
    n_c1, n_c2 = sum(c1), sum(c2)
    n_i2c = sum(1 for a, b in zip(c1, c2, strict=True) if not a and b)
    n_c2i = sum(1 for a, b in zip(c1, c2, strict=True) if a and not b)
    metrics = {
        "acc_t1": n_c1 / n,
        "acc_t2": n_c2 / n,
        "delta": n_i2c / n - n_c2i / n,
        "delta_i2c": n_i2c / n,
        "delta_c2i": n_c2i / n,
        "changed_frac": None,
        "edit_ratio": None,
        "n": n,
    }
    if (answers1 is None) != (answers2 is None):
        raise ValueError("give both answers1 and answers2, or neither")
    if answers1 is not None:
        _same_length("answers1", answers1, n)
        _same_length("answers2", answers2, n)
        metrics["changed_frac"] = (
            sum(_normalized(a) != _normalized(b) for a, b in zip(answers1, answers2, strict=True)) / n
        )
    if (texts1 is None) != (texts2 is None):
        raise ValueError("give both texts1 and texts2, or neither")
    if texts1 is not None:
        _same_length("texts1", texts1, n)
        _same_length("texts2", texts2, n)
        ratios = [edit_distance_ratio(a, b) for a, b in zip(texts1, texts2, strict=True)]
        metrics["edit_ratio"] = math.fsum(ratios) / n
    return metrics


def _binary(name: str, rewards: Sequence[float]) -> list[bool]:
    out = []
    for i, r in enumerate(rewards):
        value = float(r)
        if value not in (0.0, 1.0):
            raise ValueError(f"{name}[{i}] must be a binary reward 0 or 1, got {r!r}")
        out.append(value == 1.0)
    return out


def _same_length(name: str, seq: Sequence, n: int) -> None:
    if len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} entries, expected {n} (one per problem)")


def _normalized(answer: str | None) -> str | None:
    return None if answer is None else " ".join(str(answer).split())


BOOTSTRAP_KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i")


def bootstrap_stderr(r1: Sequence[float], r2: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Standard error over problems of each BOOTSTRAP_KEYS metric: the spread of the metric over
    `resamples` resamplings of the problems with replacement (the pairs (r1, r2) stay together, so
    the error of Δ accounts for attempts 1 and 2 being graded on the same problems)."""
    c1, c2 = _binary("r1", r1), _binary("r2", r2)
    if len(c1) != len(c2) or not c1:
        raise ValueError(f"bootstrap_stderr needs equally many r1 and r2, at least one (got {len(c1)}, {len(c2)})")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    n = len(c1)
    # outcome per problem: 0 wrong->wrong, 1 wrong->right, 2 right->wrong, 3 right->right
    outcome = [2 * a + b for a, b in zip(c1, c2, strict=True)]
    rng = random.Random(seed)
    samples = {key: [] for key in BOOTSTRAP_KEYS}
    for _ in range(resamples):
        counts = [0, 0, 0, 0]
        for _ in range(n):
            counts[outcome[rng.randrange(n)]] += 1
        i2c, c2i = counts[1] / n, counts[2] / n
        samples["acc_t1"].append((counts[2] + counts[3]) / n)
        samples["acc_t2"].append((counts[1] + counts[3]) / n)
        samples["delta"].append(i2c - c2i)
        samples["delta_i2c"].append(i2c)
        samples["delta_c2i"].append(c2i)
    out = {}
    for key, values in samples.items():
        mean = math.fsum(values) / resamples
        out[key] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (resamples - 1))
    return out


SUMMARY_KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed_frac", "edit_ratio")


def seed_summary(runs: Sequence[Mapping]) -> tuple[dict, dict]:
    """(mean, standard error of the mean) over runs of each SUMMARY_KEYS metric; the standard error
    is None for a single run (nothing to estimate it from)."""
    if not runs:
        raise ValueError("seed_summary needs at least one run")
    mean, stderr = {}, {}
    for key in SUMMARY_KEYS:
        values = [float(r[key]) for r in runs]
        mean[key] = math.fsum(values) / len(values)
        if len(values) < 2:
            stderr[key] = None
        else:
            var = math.fsum((v - mean[key]) ** 2 for v in values) / (len(values) - 1)
            stderr[key] = math.sqrt(var / len(values))
    return mean, stderr


def format_table(
    rows: Mapping[str, Mapping], *, title: str | None = None, stderr: Mapping[str, Mapping] | None = None
) -> str:
    """Rows like the paper's tables: Acc@t1, Acc@t2, Δ(t1,t2), Δi→c, Δc→i in percent (one decimal), n.
    With `stderr` ({row: {metric: s.e. or None}}), cells read `mean ± s.e.`."""
    if not rows:
        raise ValueError("format_table needs at least one row")
    header = ["Method"] + [label for _, label in TABLE_COLUMNS] + ["n"]
    body = []
    for name, m in rows.items():
        missing = [key for key, _ in TABLE_COLUMNS if key not in m]
        if missing:
            raise ValueError(f"row {name!r} lacks metrics {missing}")
        cells = [str(name)]
        for key, _ in TABLE_COLUMNS:
            value = 100.0 * float(m[key])
            signed = key == "delta"
            cell = f"{value:+.1f}" if signed else f"{value:.1f}"
            se = (stderr or {}).get(name, {}).get(key)
            cells.append(cell + (f" ± {100.0 * se:.1f}" if se is not None else ""))
        cells.append(str(m.get("n", "")))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = ([title] if title else []) + [line(header), rule] + [line(r) for r in body]
    return "\n".join(lines)
