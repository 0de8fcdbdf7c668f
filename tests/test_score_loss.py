"""score_loss against hand-computed returns/advantages and a float64 per-token loop reference, for two
attempts (the stage table) and for three."""

import importlib
import math

import pytest
import torch

from score.kernels import ScoreLossOutput, score_loss
from score.rl.loss import attempt_coefficients

score_loss_module = importlib.import_module("score.kernels.score_loss")  # the function shares its name

IMPLS = ["torch", "triton"]


def kl_value(lp, rf, kind):
    d = lp - rf
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    r = (-d).clamp(-20, 20)
    return (r.exp() - r - 1).clamp(-10, 10)


def coefficients(stage, alpha, beta1, beta2, attempts=2):
    """The trainer's coefficients of a stage (Stage I: its last part) as score_loss keywords."""
    part = attempts - 1 if stage == 1 else 1
    return attempt_coefficients(stage, part, attempts, alpha, beta1, beta2).kernel_arguments()


def loop_reference(
    logp,
    ref,
    attempt,
    cu,
    groups,
    rewards,
    *,
    stage,
    alpha,
    beta1,
    beta2,
    kind,
    placement,
    baseline,
    normalization,
    denominator=None,
    old=None,
):
    """float64, one trajectory at a time, straight from the returns' formulas (w_a r_a + b_a (r_a -
    r_{a-1}) - beta_a KL_a, stage tables of rl/loss.py); autograd for the grad."""
    lp = logp.double().clone().requires_grad_()
    old = lp.detach() if old is None else old.double()
    S, attempts = rewards.shape
    c = coefficients(stage, alpha, beta1, beta2, attempts)
    betas, weights, bonuses = c["beta"], c["reward_weight"], c["progress_bonus"]
    kl = torch.zeros(S, attempts, dtype=torch.float64)
    ntok = torch.zeros(S)
    for s in range(S):
        for t in range(cu[s], cu[s + 1]):
            a = int(attempt[t])
            if a:
                kl[s, a - 1] += kl_value(lp[t], ref[t].double(), kind).detach()
                ntok[s] += 1
    R = torch.zeros(S, attempts, dtype=torch.float64)
    for s in range(S):
        r = [float(x) for x in rewards[s]]
        for a in range(attempts):
            base = weights[a] * r[a] + (bonuses[a] * (r[a] - r[a - 1]) if a else 0.0)
            R[s, a] = base - (betas[a] * kl[s, a] if placement == "kl_in_reward" else 0.0)
    A = R.clone()
    if baseline == "rloo":
        for s in range(S):
            mates = [j for j in range(S) if groups[j] == groups[s] and j != s]
            A[s] = R[s] - R[mates].mean(0)
    active = int((attempt > 0).sum())
    D = denominator or (active if normalization == "token_mean" else S)
    loss = lp.sum() * 0
    for s in range(S):
        for t in range(cu[s], cu[s + 1]):
            a = int(attempt[t])
            if not a:
                continue
            term = -A[s, a - 1] * torch.exp(lp[t] - old[t])
            if placement == "kl_loss":
                term = term + betas[a - 1] * kl_value(lp[t], ref[t].double(), kind)
            w = 1.0 / D if normalization == "token_mean" else 1.0 / (ntok[s] * D)
            loss = loss + w * term
    (grad,) = torch.autograd.grad(loss, lp)
    return dict(loss=loss.detach(), returns=R, advantages=A, kl=kl, grad=grad)


def random_batch(S=6, seed=0, group_of=None, attempts=2):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (S,), generator=gen)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    logp = -torch.rand(n, generator=gen) * 3
    ref = logp + torch.randn(n, generator=gen) * 0.3
    attempt = torch.randint(0, attempts + 1, (n,), generator=gen)
    groups = torch.tensor(group_of if group_of is not None else [7, 3, 7, 3, 9, 9], dtype=torch.int64)
    rewards = torch.randint(0, 2, (S, attempts), generator=gen).float()
    return logp, ref, attempt, cu, groups, rewards


