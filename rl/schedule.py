"""What a step does, as a pure function of the step: its stage, learning rate, sampling seed and
the problems it trains on (so a resumed run repeats an uninterrupted one)."""

from __future__ import annotations

import math
import random

from .config import RunConfig


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to optim.lr, then constant or cosine down to lr * min_lr_ratio."""
    o, total = cfg.optim, max(1, cfg.total_steps)
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_of(step: int, cfg: RunConfig) -> int:
    return 1 if step < cfg.score.stage1_steps else 2


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
