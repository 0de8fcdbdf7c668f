"""Multi-attempt rollouts: one plain `engine.generate` call per attempt, token in, token out, then
rewards.

Attempt 1: every prompt's `k` samples in one call (the prompt's KV is computed once). Attempt a > 1:
each trajectory's context `prompt + attempt 1 + instruction + ... + attempt a-1 + instruction` is
built from token ids by the PromptBuilder (never by decoding and re-encoding), so the engine reuses
the cached blocks of everything before and only prefills the instruction. Sampling seeds are keyed on
(step seed, attempt, prompt position, sample), so a trajectory does not depend on how the engine
batches it.

Optionally some prompts take their attempt 1 from a second engine on the frozen base model (the
paper's "first attempts sampled from the base model"): those attempt-1 tokens are off-policy and
the trainer does not train on them (`Trajectory.first_from_base`). One attempt (`RolloutSpec.attempts
= 1`) is single-turn RL.

Not done here: the forward/backward passes (trainer.py) and evaluation (evaluate.py, greedy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from score.model import SamplingParams

from .config import RolloutSection
from .data import Problem
from .prompts import PromptBuilder


@dataclass
class Attempt:
    """One attempt of a trajectory: the instruction before it (none for attempt 1), then its tokens."""

    instruction_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    finish: str
    text: str = ""
    reward: float = 0.0


@dataclass
class Trajectory:
    """One sample of one prompt: the prompt, then its attempts `[x, y1, p, y2, p, y3, ...]` as token ids."""

    group: int  # position of the prompt in the step's batch (trajectories of one prompt share it)
    problem: Problem
    prompt_ids: list[int]
    attempts: list[Attempt]
    first_from_base: bool = False

    @property
    def token_ids(self) -> list[int]:
        ids = list(self.prompt_ids)
        for a in self.attempts:
            ids += a.instruction_ids + a.ids
        return ids

    @property
    def attempt_labels(self) -> list[int]:
        """Per token: 0 context (prompt, instructions; attempt 1 when sampled by the base model), else
        the attempt's number (1, 2, 3, ...)."""
        labels = [0] * len(self.prompt_ids)
        for number, a in enumerate(self.attempts, start=1):
            label = 0 if number == 1 and self.first_from_base else number
            labels += [0] * len(a.instruction_ids) + [label] * len(a.ids)
        return labels

    @property
    def sampler_logprobs(self) -> list[float]:
        """Per token, the sampler's log-prob of it (NaN for context tokens), aligned with token_ids."""
        nan = float("nan")
        logps = [nan] * len(self.prompt_ids)
        for a in self.attempts:
            logps += [nan] * len(a.instruction_ids) + list(a.logprobs)
        return logps

    @property
    def rewards(self) -> list[float]:
        """The reward of every attempt, in order."""
        return [a.reward for a in self.attempts]


