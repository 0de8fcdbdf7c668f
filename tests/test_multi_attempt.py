"""Training with more than two attempts ([ICLR] App. A.1, `score.attempts`): the coefficients of every
attempt, the returns against hand-computed values for N = 3, N-attempt rollouts, the variants the
config no longer refuses at N = 3, and a tiny three-attempt run through Stage I(a), I(b), II that
resumes bit for bit."""

import json

import pytest
import torch

import score.rl.loss as loss_module
from score.model import Engine, from_pretrained, load_tokenizer
from score.rl.config import ConfigError, RunConfig, config_from_dict
from score.rl.data import Problem
from score.rl.loss import (
    AttemptCoefficients,
    attempt_coefficients,
    loss_denominator,
    micro_batch_loss,
    pack,
    successful_attempt_rows,
)
from score.rl.prompts import PromptBuilder
from score.rl.rollout import RolloutSpec, run_rollout
from score.rl.schedule import attempts_at, stage1_part, stage_of
from tests.helpers.tiny_run import tiny_config, trainer_with_parity
from tests.helpers.trajectories import trajectory

ALPHA, BETA1, BETA2 = 10.0, 0.01, 0.1


def traj(group, attempts, rewards):
    """A trajectory with prompt [1, 2], instruction [3] between attempts, the given attempt ids."""
    return trajectory(group, attempts, rewards)


def three_attempt_batch():
    return [
        traj(0, [[4, 5], [6], [7, 8]], [0.0, 1.0, 1.0]),
        traj(0, [[9], [10, 11], [12]], [1.0, 0.0, 1.0]),
        traj(1, [[13], [14], [15, 16, 17]], [0.0, 0.0, 1.0]),
        traj(1, [[18, 19], [20], [21]], [1.0, 1.0, 0.0]),
    ]


