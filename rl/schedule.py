"""What a step does, as a pure function of the step: its stage, learning rate, sampling seed and
the problems it trains on (so a resumed run repeats an uninterrupted one)."""

from __future__ import annotations

import math
import random

from .config import OptimSection, RunConfig


def lr_at(step: int, cfg: RunConfig) -> float:
    """The learning rate of an RL step (the schedule below over the run's Stage I + II steps)."""
    return lr_schedule(step, cfg.optim, cfg.total_steps)


def lr_schedule(step: int, o: OptimSection, total: int) -> float:
    """Linear warm-up to o.lr, then constant or cosine down to lr * min_lr_ratio at step `total`."""
    total = max(1, total)
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_of(step: int, cfg: RunConfig) -> int:
    return 1 if step < cfg.score.stage1_steps * (cfg.score.attempts - 1) else 2


def stage1_part(step: int, cfg: RunConfig) -> int:
    """The part j of Stage I a step belongs to (1 .. attempts - 1; always 1 with two attempts): part j
    trains attempt j + 1, with attempts 1..j anchored to the model at the end of part j - 1."""
    return min(step // max(1, cfg.score.stage1_steps), cfg.score.attempts - 2) + 1


def attempts_at(step: int, cfg: RunConfig) -> int:
    """How many attempts a step's trajectories have: j + 1 in Stage I part j, all in Stage II."""
    return stage1_part(step, cfg) + 1 if stage_of(step, cfg) == 1 else cfg.score.attempts


def step_seed(run_seed: int, step: int) -> int:
    return (run_seed * 1_000_003 + step) % (2**62)


class DataOrder:
    """Problem indices of a step: a seeded permutation per epoch, a pure function of the step."""

    def __init__(self, n: int, per_step: int, seed: int, shuffle: bool):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.per_step, self.seed, self.shuffle = n, per_step, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            if self.shuffle:
                random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch is enough to keep
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for g in range(step * self.per_step, (step + 1) * self.per_step):
            out.append(self._perm(g // self.n)[g % self.n])
        return out
