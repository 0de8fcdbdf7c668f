"""Trainer wiring: returns/advantages per stage and KL placement on a hand-checked batch, packing,
micro-batch accumulation, NaN skipping, bit-for-bit resume, and a tiny Stage I + Stage II run."""

import copy
import json
import math

import pytest
import torch

from score.model import from_pretrained
from score.rl.loss import loss_denominator, micro_batch_loss, pack
from score.rl.micro_batches import by_prompt_count
from score.rl.schedule import DataOrder, lr_at, stage_of
from score.rl.trainer import Trainer
from tests.helpers.tiny_run import ParityReward, tiny_config, trainer_with_parity
from tests.helpers.trajectories import trajectory

ALPHA, BETA1, BETA2 = 10.0, 0.01, 0.1


def traj(group, prompt, a1, ins, a2, r1, r2, base=False):
    return trajectory(group, [a1, a2], [r1, r2], prompt=prompt, instruction=ins, base=base)


def hand_batch():
    return [
        traj(0, [5, 6, 7], [8, 9], [10], [11, 12, 13], 1.0, 0.0),
        traj(0, [5, 6, 7], [14], [10], [15, 16], 0.0, 1.0),
        traj(0, [5, 6, 7], [17, 18, 19], [10], [20], 0.0, 0.0),
        traj(1, [21, 22], [23, 24], [25, 26], [27], 1.0, 1.0),
        traj(1, [21, 22], [28], [25, 26], [29, 30], 0.0, 1.0, base=True),
    ]


def dense_logp64(model, t):
    """float64 log-probs of every token of a trajectory from materialised logits (the oracle)."""
    m = copy.deepcopy(model).double()
    ids = torch.tensor([t.token_ids])
    logits = m(ids)[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return torch.cat([torch.zeros(1, dtype=torch.float64), logp])  # position-aligned: logp[pos]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring")
    cfg = tiny_config(root)
    policy = from_pretrained(cfg.model.path)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # make the policy differ from the reference so KL is not zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, policy, reference


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("placement", ["kl_in_reward", "kl_loss"])
def test_returns_and_advantages_match_the_design_table(models, stage, placement):
    cfg, policy, reference = models
    cfg = copy.deepcopy(cfg)
    cfg.score.kl_placement = placement
    trajs = hand_batch()
    batch = pack(trajs, torch.device("cpu"))
    denominator = loss_denominator(trajs, "token_mean")
    out, logp, _ = micro_batch_loss(policy, reference, batch, cfg, stage, denominator)

    returns = []
    for t in trajs:
        lp, ref = dense_logp64(policy, t), dense_logp64(reference, t)
        labels = t.attempt_labels
        kl1 = sum(float((lp[i] - ref[i]).detach()) for i, lab in enumerate(labels) if lab == 1)
        kl2 = sum(float((lp[i] - ref[i]).detach()) for i, lab in enumerate(labels) if lab == 2)
        if t.first_from_base:
            assert kl1 == 0.0  # base-model first attempts are context, never trained on
        k = placement == "kl_in_reward"
        r1, r2 = t.rewards
        if stage == 1:
            returns.append((-BETA2 * kl1 * k, r2 - BETA1 * kl2 * k))
        else:
            returns.append((r1 - BETA1 * kl1 * k, r2 + ALPHA * (r2 - r1) - BETA1 * kl2 * k))
    expect = torch.tensor(returns, dtype=torch.float64)
    torch.testing.assert_close(out.returns.double(), expect, atol=2e-5, rtol=1e-4)
    adv = torch.empty_like(expect)
    for g in (0, 1):
        idx = [i for i, t in enumerate(trajs) if t.group == g]
        for i in idx:
            others = [j for j in idx if j != i]
            adv[i] = expect[i] - expect[others].mean(0)
    torch.testing.assert_close(out.advantages.double(), adv, atol=2e-5, rtol=1e-4)
    # Loss: token mean over attempt tokens of -A (+ per-token KL with kl_loss), checked through its gradient.
    (grad,) = torch.autograd.grad(out.loss, logp)
    a_tok = torch.cat(
        [
            torch.full((n,), float(adv[s, a - 1]))
            for s, t in enumerate(trajs)
            for a, n in ((1, 0 if t.first_from_base else len(t.attempts[0].ids)), (2, len(t.attempts[1].ids)))
        ]
    )
    if placement == "kl_in_reward":
        expected_grad = -a_tok.double() / denominator
    else:  # plus beta_t dKL_t/dlogp_t per token; k1 (the config's kl_kind): KL_t = logp_t - ref_t, slope 1
        assert cfg.score.kl_kind == "k1"
        beta_tok = torch.cat(
            [
                torch.full((n,), (BETA2 if stage == 1 and a == 1 else BETA1), dtype=torch.float64)
                for t in trajs
                for a, n in ((1, 0 if t.first_from_base else len(t.attempts[0].ids)), (2, len(t.attempts[1].ids)))
            ]
        )
        expected_grad = (-a_tok.double() + beta_tok) / denominator
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6, rtol=1e-5)


