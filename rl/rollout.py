"""Two-attempt rollouts: two plain `engine.generate` calls, token in, token out, then rewards.

Attempt 1: every prompt's `k` samples in one call (the prompt's KV is computed once). Attempt 2:
each trajectory's context `prompt + attempt1 + instruction` is built from token ids by the
PromptBuilder (never by decoding and re-encoding), so the engine reuses attempt 1's cached blocks
and only prefills the instruction. Sampling seeds are keyed on (step seed, prompt position, sample),
so a trajectory does not depend on how the engine batches it.

Optionally some prompts take their attempt 1 from a second engine on the frozen base model (the
paper's "first attempts sampled from the base model"): those attempt-1 tokens are off-policy and
the trainer does not train on them (`Trajectory.first_from_base`). `second_attempt=False` stops after
attempt 1 (single-turn RL): the trajectories hold no instruction and no attempt 2.

Not done here: the forward/backward passes (trainer.py) and evaluation (evaluate.py, greedy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from score.model import SamplingParams

from .data import Problem
from .prompts import PromptBuilder


@dataclass
class LaterAttempt:
    """Attempt 3, 4, ... of a trajectory: the instruction again, then the attempt."""

    instruction_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    finish: str
    text: str = ""
    reward: float = 0.0


@dataclass
class Trajectory:
    """One sample of one prompt: `[prompt, attempt1, instruction, attempt2]` as token ids."""

    group: int  # position of the prompt in the step's batch (trajectories of one prompt share it)
    problem: Problem
    prompt_ids: list[int]
    attempt1_ids: list[int]
    attempt1_logprobs: list[float]
    finish1: str
    instruction_ids: list[int]
    attempt2_ids: list[int]
    attempt2_logprobs: list[float]
    finish2: str  # "none" when no attempt 2 was sampled (single-turn RL)
    text1: str = ""
    text2: str = ""
    r1: float = 0.0
    r2: float = 0.0
    first_from_base: bool = False
    later: list[LaterAttempt] = field(default_factory=list)  # attempts 3.. (score.attempts > 2)

    @property
    def token_ids(self) -> list[int]:
        ids = self.prompt_ids + self.attempt1_ids + self.instruction_ids + self.attempt2_ids
        for a in self.later:
            ids = ids + a.instruction_ids + a.ids
        return ids

    @property
    def attempt_labels(self) -> list[int]:
        """Per token: 0 context (prompt, instructions; attempt 1 when sampled by the base model), else
        the attempt's number (1, 2, 3, ...)."""
        a1 = 0 if self.first_from_base else 1
        labels = (
            [0] * len(self.prompt_ids)
            + [a1] * len(self.attempt1_ids)
            + [0] * len(self.instruction_ids)
            + [2] * len(self.attempt2_ids)
        )
        for number, a in enumerate(self.later, start=3):
            labels += [0] * len(a.instruction_ids) + [number] * len(a.ids)
        return labels

    @property
    def sampler_logprobs(self) -> list[float]:
        """Per token, the sampler's log-prob of it (NaN for context tokens), aligned with token_ids."""
        nan = float("nan")
        logps = (
            [nan] * len(self.prompt_ids)
            + list(self.attempt1_logprobs)
            + [nan] * len(self.instruction_ids)
            + list(self.attempt2_logprobs)
        )
        for a in self.later:
            logps += [nan] * len(a.instruction_ids) + list(a.logprobs)
        return logps

    @property
    def rewards(self) -> list[float]:
        """The reward of every attempt, in order."""
        return [self.r1, self.r2] + [a.reward for a in self.later]