def test_coefficients_of_two_and_three_attempts():
    # two attempts: the stage table of rl/loss.py
    assert attempt_coefficients(1, 1, 2, ALPHA, BETA1, BETA2) == AttemptCoefficients(
        [0.0, 1.0], [0.0, 0.0], [BETA2, BETA1], [True, False]
    )
    assert attempt_coefficients(2, 1, 2, ALPHA, BETA1, BETA2) == AttemptCoefficients(
        [1.0, 1.0], [0.0, ALPHA], [BETA1, BETA1], [False, False]
    )
    # Stage I part 2 of three: attempts 1, 2 held at the anchor, attempt 3 trained
    assert attempt_coefficients(1, 2, 3, ALPHA, BETA1, BETA2) == AttemptCoefficients(
        [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [BETA2, BETA2, BETA1], [True, True, False]
    )
    assert attempt_coefficients(2, 1, 3, ALPHA, BETA1, BETA2) == AttemptCoefficients(
        [1.0] * 3, [0.0, ALPHA, ALPHA], [BETA1] * 3, [False] * 3
    )
    assert attempt_coefficients(2, 1, 1, ALPHA, BETA1, BETA2).progress_bonus == [0.0]  # single-turn RL
    with pytest.raises(ValueError, match="part 2 trains attempt 3"):
        attempt_coefficients(1, 2, 2, ALPHA, BETA1, BETA2)


def test_pack_labels_and_rewards_of_later_attempts():
    b = pack(three_attempt_batch(), torch.device("cpu"))
    # trajectory 0: [1, 2 | 4, 5 | 3 | 6 | 3 | 7, 8]: rows predict 4, 5 (1), 6 (2), 7, 8 (3)
    assert b.targets[:5].tolist() == [4, 5, 6, 7, 8] and b.attempt[:5].tolist() == [1, 1, 2, 3, 3]
    assert b.rows[:5].tolist() == [1, 2, 4, 6, 7]
    assert b.rewards.tolist()[2] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same number of attempts"):
        pack(three_attempt_batch()[:1] + [traj(0, [[4], [5]], [0.0, 1.0])], torch.device("cpu"))


def hand_returns(batch, logp, ref, anchor, c: AttemptCoefficients):
    """float64 returns [S, A] and the loss from the formulas: k1 sequence KL per attempt (anchor or
    base), w_a r_a + b_a (r_a - r_{a-1}) - beta_a KL_a, leave-one-out advantages, -sum A / tokens."""
    S, A = batch.rewards.shape
    cu = batch.cu_active.tolist()
    rewards = batch.rewards.double()
    R = torch.zeros(S, A, dtype=torch.float64)
    for s in range(S):
        for a in range(A):
            rows = [i for i in range(cu[s], cu[s + 1]) if int(batch.attempt[i]) == a + 1]
            other = anchor if c.anchored[a] else ref
            kl = sum(float(logp[i]) - float(other[i]) for i in rows)
            previous = rewards[s, a - 1] if a > 0 else 0.0
            R[s, a] = c.reward_weight[a] * rewards[s, a] + c.progress_bonus[a] * (rewards[s, a] - previous)
            R[s, a] -= c.beta[a] * kl
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


class Given(torch.nn.Module):
    """A stand-in model whose attempt-token log-probs are given (attempt_logprobs is patched to read them)."""

    def __init__(self, logp):
        super().__init__()
        self.logp = logp


def given_logprobs(model, batch, temperature, autocast, *, entropy=False):
    return (model.logp, torch.zeros_like(model.logp)) if entropy else model.logp


@pytest.mark.parametrize("stage,part", [(1, 2), (2, 1)])
def test_three_attempt_returns_and_loss_match_hand_computation(stage, part, monkeypatch):
    monkeypatch.setattr(loss_module, "attempt_logprobs", given_logprobs)
    batch = pack(three_attempt_batch(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    n = batch.targets.numel()
    logp = (-torch.rand(n, generator=gen) * 3).requires_grad_()
    ref, anchor = -torch.rand(n, generator=gen) * 3, -torch.rand(n, generator=gen) * 3
    out, _, _ = micro_batch_loss(
        Given(logp), Given(ref), batch, free_config(), stage, float(n), part=part, anchor=Given(anchor)
    )
    want = attempt_coefficients(stage, part, 3, ALPHA, BETA1, BETA2)
    R, loss = hand_returns(batch, logp.detach(), ref, anchor, want)
    torch.testing.assert_close(out.returns.double(), R, atol=1e-5, rtol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-5)
    out.loss.backward()  # KL in the reward is detached: d loss / d logp_t = -A[s_t, a_t] / tokens
    cu = batch.cu_active.tolist()
    for s in range(len(cu) - 1):
        for i in range(cu[s], cu[s + 1]):
            assert float(logp.grad[i]) == pytest.approx(-float(out.advantages[s, int(batch.attempt[i]) - 1]) / n)


def free_config():
    cfg = RunConfig()
    cfg.score.alpha, cfg.score.beta1, cfg.score.beta2 = ALPHA, BETA1, BETA2
    return cfg


def test_star_rows_and_denominator_know_every_attempt():
    trajs = three_attempt_batch()
    batch = pack(trajs, torch.device("cpu"))
    # rewards (0, 1, 1), (1, 0, 1), (0, 0, 1), (1, 1, 0) over attempts of lengths as in three_attempt_batch
    want = [0, 0, 1, 1, 1] + [1, 0, 0, 1] + [0, 0, 1, 1, 1] + [1, 1, 1, 0]
    assert successful_attempt_rows(batch).tolist() == want
    assert loss_denominator(trajs, "token_mean", star=True) == sum(want)
    assert loss_denominator(trajs, "token_mean") == len(want)


def test_schedule_of_three_attempts():
    cfg = free_config()
    cfg.score.attempts, cfg.score.stage1_steps, cfg.score.stage2_steps = 3, 2, 3
    assert cfg.total_steps == 7
    assert [stage_of(s, cfg) for s in range(7)] == [1, 1, 1, 1, 2, 2, 2]
    assert [stage1_part(s, cfg) for s in range(4)] == [1, 1, 2, 2]
    assert [attempts_at(s, cfg) for s in range(7)] == [2, 2, 3, 3, 3, 3, 3]
    cfg.score.attempts = 2  # two attempts: one part, today's schedule
    assert cfg.total_steps == 5 and [attempts_at(s, cfg) for s in range(5)] == [2] * 5


LIFTED = [
    ("stage2_update", "star"),
    ("normalization", "sequence_mean"),
    ("online_first_attempt", False),
    ("base_first_attempt_mix", 0.5),
]


def test_three_attempt_config_refuses_only_single_turn():
    with pytest.raises(ConfigError, match="single-turn RL samples one attempt"):
        config_from_dict({"score": {"attempts": 3, "single_turn": True, "stage1_steps": 0}})
    with pytest.raises(ConfigError, match="score.attempts must be >= 2"):
        config_from_dict({"score": {"attempts": 1}})
    for key, value in LIFTED:
        assert getattr(config_from_dict({"score": {"attempts": 3, key: value}}).score, key) == value


@pytest.mark.parametrize("key,value", LIFTED)
def test_three_attempt_variants_train(tmp_path, closes, key, value):
    variant = {f"score__{key}": value}
    cfg = tiny_config(tmp_path, score__attempts=3, score__stage1_steps=1, score__stage2_steps=2, **variant)
    trainer = closes(trainer_with_parity(cfg, tmp_path / "run"))
    seen, real = [], trainer._train

    def spy(trajectories, stage, part=1):
        seen.append([t.first_from_base for t in trajectories])
        return real(trajectories, stage, part)

    trainer._train = spy
    trainer.fit()
    trainer.close()
    log = records(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in log] == [1, 1, 2, 2]
    assert all(r["skipped"] == 0 for r in log) and all("reward_3" in r for r in log[1:])
    if key == "online_first_attempt":  # every attempt 1 comes from the base model, in both stages
        assert all(all(step) for step in seen)
    if key == "base_first_attempt_mix":  # Stage II only
        assert not any(any(step) for step in seen[:2])


def test_rollout_later_attempts_extend_the_two_attempt_rollout(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tok = from_pretrained(cfg.model.path), load_tokenizer(cfg.model.path)
    builder = PromptBuilder(tok, chat=False, system_prompt=None, correction_instruction="Check it.")
    problems = [Problem(id=f"p{i}", question=f"last digit of {i}+1+2+3", answer="0") for i in range(3)]

    def reward(texts, probs):
        return [float(len(t) % 2 == 0) for t in texts]

    def run(attempts):
        engine = Engine(model, max_num_seqs=16, num_blocks=256)
        spec = RolloutSpec(k=2, temperature=1.0, budgets=(4, 5), attempts=attempts, seed=7)
        return run_rollout(engine, builder, problems, reward, spec)[0]

    one, two, three = run(1), run(2), run(3)
    for a, b, c in zip(one, two, three, strict=True):
        assert a.attempts == b.attempts[:1] and b.attempts == c.attempts[:2]
        assert [len(t.attempts) for t in (a, b, c)] == [1, 2, 3]
        third = c.attempts[2]
        assert c.token_ids == b.token_ids + builder.instruction_ids + third.ids
        assert third.reward == reward([third.text], None)[0]
        assert third.text == tok.decode(third.ids, skip_special_tokens=True)
        assert c.attempt_labels[-len(third.ids) :] == [3] * len(third.ids) if third.ids else True
    assert run(3)[0].attempts[2].ids == three[0].attempts[2].ids  # seeded


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
