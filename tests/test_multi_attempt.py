"""Training with more than two attempts ([ICLR] App. A.1, `score.attempts`): the returns of every
attempt against hand-computed values for N = 3, the per-attempt composition against the two-attempt
kernel call at N = 2, N-attempt rollouts, and a tiny three-attempt run through Stage I(a), I(b), II
that resumes bit for bit."""

import json

import pytest
import torch

from score.kernels import score_loss
from score.model import Engine, from_pretrained, load_tokenizer
from score.rl.config import ConfigError, config_from_dict
from score.rl.data import Problem
from score.rl.loss import (
    AttemptTerm,
    attempt_terms,
    micro_batch_loss,
    multi_attempt_loss,
    pack,
    stage_coefficients,
)
from score.rl.prompts import PromptBuilder
from score.rl.rollout import LaterAttempt, Trajectory, two_attempt_rollout
from score.rl.schedule import attempts_at, stage1_part, stage_of
from tests.helpers.tiny_run import tiny_config, trainer_with_parity

ALPHA, BETA1, BETA2 = 10.0, 0.01, 0.1


def traj(group, attempts, rewards):
    """A trajectory with prompt [1, 2], instruction [3] between attempts, the given attempt ids."""
    return Trajectory(
        group=group,
        problem=Problem("p", "q", "1"),
        prompt_ids=[1, 2],
        attempt1_ids=attempts[0],
        attempt1_logprobs=[-1.0] * len(attempts[0]),
        finish1="stop",
        instruction_ids=[3],
        attempt2_ids=attempts[1],
        attempt2_logprobs=[-1.0] * len(attempts[1]),
        finish2="stop",
        r1=rewards[0],
        r2=rewards[1],
        later=[
            LaterAttempt([3], ids, [-1.0] * len(ids), "stop", "", r)
            for ids, r in zip(attempts[2:], rewards[2:], strict=True)
        ],
    )


def three_attempt_batch():
    return [
        traj(0, [[4, 5], [6], [7, 8]], [0.0, 1.0, 1.0]),
        traj(0, [[9], [10, 11], [12]], [1.0, 0.0, 1.0]),
        traj(1, [[13], [14], [15, 16, 17]], [0.0, 0.0, 1.0]),
        traj(1, [[18, 19], [20], [21]], [1.0, 1.0, 0.0]),
    ]


def test_terms_of_two_attempts_are_the_stage_table():
    for stage in (1, 2):
        c = stage_coefficients(stage, ALPHA, BETA1, BETA2)
        one, two = attempt_terms(stage, 1, 2, ALPHA, BETA1, BETA2)
        assert (one.weight, one.beta) == (c["r1_weight"], c["beta_attempt1"])
        assert (two.weight, two.bonus, two.beta) == (1.0, c["progress_bonus"], c["beta_attempt2"])
    assert attempt_terms(1, 2, 3, ALPHA, BETA1, BETA2) == [
        AttemptTerm(1, 0.0, 0.0, BETA2, True),
        AttemptTerm(2, 0.0, 0.0, BETA2, True),
        AttemptTerm(3, 1.0, 0.0, BETA1, False),
    ]
    assert [(t.weight, t.bonus) for t in attempt_terms(2, 1, 3, ALPHA, BETA1, BETA2)] == [
        (1.0, 0.0),
        (1.0, ALPHA),
        (1.0, ALPHA),
    ]
    with pytest.raises(ValueError, match="part 2 trains attempt 3"):
        attempt_terms(1, 2, 2, ALPHA, BETA1, BETA2)


def test_pack_labels_and_rewards_of_later_attempts():
    b = pack(three_attempt_batch(), torch.device("cpu"))
    # trajectory 0: [1, 2 | 4, 5 | 3 | 6 | 3 | 7, 8]: rows predict 4, 5 (1), 6 (2), 7, 8 (3)
    assert b.targets[:5].tolist() == [4, 5, 6, 7, 8] and b.attempt[:5].tolist() == [1, 1, 2, 3, 3]
    assert b.rows[:5].tolist() == [1, 2, 4, 6, 7]
    assert b.rewards.tolist()[2] == [0.0, 0.0, 1.0]