@dataclass
class RolloutStats:
    seconds: float = 0.0
    generated_tokens: int = 0
    reward_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def two_attempt_rollout(
    engine,
    builder: PromptBuilder,
    problems: Sequence[Problem],
    reward_fn,
    *,
    k: int,
    temperature: float,
    max_tokens1: int,
    max_tokens2: int,
    seed: int | None,
    top_p: float = 1.0,
    top_k: int = 0,
    base_engine=None,
    from_base: Sequence[bool] | None = None,
    progress: bool = False,
    first: int = 0,
    second_attempt: bool = True,
    attempts: int = 2,
    second_samples: int | None = None,
) -> tuple[list[Trajectory], RolloutStats]:
    """k two-attempt trajectories per problem (grouped, problem order), rewarded; temperature 0 = greedy.

    `from_base[i]` True: problem i's attempt 1 is sampled by `base_engine` (same seeds).
    `first`: the position of `problems[0]` in the step's whole batch, when a data-parallel rank
    rolls out a slice of it; seeds are keyed on whole-batch positions, so the slices of a batch
    sample exactly what one call over the whole batch would (`Trajectory.group` stays local).
    `attempts` > 2: each later attempt follows the one before and the instruction again (its own
    seed stream, keyed like attempt 2); attempts 1 and 2 are exactly the two-attempt rollout's.
    `second_samples`: only the first this-many samples of each prompt get an attempt 2 (default: all
    k); theirs are exactly those of the full rollout, the others have none (`finish2` "none", r2 0).
    """
    if not problems:
        raise ValueError("two_attempt_rollout needs at least one problem")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    if attempts < 2 or (attempts > 2 and not second_attempt):
        raise ValueError(f"attempts must be >= 2 (and needs second_attempt), got {attempts}")
    if second_samples is not None and not 0 <= second_samples <= k:
        raise ValueError(f"second_samples must be in [0, k={k}], got {second_samples}")
    if attempts > 2 and second_samples not in (None, k):
        raise ValueError("attempts > 2 continues every sample: second_samples must be k")
    with_second = (k if second_samples is None else second_samples) if second_attempt else 0
    from_base = list(from_base) if from_base is not None else [False] * len(problems)
    if len(from_base) != len(problems):
        raise ValueError(f"from_base has {len(from_base)} entries for {len(problems)} problems")
    if any(from_base) and base_engine is None:
        raise ValueError("from_base asks for base-model first attempts but no base_engine was given")
    tokenizer = builder.tokenizer
    start = time.perf_counter()
    prompts = [builder.first_attempt_ids(p.question) for p in problems]

    def params(n: int, max_tokens: int, stream: int):
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            seed=None if seed is None else seed * 2 + stream,
        )

    # Attempt 1 (seed stream 1), policy and (optionally) base engines; the seed of sample j of
    # prompt i depends only on (seed, first + i, j), so splitting prompts between engines or
    # ranks changes nothing.
    params1 = params(k, max_tokens1, 1)
    outs1 = [None] * len(problems)
    for use_base, eng in ((False, engine), (True, base_engine)):
        idx = [i for i, b in enumerate(from_base) if b == use_base]
        if not idx:
            continue
        got = eng.generate([prompts[i] for i in idx], params1, use_tqdm=progress, seed_keys=[first + i for i in idx])
        for i, o in zip(idx, got, strict=True):
            outs1[i] = o

    # Attempt 2 (seed stream 2): one context per trajectory, n = 1, keyed on the trajectory's
    # whole-batch position.
    contexts, spans, meta = [], [], []
    for i in range(len(problems)):
        for j, c in enumerate(outs1[i]):
            if j < with_second:
                ctx, span = builder.second_attempt_ids(prompts[i], c.token_ids, c.finish_reason)
            else:
                ctx, span = [], (0, 0)
            contexts.append(ctx)
            spans.append(span)
            meta.append((i, j))
    outs2 = [None] * len(contexts)
    seconds = [n for n, (_, j) in enumerate(meta) if j < with_second]  # the trajectories with an attempt 2
    params2 = params(1, max_tokens2, 2)
    if seconds:
        got = engine.generate(
            [contexts[n] for n in seconds],
            params2,
            use_tqdm=progress,
            seed_keys=[(first + meta[n][0]) * k + meta[n][1] for n in seconds],
        )
        for n, o in zip(seconds, got, strict=True):
            outs2[n] = o[0]

    trajectories = []
    for (i, j), ctx, (a, b), c2 in zip(meta, contexts, spans, outs2, strict=True):
        c1 = outs1[i][j]
        trajectories.append(
            Trajectory(
                group=i,
                problem=problems[i],
                prompt_ids=prompts[i],
                attempt1_ids=list(c1.token_ids),
                attempt1_logprobs=list(c1.logprobs),
                finish1=c1.finish_reason,
                instruction_ids=ctx[a:b],
                attempt2_ids=list(c2.token_ids) if c2 else [],
                attempt2_logprobs=list(c2.logprobs) if c2 else [],
                finish2=c2.finish_reason if c2 else "none",
                text1=tokenizer.decode(c1.token_ids, skip_special_tokens=True),
                text2=tokenizer.decode(c2.token_ids, skip_special_tokens=True) if c2 else "",
                first_from_base=from_base[i],
            )
        )

    for number in range(3, attempts + 1):
        _add_attempt(engine, builder, trajectories, number, params2, seed, [(first + i) * k + j for i, j in meta])
    gen_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    probs = [t.problem for t in trajectories]
    texts = [t.text1 for t in trajectories] + [trajectories[n].text2 for n in seconds]
    graded = probs + [probs[n] for n in seconds]
    for number in range(3, attempts + 1):
        texts += [t.later[number - 3].text for t in trajectories]
        graded += probs
    rewards = reward_fn(texts, graded)
    count, later_start = len(trajectories), len(trajectories) + len(seconds)
    for n, t in enumerate(trajectories):
        t.r1, t.r2 = float(rewards[n]), 0.0
        for number, later in enumerate(t.later, start=3):
            later.reward = float(rewards[later_start + (number - 3) * count + n])
    for position, n in enumerate(seconds):
        trajectories[n].r2 = float(rewards[count + position])
    stats = RolloutStats(
        seconds=gen_seconds,
        generated_tokens=sum(
            len(t.attempt1_ids) + len(t.attempt2_ids) + sum(len(a.ids) for a in t.later) for t in trajectories
        ),
        reward_seconds=time.perf_counter() - t0,
    )
    return trajectories, stats


def _add_attempt(engine, builder, trajectories: list[Trajectory], number: int, params2, seed, keys) -> None:
    """Attempt `number` (>= 3) of every trajectory: its whole context, the instruction again, sampled."""
    contexts, segments = [], []
    for t in trajectories:
        last_ids, last_finish = (t.later[-1].ids, t.later[-1].finish) if t.later else (t.attempt2_ids, t.finish2)
        history = t.token_ids
        ctx, (a, b) = builder.second_attempt_ids(history[: len(history) - len(last_ids)], last_ids, last_finish)
        contexts.append(ctx)
        segments.append(ctx[a:b])
    stream = None if seed is None else ((seed * 2 + 2) * 7919 + number) % (2**62)
    params = dataclasses.replace(params2, seed=stream)
    outs = [o[0] for o in engine.generate(contexts, params, seed_keys=keys)]
    for t, segment, o in zip(trajectories, segments, outs, strict=True):
        text = builder.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        t.later.append(LaterAttempt(segment, list(o.token_ids), list(o.logprobs), o.finish_reason, text))
