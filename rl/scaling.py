"""Inference-compute scaling (the paper's §6.2, Fig. 1 right): spend a budget of B samples per
problem either in parallel or sequentially with self-correction.

- **parallel**: B independent attempt-1 samples, majority vote over their answers;
- **sequential**: B/2 attempt-1 samples, each followed by one self-correction, majority vote over
  the B/2 second attempts (B must be even; odd budgets have no sequential point).

One rollout serves every budget: k = max(B) attempt-1 samples per problem at the given temperature,
of which only the first m = max(even B)/2 get an attempt 2 (the most any sequential vote uses), and
budget B uses the first B first attempts (parallel) or the first B/2 second attempts (sequential),
so the curves are nested as in the paper. A vote counts each sample's extracted answer (whitespace
normalised; samples without an answer do not vote); a tie goes to the answer reached first in
sample order; the vote is correct when a sample with the winning answer earned reward 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import Problem
from .rewards.batch import answer_reader
from .rollout import RolloutSpec, run_rollout


def majority_vote(answers: Sequence[str | None], rewards: Sequence[float]) -> float:
    """1.0 when the most frequent answer (ties: the one seen first) is a correct one, else 0.0."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers for {len(rewards)} rewards")
    counts, first_seen, correct = {}, {}, {}
    for position, (answer, reward) in enumerate(zip(answers, rewards, strict=True)):
        if answer is None:
            continue
        key = " ".join(str(answer).split())
        counts[key] = counts.get(key, 0) + 1
        first_seen.setdefault(key, position)
        correct[key] = correct.get(key, False) or float(reward) == 1.0
    if not counts:
        return 0.0
    winner = max(counts, key=lambda key: (counts[key], -first_seen[key]))
    return 1.0 if correct[winner] else 0.0


def parse_budgets(text: str) -> list[int]:
    """`"1,2,4,8"` -> [1, 2, 4, 8]; a named error for anything but increasing positive ints."""
    try:
        budgets = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--scaling takes comma-separated sample budgets such as 1,2,4,8,16; got {text!r}") from None
    if not budgets or any(b < 1 for b in budgets) or budgets != sorted(set(budgets)):
        raise ValueError(f"--scaling budgets must be increasing positive integers, got {text!r}")
    if not any(b % 2 == 0 for b in budgets):
        raise ValueError(f"--scaling needs at least one even budget (sequential uses B/2 pairs), got {text!r}")
    return budgets


def inference_scaling(
    engine,
    builder,
    problems: Sequence[Problem],
    reward_fn,
    *,
    budgets: Sequence[int],
    temperature: float,
    token_budgets: tuple[int, int],
    seed: int,
    progress: bool = False,
) -> dict:
    """{"budgets", "parallel", "sequential", ...}: majority-vote accuracy per budget (sequential is
    None at odd budgets), from one rollout of max(budgets) trajectories per problem."""
    if getattr(reward_fn, "kind", None) == "code":
        raise NotImplementedError(
            "inference-compute scaling votes over extracted answers; code rewards have programs, "
            "not answers, to vote over (pass@k would be the measure there)"
        )
    k = max(budgets)
    m = max(b // 2 for b in budgets if b % 2 == 0)  # parse_budgets guarantees an even one
    spec = RolloutSpec(k, temperature, token_budgets, seed=seed, second_samples=m, progress=progress)
    trajectories, _ = run_rollout(engine, builder, problems, reward_fn, spec)
    answer_of = answer_reader(reward_fn)
    groups = [trajectories[i * k : (i + 1) * k] for i in range(len(problems))]
    first = [([answer_of(t.attempts[0].text) for t in g], [t.attempts[0].reward for t in g]) for g in groups]
    second = [([answer_of(t.attempts[1].text) for t in g[:m]], [t.attempts[1].reward for t in g[:m]]) for g in groups]

    def accuracy(votes, size):
        return sum(majority_vote(answers[:size], rewards[:size]) for answers, rewards in votes) / len(votes)

    return {
        "budgets": list(budgets),
        "parallel": [accuracy(first, b) for b in budgets],
        "sequential": [accuracy(second, b // 2) if b % 2 == 0 else None for b in budgets],
        "temperature": temperature,
        "problems": len(problems),
        "samples_per_problem": k,
        "second_attempts_per_problem": m,
    }


def scaling_table(scaling: dict) -> str:
    """The scaling result as a markdown table (accuracy in %, '-' where a point does not exist)."""
    lines = ["| samples B | parallel | sequential |", "|---|---|---|"]
    for b, par, seq in zip(scaling["budgets"], scaling["parallel"], scaling["sequential"], strict=True):
        lines.append(f"| {b} | {100 * par:.1f} | {'-' if seq is None else f'{100 * seq:.1f}'} |")
    return "\n".join(lines)
