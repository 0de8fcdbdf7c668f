"""How one step's trajectories are cut into micro-batches (gradient accumulation), and over ranks.

A prompt's k trajectories (its group) are never split: RLOO baselines are taken inside a group.
Two ways to cut, by `[optim]`:

- `prompts_per_micro_batch = P` (the default): consecutive runs of P groups. Micro-batches hold
  equal prompt counts but unequal tokens, since attempt lengths vary.
- `tokens_per_micro_batch = T` (> 0): whole groups packed into micro-batches of about T tokens,
  balanced. Each rank gets an equal number of groups with near-equal token totals (groups go,
  longest first, to the least-loaded rank that still has room), then each rank's groups go into m
  micro-batches by longest-processing-time first, where m is the fewest for which no micro-batch
  passes T on any rank (a group longer than T alone in its micro-batch is the only excess). Every
  rank runs the same m (FSDP2's collectives pair up one for one) and, since m never exceeds a
  rank's group count, no micro-batch is empty.

The cut changes only how the gradient is accumulated, never what it is: the loss of every
micro-batch is divided by the step's global token (or sequence) count, so the sum over
micro-batches and ranks is the one-big-batch loss, up to the order of floating-point additions.
The plan is a pure function of the groups' token counts, computed identically on every rank.
"""

from __future__ import annotations

import dataclasses
import heapq

from .rollout import Trajectory


def groups_of(trajectories: list[Trajectory]) -> list[list[Trajectory]]:
    """The step's groups in first-seen order (a prompt's trajectories keep their order)."""
    by_group: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        by_group.setdefault(t.group, []).append(t)
    return list(by_group.values())


def group_tokens(group: list[Trajectory]) -> int:
    """Packed tokens of a group: what one forward of it costs."""
    return sum(len(t.token_ids) for t in group)


def by_prompt_count(trajectories: list[Trajectory], groups_per_micro_batch: int) -> list[list[Trajectory]]:
    """Consecutive runs of `groups_per_micro_batch` whole groups."""
    groups = groups_of(trajectories)
    step = groups_per_micro_batch
    return [sum(groups[i : i + step], []) for i in range(0, len(groups), step)]


def _longest_first(sizes: list[int], bins: int, capacity: int | None = None) -> list[list[int]]:
    """Item indices in `bins` bins: each item, largest first (ties by index), into the least-loaded
    bin (ties by bin index) that holds fewer than `capacity` items. Bins list their items in index order."""
    heap = [(0, b) for b in range(bins)]
    content: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, b = heapq.heappop(heap)
        content[b].append(i)
        if capacity is None or len(content[b]) < capacity:
            heapq.heappush(heap, (load + sizes[i], b))
    return [sorted(c) for c in content]


def _fits(sizes: list[int], bins: list[list[int]], budget: int) -> bool:
    return all(len(b) == 1 or sum(sizes[i] for i in b) <= budget for b in bins)


def plan_micro_batches(sizes: list[int], budget: int, ranks: int) -> list[list[list[int]]]:
    """[rank][micro-batch] -> group indices for groups of `sizes` tokens (see the module docstring).

    `len(sizes)` must split evenly over `ranks` (the rollout gives each rank as many groups)."""
    if budget < 1 or ranks < 1:
        raise ValueError(f"token budget and rank count must be >= 1, got {budget}, {ranks}")
    if not sizes or len(sizes) % ranks:
        raise ValueError(f"{len(sizes)} prompt groups cannot be split evenly over {ranks} ranks")
    per_rank = len(sizes) // ranks
    owned = _longest_first(sizes, ranks, capacity=per_rank)
    rank_sizes = [[sizes[g] for g in groups] for groups in owned]
    lower = max(-(-sum(s) // budget) for s in rank_sizes)
    for count in range(max(1, min(lower, per_rank)), per_rank + 1):
        local = [_longest_first(s, count) for s in rank_sizes]
        if all(_fits(s, bins, budget) for s, bins in zip(rank_sizes, local, strict=True)):
            break
    return [[[groups[i] for i in b] for b in bins] for groups, bins in zip(owned, local, strict=True)]


def by_token_budget(groups: list[list[Trajectory]], budget: int, rank: int, ranks: int) -> list[list[Trajectory]]:
    """This rank's micro-batches of about `budget` tokens, from `groups`: every rank's groups in
    global order. Trajectories carry their global group index (`Trajectory.group` is rank-local
    at rollout; groups from two ranks can now share a micro-batch)."""
    plan = plan_micro_batches([group_tokens(g) for g in groups], budget, ranks)
    return [[dataclasses.replace(t, group=g) for g in micro for t in groups[g]] for micro in plan[rank]]