def run(impl, batch, *, stage=None, alpha=10.0, beta1=0.01, beta2=0.1, **kw):
    """score_loss and the gradient of its loss; `stage` (with alpha, beta1, beta2) picks the
    coefficients through the trainer's stage table, otherwise `kw` must hold them."""
    logp, ref, attempt, cu, groups, rewards = batch
    lp = logp.clone().requires_grad_()
    if stage is not None:
        kw.update(coefficients(stage, alpha, beta1, beta2, rewards.shape[1]))
    out = score_loss(lp, ref, attempt, cu, groups, rewards, impl=impl, **kw)
    out.loss.backward()
    return out, lp.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("placement", ["kl_in_reward", "kl_loss"])
def test_matches_loop_reference(impl, stage, placement):
    batch = random_batch(seed=stage * 10 + len(placement))
    kw = dict(
        stage=stage,
        alpha=10.0,
        beta1=0.01,
        beta2=0.1,
        kl_kind="k3",
        kl_placement=placement,
        baseline="rloo",
        normalization="token_mean",
    )
    out, grad = run(impl, batch, **kw)
    assert isinstance(out, ScoreLossOutput)
    want = loop_reference(
        *batch, kind="k3", **{k: v for k, v in kw.items() if k not in ("kl_kind", "kl_placement")}, placement=placement
    )
    for name in ("returns", "advantages", "kl"):
        assert torch.allclose(getattr(out, name).double(), want[name], atol=1e-5), name
    assert math.isclose(float(out.loss.detach()), float(want["loss"]), abs_tol=1e-5)
    assert torch.allclose(grad.double(), want["grad"], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attempts", [1, 3, 5])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean"])
def test_any_number_of_attempts_matches_loop_reference(impl, attempts, stage, normalization):
    if stage == 1 and attempts == 1:
        pytest.skip("Stage I trains an attempt after the first")
    batch = random_batch(S=8, seed=attempts * 7 + stage, group_of=[5, 1, 5, 1, 2, 2, 5, 1], attempts=attempts)
    placement = "kl_loss" if normalization == "sequence_mean" else "kl_in_reward"
    kw = dict(stage=stage, alpha=3.0, beta1=0.05, beta2=0.2, baseline="rloo", normalization=normalization)
    out, grad = run(impl, batch, kl_kind="k3", kl_placement=placement, **kw)
    want = loop_reference(*batch, kind="k3", placement=placement, **kw)
    assert out.returns.shape == (8, attempts)
    for name in ("returns", "advantages", "kl"):
        assert torch.allclose(getattr(out, name).double(), want[name], atol=1e-5), name
    assert math.isclose(float(out.loss.detach()), float(want["loss"]), abs_tol=1e-5)
    assert torch.allclose(grad.double(), want["grad"], atol=1e-6)


def test_triton_refuses_more_attempts_than_its_lanes_and_auto_takes_the_torch_path(monkeypatch):
    batch = random_batch(attempts=9)
    with pytest.raises(NotImplementedError, match="up to 8 attempts"):
        run("triton", batch, stage=2)
    want, want_grad = run("torch", batch, stage=2)
    # "auto" where the kernel would run (a GPU; here the dispatch says so): the torch path, no error
    monkeypatch.setattr(score_loss_module, "use_triton", lambda impl, tensor, op: True)
    got, got_grad = run("auto", batch, stage=2)
    assert torch.equal(got.loss, want.loss) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3+"])