def test_pack_rows_targets_and_labels():
    trajs = hand_batch()
    b = pack(trajs, torch.device("cpu"))
    assert b.cu_seqlens.tolist() == [0, 9, 16, 24, 31, 38]
    # trajectory 0: rows predict y1 (8, 9) and y2 (11, 12, 13)
    assert b.rows[:5].tolist() == [2, 3, 5, 6, 7]
    assert b.targets[:5].tolist() == [8, 9, 11, 12, 13]
    assert b.attempt[:5].tolist() == [1, 1, 2, 2, 2]
    assert b.cu_active.tolist() == [0, 5, 8, 12, 15, 17]  # the base first attempt (28) is not a row
    assert b.group_ids.tolist() == [0, 0, 0, 1, 1]
    assert loss_denominator(trajs, "token_mean") == 17 and loss_denominator(trajs, "sequence_mean") == 5


def test_micro_batches_keep_groups_and_accumulate_to_the_full_batch(models):
    cfg, policy, reference = models
    trajs = hand_batch()
    chunks = by_prompt_count(trajs, 1)
    assert [[t.group for t in c] for c in chunks] == [[0, 0, 0], [1, 1]]
    denominator = loss_denominator(trajs, "token_mean")
    grads = []
    for parts in (chunks, [trajs]):
        policy.zero_grad()
        for c in parts:
            out, _, _ = micro_batch_loss(policy, reference, pack(c, torch.device("cpu")), cfg, 2, denominator)
            out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]).clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_schedule_stage_and_data_order():
    from score.rl.config import RunConfig

    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.score.stage1_steps, cfg.score.stage2_steps = 1.0, 4, 10, 10
    assert [lr_at(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cfg.optim.schedule = "cosine"
    assert lr_at(4, cfg) == pytest.approx(1.0) and lr_at(19, cfg) < 0.2
    assert stage_of(9, cfg) == 1 and stage_of(10, cfg) == 2
    order = DataOrder(5, 3, seed=0, shuffle=True)
    seen = order.indices(0) + order.indices(1)[:2]
    assert sorted(seen) == list(range(5))  # one epoch = a permutation
    assert DataOrder(5, 3, seed=0, shuffle=True).indices(3) == order.indices(3)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def records(path):
    drop = {"time", "rollout_s", "reward_s", "train_s", "rollout_tokens_per_s", "train_tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(path)]


def test_stage1_stage2_run_and_resume_is_bit_identical(tmp_path, closes):
    cfg = tiny_config(tmp_path)
    full = closes(trainer_with_parity(cfg, tmp_path / "full"))
    before = weights(full.policy)
    full.fit()
    full.close()
    log = records(tmp_path / "full" / "metrics.jsonl")
    assert [r["stage"] for r in log] == [1, 1, 2, 2] and [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in log)
    assert any(not torch.equal(before[k], v) for k, v in full.policy.state_dict().items())
    assert (tmp_path / "full" / "final" / "model.safetensors").exists()
    # the engine's block tables hold the run's longest sequence, not the model's every position
    builder, r = full.builder, cfg.rollout
    longest = max(len(builder.first_attempt_ids(p.question)) for p in full.problems)
    assert full.engine.max_model_len == full.max_model_len
    assert (
        full.max_model_len == longest + r.max_tokens_attempt1 + len(builder.instruction_ids) + r.max_tokens_attempt2 + 1
    )
    assert full.max_model_len < full.policy.config.max_position_embeddings

    part = closes(trainer_with_parity(cfg, tmp_path / "resumed"))
    part.fit(max_steps=2)
    part.close()
    again = closes(trainer_with_parity(cfg, tmp_path / "resumed", resume=True))
    assert again.step == 2
    again.fit()
    again.close()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k]), k
    assert records(tmp_path / "resumed" / "metrics.jsonl") == log


def test_non_finite_loss_skips_the_step(tmp_path, closes):
    cfg = tiny_config(tmp_path)
    trainer = closes(Trainer(cfg, tmp_path / "nan"))
    trainer.reward.close()
    trainer.reward = type("NanReward", (ParityReward,), {"__call__": lambda self, t, p: [float("nan")] * len(t)})()
    before = weights(trainer.policy)
    m = trainer.train_step()
    trainer.close()
    assert m["skipped"] == 1 and "non-finite" in m["skip_reason"]
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_training_data_names_file_and_line(tmp_path, closes):
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n{"id": "b", "problem": "2+2"}\n')
    cfg.data.train = str(bad)
    with pytest.raises(ValueError, match=f"{bad} line 2"):
        closes(Trainer(cfg, tmp_path / "bad"))


def test_existing_run_needs_resume(tmp_path, closes):
    cfg = tiny_config(tmp_path, score__stage1_steps=1, score__stage2_steps=0)
    t = closes(Trainer(cfg, tmp_path / "run"))
    t.fit()
    t.close()
    with pytest.raises(FileExistsError, match="--resume"):
        closes(Trainer(cfg, tmp_path / "run"))
