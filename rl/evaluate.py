"""Greedy two-attempt evaluation (`score eval`): the paper's metrics, per-problem JSONL, a table.

Each problem gets a greedy attempt 1, then a greedy attempt 2 from `prompt + attempt1 +
instruction` (token ids, through the same rollout code as training, temperature 0, one sample).
Metrics: Accuracy@t1, Accuracy@t2, Δ(t1,t2), Δi→c, Δc→i, the fraction of problems whose final
answer changed, and the mean edit-distance ratio between the attempts (rl.metrics).

More attempts than trained (`attempts=N`, the paper's Fig. 8): attempt t + 1 follows attempt t
and the same instruction again, token in, token out, so every attempt reuses the cached KV of
all before it; the metrics gain `acc_t3` … `acc_tN` (and `acc_per_attempt`), the records
`attempt3`, `r3`, ….

Self-Refine (`evaluate_self_refine`, the paper's prompting baseline): between the attempts the
model is asked to critique attempt 1 and then to rewrite it, in one conversation.

Given first attempts (`evaluate_given_first_attempts`): attempt 1 is text from a file (an earlier
eval's `eval.jsonl`, another model's samples, MBPP-R-style programs to repair), attempt 2 is the
model's greedy correction of it; comparing a trained model on the base model's first attempts
with its own is the paper's distribution-shift diagnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from score.model import SamplingParams

from .data import Problem, read_jsonl_objects
from .metrics import bootstrap_stderr, format_table, two_attempt_metrics
from .rewards.batch import answer_reader
from .rollout import RolloutSpec, run_rollout


def evaluate(
    engine,
    builder,
    problems: Sequence[Problem],
    reward_fn,
    *,
    budgets: tuple[int, int],
    attempts: int = 2,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """(metrics, per-problem records) of greedy decoding over `problems` with `attempts` attempts
    (>= 2); `budgets` are the token budgets of attempt 1 and of every later one (RunConfig.eval_budgets)."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 2:
        raise ValueError(f"attempts must be an int >= 2, got {attempts!r}")
    _check_room(engine, builder, problems, budgets, attempts)
    answer_of = answer_reader(reward_fn)
    spec = RolloutSpec(1, 0.0, tuple(budgets), attempts=attempts, progress=progress)
    trajectories, _ = run_rollout(engine, builder, problems, reward_fn, spec)
    records = [_record(t.problem, answer_of, [(a.text, a.reward, a.finish) for a in t.attempts]) for t in trajectories]
    return _metrics(records, attempts), records


def _record(problem: Problem, answer_of, attempts: list[tuple]) -> dict:
    """A per-problem record (id, question, answer) with `attempt{i}`,
    `answer{i}`, `r{i}`, `finish{i}` for each (text, reward, finish reason), numbered from 1."""
    record = {"id": problem.id, "question": problem.question, "answer": problem.answer}
    for i, (text, reward, finish) in enumerate(attempts, start=1):
        record |= {f"attempt{i}": text, f"answer{i}": answer_of(text), f"r{i}": float(reward), f"finish{i}": finish}
    return record


def _greedy(engine, builder, contexts: list[list[int]], budget: int) -> tuple[list, list[str]]:
    """(completions, texts) of one greedy continuation of each context."""
    outs = [o[0] for o in engine.generate(contexts, SamplingParams(temperature=0.0, max_tokens=budget))]
    return outs, [builder.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]


def _check_room(engine, builder, problems, budgets: tuple[int, int], attempts: int) -> None:
    """Refuse, before any generation, problems whose last attempt's context could reach the engine's
    max_model_len (prompt, attempt 1 at its budget, then instruction + attempt per later attempt)."""
    extra = budgets[0] + (attempts - 2) * budgets[1] + (attempts - 1) * len(builder.instruction_ids)
    _refuse_long(
        engine, builder, problems, extra, f"{attempts} attempts (budgets {budgets[0]} + {budgets[1]} per later attempt)"
    )


def _refuse_long(engine, builder, problems, extra: int, what: str) -> None:
    """Refuse problems whose prompt plus `extra` tokens reach max_model_len, naming them."""
    too_long = [p.id for p in problems if len(builder.first_attempt_ids(p.question)) + extra >= engine.max_model_len]
    if too_long:
        named = ", ".join(map(str, too_long[:5])) + (" ..." if len(too_long) > 5 else "")
        raise ValueError(
            f"{len(too_long)} of {len(problems)} problems cannot hold {what} within "
            f"max_model_len={engine.max_model_len}: {named}"
        )


