"""Micro-batches by token budget: whole groups, balanced over micro-batches and ranks, the same
micro-batch count on every rank, and the same gradient as today's prompt-count grouping."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from score.rl.config import RunConfig, config_from_dict
from score.rl.loss import loss_denominator, micro_batch_loss, pack
from score.rl.micro_batches import by_prompt_count, by_token_budget, group_tokens, groups_of, plan_micro_batches
from tests.test_trainer import hand_batch, models  # noqa: F401  (the fixture)


def test_longest_first_fills_the_fewest_micro_batches_that_fit():
    # 33 tokens, budget 12: 3 micro-batches at least; longest first gives 11 / 11 / 11
    (plan,) = plan_micro_batches([10, 9, 8, 3, 2, 1], 12, 1)
    assert plan == [[0, 5], [1, 4], [2, 3]]


def test_a_group_longer_than_the_budget_sits_alone():
    (plan,) = plan_micro_batches([50, 4, 4, 4], 10, 1)
    assert [0] in plan and sorted(g for micro in plan for g in micro) == [0, 1, 2, 3]
    assert all(sum([50, 4, 4, 4][g] for g in micro) <= 10 for micro in plan if micro != [0])


def test_ranks_get_equal_group_counts_balanced_tokens_and_the_same_micro_batch_count():
    sizes = [100, 90, 10, 10, 10, 5, 5, 2]
    plan = plan_micro_batches(sizes, 60, 2)
    owned = [sorted(g for micro in rank for g in micro) for rank in plan]
    assert [len(o) for o in owned] == [4, 4]
    assert sorted(owned[0] + owned[1]) == list(range(8))
    assert [sum(sizes[g] for g in o) for o in owned] == [117, 115]  # contiguous halves: 210 / 22
    assert len(plan[0]) == len(plan[1])


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda ranks: st.tuples(
            st.just(ranks),
            st.integers(1, 6).flatmap(
                lambda per: st.lists(st.integers(1, 300), min_size=per * ranks, max_size=per * ranks)
            ),
            st.integers(1, 600),
        )
    )
)
def test_plan_invariants(case):
    ranks, sizes, budget = case
    plan = plan_micro_batches(sizes, budget, ranks)
    per_rank = len(sizes) // ranks
    assert len(plan) == ranks
    assert sorted(g for rank in plan for micro in rank for g in micro) == list(range(len(sizes)))
    assert len({len(rank) for rank in plan}) == 1  # FSDP2: every rank runs as many micro-batches
    for rank in plan:
        assert sum(len(micro) for micro in rank) == per_rank
        for micro in rank:
            assert micro == sorted(micro) and micro  # no empty micro-batch, groups in step order
            assert len(micro) == 1 or sum(sizes[g] for g in micro) <= budget
    assert plan == plan_micro_batches(list(sizes), budget, ranks)  # every rank computes the same plan


def test_plan_bad_input_is_named():
    with pytest.raises(ValueError, match="cannot be split evenly over 2 ranks"):
        plan_micro_batches([1, 2, 3], 10, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_micro_batches([1, 2], 0, 1)


def test_token_budget_gives_the_gradient_of_one_big_batch(models):  # noqa: F811
    cfg, policy, reference = models
    trajs = hand_batch()
    groups = groups_of(trajs)
    assert [group_tokens(g) for g in groups] == [24, 14]
    denominator = loss_denominator(trajs, "token_mean")
    cuts = {
        "one batch": [trajs],
        "prompt count": by_prompt_count(trajs, 1),
        "tokens, one each": by_token_budget(groups, 20, 0, 1),
        "tokens, together": by_token_budget(groups, 100, 0, 1),
    }
    assert [len(c) for c in cuts["tokens, one each"]] == [3, 2]
    assert [len(c) for c in cuts["tokens, together"]] == [5]
    grads = {}
    for name, chunks in cuts.items():
        policy.zero_grad()
        for chunk in chunks:
            out, _, _ = micro_batch_loss(policy, reference, pack(chunk, torch.device("cpu")), cfg, 2, denominator)
            out.loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in policy.parameters()]).clone()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads["one batch"], atol=1e-6, rtol=1e-4, msg=name)


def test_groups_from_two_ranks_keep_separate_baselines():
    """Group ids are rank-local at rollout; sharing a micro-batch must not merge two ranks' group 0."""
    rank0, rank1 = hand_batch(), hand_batch()
    groups = groups_of(rank0) + groups_of(rank1)  # what `gather` returns: local ids 0, 1, 0, 1
    (micro,) = by_token_budget(groups, 10_000, 0, 1)
    assert sorted({t.group for t in micro}) == [0, 1, 2, 3]
    assert pack(micro, torch.device("cpu")).group_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_tokens_per_micro_batch_config_is_checked():
    cfg = RunConfig()
    assert cfg.optim.tokens_per_micro_batch == 0
    with pytest.raises(ValueError, match="tokens_per_micro_batch"):
        config_from_dict({"optim": {"tokens_per_micro_batch": -1}})


def test_random_groups_balance_within_one_group_of_the_mean():
    rng = random.Random(0)
    sizes = [rng.randint(50, 400) for _ in range(64)]
    plan = plan_micro_batches(sizes, 2000, 4)
    loads = [sum(sizes[g] for g in micro) for rank in plan for micro in rank]
    mean = sum(loads) / len(loads)
    assert max(loads) - min(loads) <= max(sizes)
    assert max(loads) <= 2000 and max(loads) < 1.25 * mean
