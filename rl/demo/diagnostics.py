"""The paper's collapse diagnostics on the demo (PAPER.md §5): what a trained policy does on the
problems it was trained on as well as on held-out ones, and how often attempt 2 changed the answer
during training.

Multi-turn RL that collapses learns attempt 1 for its training problems and restates it in attempt
2: accuracy on the training problems rises while the fraction of attempt-2 answers that differ from
attempt 1 (`changed_frac`, and the edit-distance ratio between the attempts, `edit_ratio`) falls,
and on held-out problems Δ stays near 0. These series come from each run's metrics.jsonl (sampled
trajectories, one value per step); the accuracies from greedy evaluation on both problem sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..evaluate import evaluate
from ..run_log import read_metrics

# Per-step series kept for each run (sampled, on the step's training problems).
CURVE_KEYS = ("reward_1", "reward_2", "changed_frac", "edit_ratio")


def evaluate_both(engine, builder, held_out, training, reward, budgets) -> tuple[tuple, tuple]:
    """Greedy two-attempt evaluation on the held-out problems, then on (some of) the training ones:
    ((metrics, records), (metrics, records))."""
    return (
        evaluate(engine, builder, held_out, reward, budgets=budgets),
        evaluate(engine, builder, training, reward, budgets=budgets),
    )


def run_curves(run_dir: str | Path) -> dict:
    """The run's per-step series: `stage` and each CURVE_KEYS metric it logged at every step."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    curves = {"stage": [r["stage"] for r in records]}
    for key in CURVE_KEYS:
        values = [r.get(key) for r in records]
        if values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            curves[key] = [float(v) for v in values]
    return curves


def mean_curves(per_seed: Sequence[dict]) -> dict:
    """Step-wise mean over seeds of every series all seeds have (over the steps all of them have),
    and `stage2_step`: the first step of Stage II (1-based; None when the run has no Stage I)."""
    if not per_seed:
        raise ValueError("mean_curves needs at least one run's curves")
    out = {}
    for key in CURVE_KEYS:
        if all(key in c for c in per_seed):
            length = min(len(c[key]) for c in per_seed)
            out[key] = [math.fsum(c[key][i] for c in per_seed) / len(per_seed) for i in range(length)]
    stages = per_seed[0]["stage"]
    out["stage2_step"] = stages.index(2) + 1 if 2 in stages and stages[0] == 1 else None
    return out
