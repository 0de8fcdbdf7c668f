"""Greedy two-attempt evaluation (`score eval`): the paper's metrics, per-problem JSONL, a table.

Each problem gets a greedy attempt 1, then a greedy attempt 2 from `prompt + attempt1 +
instruction` (token ids, through the same rollout code as training, temperature 0, one sample).
Metrics: Accuracy@t1, Accuracy@t2, Δ(t1,t2), Δi→c, Δc→i, the fraction of problems whose final
answer changed, and the mean edit-distance ratio between the attempts (rl.metrics). Evaluating the
untrained model this way is the Self-Refine-style baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from score.model import files
from score.model.files import write_jsonl

from .data import Problem
from .metrics import bootstrap_stderr, format_table, two_attempt_metrics
from .rewards.batch import answer_reader
from .rollout import two_attempt_rollout


def evaluate(
    engine, builder, problems: Sequence[Problem], reward_fn, *, budgets: tuple[int, int], progress: bool = False
) -> tuple[dict, list[dict]]:
    """(metrics, per-problem records) of greedy two-attempt decoding over `problems`; `budgets` are the
    token budgets of attempts 1 and 2 (RunConfig.eval_budgets)."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    answer_of = answer_reader(reward_fn)
    trajectories, _ = two_attempt_rollout(
        engine,
        builder,
        problems,
        reward_fn,
        k=1,
        temperature=0.0,
        max_tokens1=budgets[0],
        max_tokens2=budgets[1],
        seed=None,
        progress=progress,
    )
    records = []
    for t in trajectories:
        records.append(
            {
                "id": t.problem.id,
                "question": t.problem.question,
                "answer": t.problem.answer,
                "attempt1": t.text1,
                "attempt2": t.text2,
                "answer1": answer_of(t.text1),
                "answer2": answer_of(t.text2),
                "r1": t.r1,
                "r2": t.r2,
                "finish1": t.finish1,
                "finish2": t.finish2,
            }
        )
    metrics = two_attempt_metrics(
        [r["r1"] for r in records],
        [r["r2"] for r in records],
        answers1=[r["answer1"] for r in records],
        answers2=[r["answer2"] for r in records],
        texts1=[r["attempt1"] for r in records],
        texts2=[r["attempt2"] for r in records],
    )
    metrics["stderr"] = bootstrap_stderr([r["r1"] for r in records], [r["r2"] for r in records])
    return metrics, records


def write_records(path: str | Path, records: list[dict]) -> Path:
    """Per-problem JSONL, written atomically."""
    return write_jsonl(path, records)


def write_json(path: str | Path, value: dict) -> Path:
    return files.write_json(path, value, indent=2)


def table(rows: dict, title: str | None = None) -> str:
    """The paper-style table (± the bootstrap standard error over problems where the row has one)
    plus the collapse diagnostics (changed answers, edit ratio)."""
    text = format_table(rows, title=title, stderr={name: m.get("stderr") or {} for name, m in rows.items()})
    extra = []
    for name, m in rows.items():
        if m.get("changed_frac") is not None:
            extra.append(
                f"{name}: answer changed in {100 * m['changed_frac']:.1f}% of problems, "
                f"mean edit-distance ratio {m['edit_ratio']:.3f}"
            )
    return text + ("\n" + "\n".join(extra) if extra else "")