def _metrics(records: list[dict], attempts: int = 2) -> dict:
    metrics = two_attempt_metrics(
        [r["r1"] for r in records],
        [r["r2"] for r in records],
        answers1=[r["answer1"] for r in records],
        answers2=[r["answer2"] for r in records],
        texts1=[r["attempt1"] for r in records],
        texts2=[r["attempt2"] for r in records],
    )
    metrics["stderr"] = bootstrap_stderr([r["r1"] for r in records], [r["r2"] for r in records])
    if attempts > 2:
        per_attempt = [sum(r[f"r{a}"] for r in records) / len(records) for a in range(1, attempts + 1)]
        metrics |= {f"acc_t{a}": acc for a, acc in enumerate(per_attempt, start=1)}
        metrics["acc_per_attempt"] = per_attempt
    return metrics


def read_first_attempts(path: str | Path, problems: Sequence[Problem]) -> list[tuple[Problem, str]]:
    """(problem, attempt-1 text) per row of a JSONL file with "id" and "attempt1" (the layout of
    `eval.jsonl`), in file order; errors name the file and line."""
    by_id = {p.id: p for p in problems}
    rows, seen = [], set()
    for _, where, row in read_jsonl_objects(path, "first-attempts file"):
        for key in ("id", "attempt1"):
            if key not in row:
                raise ValueError(f"{where}: missing key {key!r} (rows need 'id' and 'attempt1')")
        problem_id, text = str(row["id"]), row["attempt1"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'attempt1' must be a string, got {type(text).__name__}")
        if problem_id not in by_id:
            raise ValueError(f"{where}: problem id {problem_id!r} is not in the evaluation data")
        if problem_id in seen:
            raise ValueError(f"{where}: problem id {problem_id!r} appears twice")
        seen.add(problem_id)
        rows.append((by_id[problem_id], text))
    if not rows:
        raise ValueError(f"{path}: no first attempts (the file is empty)")
    return rows


def evaluate_given_first_attempts(
    engine, builder, given: Sequence[tuple[Problem, str]], reward_fn, *, budget: int
) -> tuple[dict, list[dict]]:
    """(metrics, records) of the model's greedy attempt 2 after the given attempt-1 texts (each
    tokenised as the model's reply and taken as finished, so the instruction follows a closed turn)."""
    answer_of = answer_reader(reward_fn)
    problems = [p for p, _ in given]
    tokenizer = builder.tokenizer
    contexts = [
        builder.second_attempt_ids(builder.first_attempt_ids(p.question), tokenizer.encode(text), "stop")[0]
        for p, text in given
    ]
    outs, texts2 = _greedy(engine, builder, contexts, budget)
    rewards = reward_fn([t for _, t in given] + texts2, problems * 2)
    records = [
        _record(p, answer_of, [(text1, r1, "given"), (text2, r2, out.finish_reason)])
        for (p, text1), text2, out, r1, r2 in zip(
            given, texts2, outs, rewards[: len(given)], rewards[len(given) :], strict=True
        )
    ]
    return _metrics(records), records


def evaluate_self_refine(
    engine,
    builder,
    turns: tuple,
    problems: Sequence[Problem],
    reward_fn,
    *,
    budgets: tuple[int, int],
    critique_budget: int,
) -> tuple[dict, list[dict]]:
    """(metrics, records) of Self-Refine, greedy: attempt 1; the model's critique of it after the
    critique turn; attempt 2 after the refine turn (`turns` = factories.self_refine_builders), all
    token in, token out in one conversation. Records gain `critique`; attempt 2 is the rewrite."""
    critique_turn, refine_turn = turns
    extra = budgets[0] + len(critique_turn.instruction_ids) + critique_budget + len(refine_turn.instruction_ids)
    _refuse_long(engine, builder, problems, extra + budgets[1], "Self-Refine's attempt, critique and rewrite")
    answer_of = answer_reader(reward_fn)
    prompts = [builder.first_attempt_ids(p.question) for p in problems]
    first, texts1 = _greedy(engine, builder, prompts, budgets[0])
    contexts = [
        critique_turn.second_attempt_ids(p, o.token_ids, o.finish_reason)[0]
        for p, o in zip(prompts, first, strict=True)
    ]
    critiques, critique_texts = _greedy(engine, builder, contexts, critique_budget)
    contexts = [
        refine_turn.second_attempt_ids(c, o.token_ids, o.finish_reason)[0]
        for c, o in zip(contexts, critiques, strict=True)
    ]
    second, texts2 = _greedy(engine, builder, contexts, budgets[1])
    rewards = reward_fn(texts1 + texts2, list(problems) * 2)
    n = len(problems)
    records = [
        _record(p, answer_of, [(t1, rewards[i], o1.finish_reason), (t2, rewards[n + i], o2.finish_reason)])
        | {"critique": c}
        for i, (p, o1, t1, o2, t2, c) in enumerate(
            zip(problems, first, texts1, second, texts2, critique_texts, strict=True)
        )
    ]
    return _metrics(records), records


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