def test_sequence_mean_old_logp_and_global_denominator(impl, kind):
    batch = random_batch(seed=5)
    logp = batch[0]
    old = logp + torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(
        stage=2,
        alpha=3.0,
        beta1=0.05,
        beta2=0.2,
        kl_placement="kl_loss",
        baseline="rloo",
        normalization="sequence_mean",
        loss_denominator=17,
    )
    out, grad = run(impl, batch, kl_kind=kind, old_logp=old, **kw)
    reference = dict(
        stage=2,
        alpha=3.0,
        beta1=0.05,
        beta2=0.2,
        placement="kl_loss",
        baseline="rloo",
        normalization="sequence_mean",
        denominator=17,
        old=old,
    )
    want = loop_reference(*batch, kind=kind, **reference)
    if kind == "k3+":  # k3's value, k2's gradient: compare the gradient with the k2 reference
        want["grad"] = loop_reference(*batch, kind="k2", **reference)["grad"]
    assert math.isclose(float(out.loss.detach()), float(want["loss"]), abs_tol=1e-5)
    assert torch.allclose(grad.double(), want["grad"], atol=1e-6)


def hand_batch():
    """Two prompts x two trajectories; trajectory s has tokens [ctx, a1, a1, ctx, a2].

    logp = -1 everywhere and ref_logp = logp - d, with per-token log-ratios d chosen so that each
    attempt's k1 KL is a round number: (0.5, 1.0), (1.5, 0.0), (0.0, 2.0), (1.0, 1.0).
    """
    attempt = torch.tensor([0, 1, 1, 0, 2] * 4)
    cu = torch.tensor([0, 5, 10, 15, 20], dtype=torch.int32)
    logp = torch.full((20,), -1.0)
    log_ratio = torch.zeros(20)
    for s, (kl1, kl2) in enumerate([(0.5, 1.0), (1.5, 0.0), (0.0, 2.0), (1.0, 1.0)]):
        log_ratio[5 * s + 1] = log_ratio[5 * s + 2] = kl1 / 2
        log_ratio[5 * s + 4] = kl2
    groups = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    return logp, logp - log_ratio, attempt, cu, groups, rewards


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_stage2_kl_in_reward(impl):
    # KL (k1) per trajectory: (0.5, 1.0), (1.5, 0.0), (0.0, 2.0), (1.0, 1.0); beta1 = 0.1, alpha = 10.
    out, grad = run(impl, hand_batch(), stage=2, alpha=10.0, beta1=0.1, beta2=0.5, kl_kind="k1")
    want_returns = torch.tensor(
        [
            [0.0 - 0.05, 1 + 10 * (1 - 0) - 0.1],
            [1.0 - 0.15, 1 + 10 * (1 - 1) - 0.0],
            [1.0 - 0.00, 0 + 10 * (0 - 1) - 0.2],
            [0.0 - 0.10, 0 + 10 * (0 - 0) - 0.1],
        ]
    )
    assert torch.allclose(out.kl, torch.tensor([[0.5, 1.0], [1.5, 0.0], [0.0, 2.0], [1.0, 1.0]]), atol=1e-6)
    assert torch.allclose(out.returns, want_returns, atol=1e-6)
    # k = 2: each advantage is the difference to the only group mate
    want_adv = torch.stack(
        [
            want_returns[0] - want_returns[1],
            want_returns[1] - want_returns[0],
            want_returns[2] - want_returns[3],
            want_returns[3] - want_returns[2],
        ]
    )
    assert torch.allclose(out.advantages, want_adv, atol=1e-6)
    # token_mean over 12 active tokens; context tokens get no gradient
    assert torch.all(grad[torch.tensor([0, 3] * 4) + torch.arange(4).repeat_interleave(2) * 5] == 0)
    assert math.isclose(float(grad[1]), -float(want_adv[0, 0]) / 12, abs_tol=1e-7)
    assert math.isclose(float(grad[4]), -float(want_adv[0, 1]) / 12, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_stage1_kl_loss(impl):
    # Stage I with kl_loss: returns are (0, r2); attempt-1 tokens carry beta2 * KL, attempt-2 beta1 * KL.
    out, grad = run(impl, hand_batch(), stage=1, beta1=0.1, beta2=0.5, kl_kind="k1", kl_placement="kl_loss")
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(out.returns, torch.stack([torch.zeros(4), r2], 1))
    assert torch.allclose(out.advantages[:, 0], torch.zeros(4))
    assert torch.allclose(out.advantages[:, 1], torch.zeros(4))  # both mates share r2
    # gradient per attempt token = (beta_a * dk1/dlogp) / 12 = beta_a / 12
    assert math.isclose(float(grad[1]), 0.5 / 12, abs_tol=1e-7)
    assert math.isclose(float(grad[4]), 0.1 / 12, abs_tol=1e-7)
    kl_sum = 0.5 * (0.5 + 1.5 + 0.0 + 1.0) + 0.1 * (1.0 + 0.0 + 2.0 + 1.0)
    assert math.isclose(float(out.loss.detach()), kl_sum / 12, abs_tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_stage1_kl_in_reward(impl):
    out, grad = run(impl, hand_batch(), stage=1, beta1=0.1, beta2=0.5, kl_kind="k1")
    # attempt 1: -beta2 * KL1; attempt 2: r2 - beta1 * KL2
    want = torch.tensor([[-0.25, 0.9], [-0.75, 1.0], [0.0, -0.2], [-0.5, -0.1]])
    assert torch.allclose(out.returns, want, atol=1e-6)
    assert torch.allclose(out.advantages[0], want[0] - want[1], atol=1e-6)
    assert math.isclose(float(grad[1]), -(-0.25 + 0.75) / 12, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_stage2_kl_loss(impl):
    out, grad = run(impl, hand_batch(), stage=2, alpha=10.0, beta1=0.1, beta2=0.5, kl_kind="k1", kl_placement="kl_loss")
    # returns carry no KL: (r1, r2 + 10 (r2 - r1))
    want = torch.tensor([[0.0, 11.0], [1.0, 1.0], [1.0, -10.0], [0.0, 0.0]])
    assert torch.allclose(out.returns, want, atol=1e-6)
    # token 1 (trajectory 0, attempt 1): A = 0 - 1 = -1; KL term beta1 * d(k1)/dlogp = 0.1
    assert math.isclose(float(grad[1]), (1.0 + 0.1) / 12, abs_tol=1e-7)
    # token 4 (trajectory 0, attempt 2): A = 11 - 1 = 10
    assert math.isclose(float(grad[4]), (-10.0 + 0.1) / 12, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_coefficients_outside_the_stage_table(impl):
    # Coefficients no stage uses: attempt 1 2 r1 - 0.2 KL1; attempt 2 r2 + 3 (r2 - r1) - 0.4 KL2.
    out, grad = run(
        impl, hand_batch(), reward_weight=[2.0, 1.0], progress_bonus=[0.0, 3.0], beta=[0.2, 0.4], kl_kind="k1"
    )
    want = torch.tensor(
        [
            [0.0 - 0.1, 1 + 3 * (1 - 0) - 0.4],
            [2.0 - 0.3, 1 + 3 * (1 - 1) - 0.0],
            [2.0 - 0.0, 0 + 3 * (0 - 1) - 0.8],
            [0.0 - 0.2, 0 + 3 * (0 - 0) - 0.4],
        ]
    )
    assert torch.allclose(out.returns, want, atol=1e-6)
    assert math.isclose(float(grad[1]), -float(want[0, 0] - want[1, 0]) / 12, abs_tol=1e-7)
    assert math.isclose(float(grad[4]), -float(want[0, 1] - want[1, 1]) / 12, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_progress_bonus_touches_attempt2_tokens_only(impl):
    batch = random_batch(seed=3)
    kw = dict(stage=2, beta1=0.01, beta2=0.1, kl_kind="k1")
    out_a, grad_a = run(impl, batch, alpha=0.0, **kw)
    out_b, grad_b = run(impl, batch, alpha=10.0, **kw)
    attempt = batch[2]
    assert torch.equal(grad_a[attempt == 1], grad_b[attempt == 1])
    assert torch.equal(grad_a[attempt == 0], grad_b[attempt == 0])
    assert torch.equal(out_a.advantages[:, 0], out_b.advantages[:, 0])
    assert not torch.allclose(grad_a[attempt == 2], grad_b[attempt == 2])


@pytest.mark.parametrize("impl", IMPLS)
def test_baseline_none_allows_single_sample_groups(impl):
    batch = random_batch(seed=4, group_of=[0, 1, 2, 3, 4, 5])
    out, _ = run(impl, batch, stage=2, baseline="none")
    assert torch.allclose(out.advantages, out.returns)
    with pytest.raises(ValueError, match="group 0 has a single trajectory"):
        run(impl, batch, stage=2, baseline="rloo")


@pytest.mark.parametrize("impl", IMPLS)
def test_triton_and_torch_agree_with_unsorted_groups(impl):
    batch = random_batch(S=9, seed=8, group_of=[4, 2, 4, 2, 2, 9, 9, 4, 9])
    out, grad = run(impl, batch, stage=2, kl_kind="k2")
    ref_out, ref_grad = run("torch", batch, stage=2, kl_kind="k2")
    assert torch.allclose(out.advantages, ref_out.advantages, atol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_output_element_is_written(impl, monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like
    nan = float("nan")
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(nan))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(nan))
    out, grad = run(impl, random_batch(seed=12), stage=2, kl_kind="k3", normalization="sequence_mean")
    for t in (out.loss, out.returns, out.advantages, out.kl, grad):
        assert torch.isfinite(t).all()


def _bad(**override):
    logp, ref, attempt, cu, groups, rewards = random_batch()
    args = dict(logp=logp, ref_logp=ref, attempt=attempt, cu_seqlens=cu, group_ids=groups, rewards=rewards)
    kw = coefficients(2, 10.0, 0.01, 0.1)
    for k, v in override.items():
        (args if k in args else kw)[k] = v(args) if callable(v) else v
    return lambda: score_loss(*args.values(), **kw)


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad(ref_logp=lambda a: a["ref_logp"][:-1]), "ref_logp has"),
        (_bad(attempt=lambda a: a["attempt"].float()), "attempt must be an integer"),
        (_bad(attempt=lambda a: a["attempt"] * 2), "attempt values"),
        (_bad(cu_seqlens=lambda a: a["cu_seqlens"].long()), "cu_seqlens must be int32"),
        (_bad(cu_seqlens=lambda a: a["cu_seqlens"] + 1), "cu_seqlens must start at 0"),
        (_bad(group_ids=lambda a: a["group_ids"].int()), "group_ids must be int64"),
        (_bad(rewards=lambda a: a["rewards"][:3]), "rewards has 3"),
        (_bad(rewards=lambda a: a["rewards"][:, 0]), "rewards must be 2-D"),
        (_bad(progress_bonus=[0.0, float("nan")]), r"progress_bonus\[attempt 2\] must be a finite number"),
        (_bad(progress_bonus=[1.0, 1.0]), r"progress_bonus\[attempt 1\] must be 0"),
        (_bad(reward_weight=[1.0, "1"]), r"reward_weight\[attempt 2\] must be a finite number"),
        (_bad(reward_weight=[1.0]), "reward_weight has 1 entries, rewards has 2 attempts"),
        (_bad(beta=0.1), "beta must hold one number per attempt"),
        (
            _bad(attempt=lambda a: a["attempt"].clamp(max=1) * 3),
            r"attempt values must be 0 \(context\) or an attempt 1..2",
        ),
        (_bad(kl_kind="k5"), "kl_kind"),
        (_bad(kl_placement="both"), "kl_placement"),
        (_bad(normalization="sum"), "normalization"),
        (_bad(beta=[0.1, -0.5]), r"beta\[attempt 2\] must be >= 0"),
        (_bad(loss_denominator=0), "loss_denominator"),
        (_bad(ref_logp=lambda a: a["ref_logp"].clone().requires_grad_()), "ref_logp requires grad"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