def hand_returns(batch, logp, ref, anchor, terms):
    """float64 returns [S, A] and the loss from the formulas: k1 sequence KL per attempt (anchor or
    base), weight r_a + bonus (r_a - r_{a-1}) - beta KL_a, leave-one-out advantages, -sum A / tokens."""
    S, A = batch.rewards.shape
    cu = batch.cu_active.tolist()
    rewards = batch.rewards.double()
    R = torch.zeros(S, A, dtype=torch.float64)
    for s in range(S):
        for t in terms:
            a = t.attempt - 1
            rows = [i for i in range(cu[s], cu[s + 1]) if int(batch.attempt[i]) == t.attempt]
            other = anchor if t.anchored else ref
            kl = sum(float(logp[i]) - float(other[i]) for i in rows)
            previous = rewards[s, a - 1] if a > 0 else 0.0
            R[s, a] = t.weight * rewards[s, a] + t.bonus * (rewards[s, a] - previous) - t.beta * kl
    groups = batch.group_ids.tolist()
    adv = torch.zeros_like(R)
    for s in range(S):
        mates = [o for o in range(S) if groups[o] == groups[s] and o != s]
        adv[s] = R[s] - sum(R[o] for o in mates) / len(mates)
    tokens = int((batch.attempt > 0).sum())
    loss = 0.0
    for s in range(S):
        for i in range(cu[s], cu[s + 1]):
            loss -= float(adv[s, int(batch.attempt[i]) - 1]) / tokens
    return R, loss