@dataclass
class RolloutStats:
    seconds: float = 0.0
    generated_tokens: int = 0
    reward_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout samples: `k` trajectories per prompt of `attempts` attempts (1 = single-turn),
    `budgets` tokens for attempt 1 and for every later one; temperature 0 = greedy. `seed` None draws
    unseeded. `second_samples`: only the first this-many samples of each prompt get an attempt 2
    (default: all k); theirs are exactly those of the full rollout, the others end after attempt 1."""

    k: int
    temperature: float
    budgets: tuple[int, int]
    attempts: int = 2
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    second_samples: int | None = None
    progress: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.second_samples is not None and not 0 <= self.second_samples <= self.k:
            raise ValueError(f"second_samples must be in [0, k={self.k}], got {self.second_samples}")
        if self.attempts > 2 and self.second_samples not in (None, self.k):
            raise ValueError("attempts > 2 continues every sample: second_samples must be k")

    @classmethod
    def from_config(cls, r: RolloutSection, **changes) -> RolloutSpec:
        """The sampling of `[rollout]`, with `changes` (attempts, seed, ...) on top."""
        sampling = dict(
            k=r.samples_per_prompt,
            temperature=r.temperature,
            budgets=(r.max_tokens_attempt1, r.max_tokens_attempt2),
            top_p=r.top_p,
            top_k=r.top_k,
        )
        return cls(**(sampling | changes))

    def params(self, number: int, n: int) -> SamplingParams:
        """The sampling of attempt `number`: its own seed stream, `n` samples per context."""
        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.budgets[0 if number == 1 else 1],
            seed=_attempt_seed(self.seed, number),
        )


def _attempt_seed(seed: int | None, number: int) -> int | None:
    if seed is None:
        return None
    if number <= 2:
        return seed * 2 + number
    return ((seed * 2 + 2) * 7919 + number) % (2**62)


def run_rollout(
    engine,
    builder: PromptBuilder,
    problems: Sequence[Problem],
    reward_fn,
    spec: RolloutSpec,
    *,
    first: int = 0,
    base_engine=None,
    from_base: Sequence[bool] | None = None,
) -> tuple[list[Trajectory], RolloutStats]:
    """spec.k trajectories per problem (grouped, problem order) of spec.attempts attempts, rewarded.

    `from_base[i]` True: problem i's attempt 1 is sampled by `base_engine` (same seeds).
    `first`: the position of `problems[0]` in the step's whole batch, when a data-parallel rank
    rolls out a slice of it; seeds are keyed on whole-batch positions, so the slices of a batch
    sample exactly what one call over the whole batch would (`Trajectory.group` stays local).
    """
    if not problems:
        raise ValueError("rollout needs at least one problem")
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    from_base = list(from_base) if from_base is not None else [False] * len(problems)
    if len(from_base) != len(problems):
        raise ValueError(f"from_base has {len(from_base)} entries for {len(problems)} problems")
    if any(from_base) and base_engine is None:
        raise ValueError("from_base asks for base-model first attempts but no base_engine was given")
    k = spec.k
    with_second = k if spec.second_samples is None else spec.second_samples
    start = time.perf_counter()
    prompts = [builder.first_attempt_ids(p.question) for p in problems]

    # Attempt 1, policy and (optionally) base engines; the seed of sample j of prompt i depends only
    # on (seed, first + i, j), so splitting prompts between engines or ranks changes nothing.
    outs1 = [None] * len(problems)
    for use_base, eng in ((False, engine), (True, base_engine)):
        idx = [i for i, b in enumerate(from_base) if b == use_base]
        if not idx:
            continue
        got = eng.generate(
            [prompts[i] for i in idx], spec.params(1, k), use_tqdm=spec.progress, seed_keys=[first + i for i in idx]
        )
        for i, o in zip(idx, got, strict=True):
            outs1[i] = o
    trajectories = [
        Trajectory(i, problems[i], prompts[i], [_attempt(builder, [], c)], first_from_base=from_base[i])
        for i in range(len(problems))
        for c in outs1[i]
    ]

    # Attempt a > 1: one context per trajectory, n = 1, keyed on the trajectory's whole-batch position.
    for number in range(2, spec.attempts + 1):
        going = [n for n in range(len(trajectories)) if number > 2 or n % k < with_second]
        if going:
            _next_attempt(
                engine, builder, [trajectories[n] for n in going], number, spec, [first * k + n for n in going]
            )
    gen_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    graded = [(t, a) for number in range(spec.attempts) for t in trajectories for a in t.attempts[number : number + 1]]
    rewards = reward_fn([a.text for _, a in graded], [t.problem for t, _ in graded])
    for (_, a), reward in zip(graded, rewards, strict=True):
        a.reward = float(reward)
    stats = RolloutStats(
        seconds=gen_seconds,
        generated_tokens=sum(len(a.ids) for _, a in graded),
        reward_seconds=time.perf_counter() - t0,
    )
    return trajectories, stats


def _attempt(builder: PromptBuilder, instruction_ids: list[int], completion) -> Attempt:
    text = builder.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    return Attempt(
        instruction_ids, list(completion.token_ids), list(completion.logprobs), completion.finish_reason, text
    )


def _next_attempt(engine, builder, trajectories: list[Trajectory], number: int, spec: RolloutSpec, keys) -> None:
    """Attempt `number` of every trajectory given: its whole context, the instruction again, sampled."""
    contexts, segments = [], []
    for t in trajectories:
        last, history = t.attempts[-1], t.token_ids
        ctx, (a, b) = builder.second_attempt_ids(history[: len(history) - len(last.ids)], last.ids, last.finish)
        contexts.append(ctx)
        segments.append(ctx[a:b])
    outs = engine.generate(contexts, spec.params(number, 1), use_tqdm=spec.progress, seed_keys=keys)
    for t, segment, o in zip(trajectories, segments, outs, strict=True):
        t.attempts.append(_attempt(builder, segment, o[0]))
