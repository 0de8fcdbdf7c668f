"""The paper's ablations as training paths: single-turn RL, STaR in Stage II, no online turn-1 samples."""

import copy

import pytest
import torch

from score.model import from_pretrained, load_tokenizer
from score.rl import trainer as trainer_module
from score.rl.config import ConfigError
from score.rl.factories import load_problems, make_engine, prompt_builder
from score.rl.loss import loss_denominator, micro_batch_loss, pack
from score.rl.rollout import RolloutSpec, run_rollout
from tests.helpers.tiny_run import ParityReward, tiny_config, trainer_with_parity
from tests.helpers.trajectories import trajectory


def traj(group, a1, a2, r1, r2, base=False):
    return trajectory(group, [a1, a2], [r1, r2], prompt=[5, 6], instruction=[10], base=base)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("variants"))
    policy = from_pretrained(cfg.model.path)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, policy, reference


def test_star_stage2_trains_only_the_successful_attempts(models):
    cfg, policy, reference = models
    cfg = copy.deepcopy(cfg)
    cfg.score.stage2_update = "star"
    trajs = [
        traj(0, [8, 9], [11, 12, 13], 1.0, 0.0),
        traj(0, [14], [15, 16], 0.0, 1.0),
        traj(1, [17, 18], [20], 1.0, 1.0),
        traj(1, [28], [29, 30], 0.0, 1.0, base=True),
    ]
    denominator = loss_denominator(trajs, "token_mean", star=True)
    assert denominator == 2 + 2 + 3 + 2  # a base-sampled attempt 1 is never trained, whatever its reward
    batch = pack(trajs, torch.device("cpu"))
    out, logp, _ = micro_batch_loss(policy, reference, batch, cfg, 2, denominator)
    (grad,) = torch.autograd.grad(out.loss, logp)
    successful = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float32)  # rows in pack order
    torch.testing.assert_close(grad, -successful / denominator)
    torch.testing.assert_close(out.loss, -(logp.detach() * successful).sum() / denominator)
    # Stage I keeps REINFORCE: the STaR switch is for Stage II only.
    stage1, logp1, _ = micro_batch_loss(policy, reference, batch, cfg, 1, loss_denominator(trajs, "token_mean"))
    cfg.score.stage2_update = "reinforce"
    reinforce, _, _ = micro_batch_loss(policy, reference, batch, cfg, 1, loss_denominator(trajs, "token_mean"))
    torch.testing.assert_close(stage1.loss, reinforce.loss)


def test_single_turn_samples_and_trains_attempt_1_only(models, tmp_path, closes):
    cfg, policy, reference = models
    trajectories, _ = run_rollout(
        make_engine(cfg, policy),
        prompt_builder(cfg, load_tokenizer(cfg.model.path)),
        load_problems(cfg, cfg.data.train)[:2],
        ParityReward(),
        RolloutSpec(k=2, temperature=1.0, budgets=(4, 4), attempts=1, seed=0),
    )
    assert all(len(t.attempts) == 1 for t in trajectories)
    assert all(t.token_ids == t.prompt_ids + t.attempts[0].ids for t in trajectories)

    single = copy.deepcopy(cfg)
    single.score.single_turn, single.score.stage1_steps, single.score.stage2_steps = True, 0, 2
    trajs = [trajectory(0, [[8, 9]], [1.0], prompt=[5, 6]), trajectory(0, [[14, 15, 16]], [0.0], prompt=[5, 6])]
    batch = pack(trajs, torch.device("cpu"))
    assert set(batch.attempt.tolist()) == {1}
    out, logp, _ = micro_batch_loss(policy, reference, batch, single, 2, loss_denominator(trajs, "token_mean"))
    kl1 = out.kl[:, 0].double()
    r1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out.returns[:, 0].double(), r1 - single.score.beta1 * kl1, atol=1e-6, rtol=1e-5)

    m = closes(trainer_with_parity(single, tmp_path / "single")).train_step()
    assert "reward_2" not in m and "acc_t2" not in m and m["len_1"] > 0


def test_multi_turn_rl_trains_each_attempt_on_its_own_reward(models, tmp_path, closes):
    """The demo's multi_turn_rl row (METHODS): no Stage I, Stage II's returns with alpha = 0, so each
    attempt's return is its own reward less its KL, with no bonus for changing the answer."""
    from score.rl.demo.settings import METHODS

    cfg, policy, reference = models
    multi = copy.deepcopy(cfg)
    for key, value in METHODS["multi_turn_rl"][1].items():
        setattr(multi.score, key, value)
    multi.score.stage2_steps = 2
    trajs = [traj(0, [8, 9], [11, 12], 0.0, 1.0), traj(0, [14], [15, 16, 17], 1.0, 0.0), traj(0, [18], [19], 1.0, 1.0)]
    batch = pack(trajs, torch.device("cpu"))
    out, _, _ = micro_batch_loss(policy, reference, batch, multi, 2, loss_denominator(trajs, "token_mean"))
    kl = out.kl.double()
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out.returns.double(), rewards - multi.score.beta1 * kl, atol=1e-6, rtol=1e-5)
    trainer = closes(trainer_with_parity(multi, tmp_path / "multi"))
    assert trainer.train_step()["stage"] == 2  # from the first step: no Stage I


def test_offline_turn1_takes_every_attempt_1_from_the_base_model(tmp_path, monkeypatch, closes):
    cfg = tiny_config(tmp_path, score__online_first_attempt=False, score__stage1_steps=1, score__stage2_steps=1)
    seen = []
    real = trainer_module.run_rollout

    def spy(engine, *args, **kwargs):
        seen.append((kwargs["from_base"], kwargs["base_engine"]))
        trajectories, stats = real(engine, *args, **kwargs)
        seen[-1] += (trajectories,)
        return trajectories, stats

    monkeypatch.setattr(trainer_module, "run_rollout", spy)
    trainer = closes(trainer_with_parity(cfg, tmp_path / "offline"))
    trainer.fit()
    assert len(seen) == 2  # Stage I and Stage II
    for from_base, base_engine, trajectories in seen:
        assert all(from_base) and base_engine.model is trainer.reference
        assert all(t.first_from_base for t in trajectories)
        assert all(1 not in t.attempt_labels for t in trajectories)  # attempt 1 is context, never trained


def test_variant_combinations_that_train_nothing_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="stage1_steps = 0"):
        tiny_config(tmp_path, score__single_turn=True)
    with pytest.raises(ConfigError, match="trains nothing"):
        tiny_config(tmp_path, score__single_turn=True, score__stage1_steps=0, score__online_first_attempt=False)
    with pytest.raises(ConfigError, match="stage2_update"):
        tiny_config(tmp_path, score__single_turn=True, score__stage1_steps=0, score__stage2_update="star")