@pytest.mark.parametrize("stage,part", [(1, 2), (2, 1)])
def test_three_attempt_returns_and_loss_match_hand_computation(stage, part):
    batch = pack(three_attempt_batch(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    n = batch.targets.numel()
    logp = (-torch.rand(n, generator=gen) * 3).requires_grad_()
    ref, anchor = -torch.rand(n, generator=gen) * 3, -torch.rand(n, generator=gen) * 3
    cfg = tiny_config_free()
    terms = attempt_terms(stage, part, 3, ALPHA, BETA1, BETA2)
    out = multi_attempt_loss(logp, ref, anchor, batch, cfg, terms, float(n))
    R, loss = hand_returns(batch, logp.detach(), ref, anchor, terms)
    torch.testing.assert_close(out.returns.double(), R, atol=1e-5, rtol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-5)
    out.loss.backward()  # KL in the reward is detached: d loss / d logp_t = -A[s_t, a_t] / tokens
    cu = batch.cu_active.tolist()
    for s in range(len(cu) - 1):
        for i in range(cu[s], cu[s + 1]):
            assert float(logp.grad[i]) == pytest.approx(-float(out.advantages[s, int(batch.attempt[i]) - 1]) / n)


def tiny_config_free():
    from score.rl.config import RunConfig

    cfg = RunConfig()
    cfg.score.alpha, cfg.score.beta1, cfg.score.beta2 = ALPHA, BETA1, BETA2
    return cfg


@pytest.mark.parametrize("stage", [1, 2])
def test_per_attempt_composition_equals_the_two_attempt_call(stage):
    trajs = [t for t in three_attempt_batch()]
    for t in trajs:
        t.later = []
    batch = pack(trajs, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    n = batch.targets.numel()
    logp = -torch.rand(n, generator=gen) * 3
    ref = -torch.rand(n, generator=gen) * 3
    cfg = tiny_config_free()
    lp1, lp2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    two = score_loss(
        lp1,
        ref,
        batch.attempt,
        batch.cu_active,
        batch.group_ids,
        batch.r1,
        batch.r2,
        **stage_coefficients(stage, ALPHA, BETA1, BETA2),
    )
    composed = multi_attempt_loss(lp2, ref, ref, batch, cfg, attempt_terms(stage, 1, 2, ALPHA, BETA1, BETA2), float(n))
    two.loss.backward()
    composed.loss.backward()
    torch.testing.assert_close(composed.returns, two.returns, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(composed.kl, two.kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(composed.loss, two.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lp2.grad, lp1.grad, atol=1e-7, rtol=1e-6)


def test_schedule_of_three_attempts():
    cfg = tiny_config_free()
    cfg.score.attempts, cfg.score.stage1_steps, cfg.score.stage2_steps = 3, 2, 3
    assert cfg.total_steps == 7
    assert [stage_of(s, cfg) for s in range(7)] == [1, 1, 1, 1, 2, 2, 2]
    assert [stage1_part(s, cfg) for s in range(4)] == [1, 1, 2, 2]
    assert [attempts_at(s, cfg) for s in range(7)] == [2, 2, 3, 3, 3, 3, 3]
    cfg.score.attempts = 2  # two attempts: one part, today's schedule
    assert cfg.total_steps == 5 and [attempts_at(s, cfg) for s in range(5)] == [2] * 5


def test_three_attempt_config_refuses_two_attempt_variants():
    for key, value in (("single_turn", True), ("stage2_update", "star"), ("normalization", "sequence_mean")):
        with pytest.raises(ConfigError, match=f"score.{key}"):
            config_from_dict({"score": {"attempts": 3, key: value, "stage1_steps": 0}})
    with pytest.raises(ConfigError, match="score.attempts must be >= 2"):
        config_from_dict({"score": {"attempts": 1}})


def test_rollout_later_attempts_extend_the_two_attempt_rollout(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tok = from_pretrained(cfg.model.path), load_tokenizer(cfg.model.path)
    builder = PromptBuilder(tok, chat=False, system_prompt=None, correction_instruction="Check it.")
    problems = [Problem(id=f"p{i}", question=f"last digit of {i}+1+2+3", answer="0") for i in range(3)]

    def reward(texts, probs):
        return [float(len(t) % 2 == 0) for t in texts]

    def run(attempts):
        engine = Engine(model, max_num_seqs=16, num_blocks=256)
        kw = dict(k=2, temperature=1.0, max_tokens1=4, max_tokens2=5, seed=7)
        return two_attempt_rollout(engine, builder, problems, reward, attempts=attempts, **kw)[0]

    two, three = run(2), run(3)
    for a, b in zip(two, three, strict=True):
        assert (a.attempt1_ids, a.attempt2_ids, a.r1, a.r2) == (b.attempt1_ids, b.attempt2_ids, b.r1, b.r2)
        assert a.later == [] and len(b.later) == 1
        third = b.later[0]
        before = a.token_ids
        assert b.token_ids == before + builder.instruction_ids + third.ids
        assert third.reward == reward([third.text], None)[0]
        assert third.text == tok.decode(third.ids, skip_special_tokens=True)
        assert b.attempt_labels[-len(third.ids) :] == [3] * len(third.ids) if third.ids else True
    assert run(3)[0].later[0].ids == three[0].later[0].ids  # seeded


def test_part_two_needs_its_anchor(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.score.attempts = 3
    model = from_pretrained(cfg.model.path)
    batch = pack(three_attempt_batch(), torch.device("cpu"))
    with pytest.raises(ValueError, match="anchor model"):
        micro_batch_loss(model, model, batch, cfg, 1, 10.0, part=2)


def records(path):
    drop = {"time", "rollout_s", "reward_s", "train_s", "rollout_tokens_per_s", "train_tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(path)]


def test_three_attempt_run_goes_through_both_parts_of_stage_one_and_resumes_bit_for_bit(tmp_path, closes):
    cfg = tiny_config(tmp_path, score__attempts=3, score__stage2_steps=2, run__checkpoint_every=1)
    full = closes(trainer_with_parity(cfg, tmp_path / "full"))
    full.fit()
    full.close()
    log = records(tmp_path / "full" / "metrics.jsonl")
    assert [r["stage"] for r in log] == [1, 1, 1, 1, 2, 2]
    assert ["reward_3" in r for r in log] == [False, False, True, True, True, True]
    assert all(r["skipped"] == 0 for r in log)
    # the anchor of part 2 is the model that ended part 1, saved for resuming
    anchor = from_pretrained(tmp_path / "full" / "anchors" / "part1").state_dict()
    base = from_pretrained(cfg.model.path).state_dict()
    assert any(not torch.equal(anchor[k], base[k]) for k in base)

    part = closes(trainer_with_parity(cfg, tmp_path / "resumed"))
    part.fit(max_steps=3)  # stopped inside part 2
    part.close()
    again = closes(trainer_with_parity(cfg, tmp_path / "resumed", resume=True))
    assert again.step == 3
    again.fit()
    again.close()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k]), k
    assert records(tmp_path / "resumed" / "metrics.jsonl") == log
