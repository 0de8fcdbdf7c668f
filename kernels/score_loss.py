"""SCoRe returns over any number of attempts, leave-one-out advantages and REINFORCE loss over a
packed batch.

Inputs. Per token (N): `logp` (policy, requires grad), `ref_logp` (the KL reference of each token,
chosen by the caller: the frozen base model, or an anchor model for the attempts it holds),
optional `old_logp` (the policy that sampled the tokens), `attempt` in {0 = context/prompt/
instruction, 1, ..., A}. Per trajectory (S, packed back to back by `cu_seqlens`): `group_ids`
(trajectories of one prompt share an id; a call holds whole groups), `rewards` [S, A].

The caller chooses three coefficients per attempt (each training stage of SCoRe is one choice of
them; this op does not know about stages): `reward_weight` w_a, `progress_bonus` b_a (b_1 = 0:
attempt 1 has no attempt before it) and `beta` beta_a.

Formulas (s = trajectory, a = attempt, t = token; KL_t = kl_penalty(logp_t, ref_logp_t, kl_kind)):

    KL[s,a]  = sum_{t in s, attempt_t = a} KL_t                       (sequence KL, detached)
    base[s,a] = w_a r[s,a] + b_a (r[s,a] - r[s,a-1])                  (b_a: bonus for progress on attempt a)
    R[s,a]   = base[s,a] - beta_a KL[s,a]     if kl_placement == "kl_in_reward"
               base[s,a]                      if kl_placement == "kl_loss"
    A[s,a]   = R[s,a] - (sum_{s' in g(s)} R[s',a] - R[s,a]) / (k_g - 1)   baseline == "rloo" (k_g >= 2)
               R[s,a]                                                   baseline == "none"
    ratio_t  = exp(logp_t - old_logp_t)       (old_logp defaults to logp.detach(): ratio = 1, on-policy)
    l_t      = -A[s_t, a_t] ratio_t + [kl_loss] beta_{a_t} KL_t        for attempt_t >= 1; 0 otherwise
    loss     = sum_t w_t l_t,   w_t = 1 / D                     normalization == "token_mean"
                                w_t = 1 / (n_s D)               normalization == "sequence_mean"
    D        = loss_denominator, default: active tokens (token_mean) or trajectories (sequence_mean)
               of this call; n_s = active tokens of trajectory s.

    d loss / d logp_t = w_t (-A ratio_t + [kl_loss] beta_{a_t} dKL_t/dlogp_t)

Discount is 0: each attempt's tokens get that attempt's own advantage, so the progress bonus
b_a (r_a - r_{a-1}) reaches attempt-a tokens only. With kl_in_reward the KL inside the returns is
detached (like TRL's RLOO); with kl_loss its gradient flows through the per-token term. The
importance ratio is not clipped (no PPO clip): `old_logp` is for an off-by-a-few-steps policy
(e.g. engine vs trainer numerics), not for many epochs over one batch.

Triton: one program per prompt group makes one pass over the group's trajectories (per-attempt
sequence KL sums, returns, group sums, the attempts a vector of A_BLOCK lanes) and a second that
writes returns/advantages/KL, the per-token gradient and the group's share of the loss; the
partial losses are summed in torch (deterministic). The loss is a scalar, so its gradient w.r.t.
logp is computed in forward and scaled in backward.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, select
from .dispatch import use_triton
from .kl_penalty import KL_KINDS, kl_value_and_grad, kl_value_and_grad_torch

KL_PLACEMENTS = ("kl_in_reward", "kl_loss")
BASELINES = ("rloo", "none")
NORMALIZATIONS = ("token_mean", "sequence_mean")
_BLOCK = 256
_ATTEMPT_BLOCKS = (2, 4, 8)  # the Triton kernel's attempt lanes: up to 8 attempts per trajectory


@dataclasses.dataclass
class ScoreLossOutput:
    """`loss` (scalar, differentiable w.r.t. logp); per trajectory and attempt [S, A]: `returns`,
    `advantages`, `kl` (sequence KL sums)."""

    loss: torch.Tensor
    returns: torch.Tensor
    advantages: torch.Tensor
    kl: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_kl(
    logp_ptr, ref_ptr, attempt_ptr, start, end, KIND: tl.constexpr, BLOCK: tl.constexpr, A_BLOCK: tl.constexpr
):
    """Per attempt lane (attempt = lane + 1): the KL sum and the token count of tokens [start, end)."""
    lanes = tl.arange(0, A_BLOCK) + 1
    kl_acc = tl.zeros([BLOCK, A_BLOCK], tl.float32)
    n_acc = tl.zeros([BLOCK, A_BLOCK], tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < end
        att = tl.load(attempt_ptr + offs, mask=ok, other=0)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
        rf = tl.load(ref_ptr + offs, mask=ok, other=0.0)
        kl, _ = kl_value_and_grad(lp, rf, KIND)
        hit = att[:, None] == lanes[None, :]
        kl_acc += tl.where(hit, kl[:, None], 0.0)
        n_acc += hit.to(tl.float32)
    return tl.sum(kl_acc, axis=0), tl.sum(n_acc, axis=0)


@triton.jit
def _returns(rewards_ptr, s, num_attempts, weight, bonus, beta, kl, kl_in_reward, A_BLOCK: tl.constexpr):
    """The returns of trajectory s per attempt lane: w_a r_a + b_a (r_a - r_{a-1}) - [kl_in_reward] beta_a KL_a."""
    lanes = tl.arange(0, A_BLOCK)
    r = tl.load(rewards_ptr + s * num_attempts + lanes, mask=lanes < num_attempts, other=0.0)
    prev = tl.load(rewards_ptr + s * num_attempts + lanes - 1, mask=(lanes >= 1) & (lanes < num_attempts), other=0.0)
    return weight * r + bonus * (r - prev) - kl_in_reward * beta * kl


@triton.jit
def _score_loss_kernel(
    logp_ptr,
    ref_ptr,
    old_ptr,
    attempt_ptr,
    cu_seqlens_ptr,
    order_ptr,
    group_start_ptr,
    rewards_ptr,
    weight_ptr,
    bonus_ptr,
    beta_ptr,
    returns_ptr,
    adv_ptr,
    kl_ptr,
    grad_ptr,
    loss_part_ptr,
    num_attempts,
    kl_in_reward,
    kl_loss,
    rloo,
    seq_mean,
    inv_denominator,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    A_BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    g_begin = tl.load(group_start_ptr + g)
    g_end = tl.load(group_start_ptr + g + 1)
    k_minus_1 = tl.maximum(g_end - g_begin - 1, 1).to(tl.float32)
    lanes = tl.arange(0, A_BLOCK)
    in_range = lanes < num_attempts
    weight_a = tl.load(weight_ptr + lanes, mask=in_range, other=0.0)
    bonus_a = tl.load(bonus_ptr + lanes, mask=in_range, other=0.0)
    beta_a = tl.load(beta_ptr + lanes, mask=in_range, other=0.0)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    group_sum = tl.zeros([A_BLOCK], tl.float32)
    # Pass 1: the group's summed returns (the leave-one-out baseline needs them).
    for i in range(g_begin, g_end):
        s = tl.load(order_ptr + i)
        kl, _ = _sequence_kl(
            logp_ptr,
            ref_ptr,
            attempt_ptr,
            tl.load(cu_seqlens_ptr + s),
            tl.load(cu_seqlens_ptr + s + 1),
            KIND,
            BLOCK,
            A_BLOCK,
        )
        group_sum += _returns(rewards_ptr, s, num_attempts, weight_a, bonus_a, beta_a, kl, kl_in_reward, A_BLOCK)
    pg_total = zero
    kl_total = zero
    # Pass 2: returns, advantages, per-token gradient and loss (sequence sums are recomputed
    # rather than re-read, so no store -> load ordering across threads is needed).
    for i in range(g_begin, g_end):
        s = tl.load(order_ptr + i)
        start = tl.load(cu_seqlens_ptr + s)
        end = tl.load(cu_seqlens_ptr + s + 1)
        kl, n = _sequence_kl(logp_ptr, ref_ptr, attempt_ptr, start, end, KIND, BLOCK, A_BLOCK)
        ret = _returns(rewards_ptr, s, num_attempts, weight_a, bonus_a, beta_a, kl, kl_in_reward, A_BLOCK)
        adv = ret - rloo * (group_sum - ret) / k_minus_1
        out = s * num_attempts + lanes
        tl.store(returns_ptr + out, ret, mask=in_range)
        tl.store(adv_ptr + out, adv, mask=in_range)
        tl.store(kl_ptr + out, kl, mask=in_range)
        weight = inv_denominator
        if seq_mean != 0:
            weight = inv_denominator / tl.maximum(tl.sum(n, axis=0), 1.0)
        pg_acc = tl.zeros([BLOCK], tl.float32)
        kl_acc = tl.zeros([BLOCK], tl.float32)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            att = tl.load(attempt_ptr + offs, mask=ok, other=0)
            lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
            rf = tl.load(ref_ptr + offs, mask=ok, other=0.0)
            old = tl.load(old_ptr + offs, mask=ok, other=0.0)
            kl_tok, dkl = kl_value_and_grad(lp, rf, KIND)
            active = att > 0
            hit = att[:, None] == (lanes + 1)[None, :]
            adv_tok = tl.sum(tl.where(hit, adv[None, :], 0.0), axis=1)
            beta_tok = tl.sum(tl.where(hit, beta_a[None, :], 0.0), axis=1)
            ratio = tl.exp(lp - old)
            grad = weight * (-adv_tok * ratio + kl_loss * beta_tok * dkl)
            tl.store(grad_ptr + offs, tl.where(active, grad, 0.0), mask=ok)
            pg_acc += tl.where(active, -adv_tok * ratio, 0.0)
            kl_acc += tl.where(active, kl_loss * beta_tok * kl_tok, 0.0)
        pg_total += weight * tl.sum(pg_acc, axis=0)
        kl_total += weight * tl.sum(kl_acc, axis=0)
    tl.store(loss_part_ptr + 2 * g, pg_total)
    tl.store(loss_part_ptr + 2 * g + 1, kl_total)


_TABLE = [
    Launch(
        _score_loss_kernel,
        dict(
            logp_ptr="*fp32",
            ref_ptr="*fp32",
            old_ptr="*fp32",
            attempt_ptr="*i32",
            cu_seqlens_ptr="*i32",
            order_ptr="*i32",
            group_start_ptr="*i32",
            rewards_ptr="*fp32",
            weight_ptr="*fp32",
            bonus_ptr="*fp32",
            beta_ptr="*fp32",
            returns_ptr="*fp32",
            adv_ptr="*fp32",
            kl_ptr="*fp32",
            grad_ptr="*fp32",
            loss_part_ptr="*fp32",
            num_attempts="i32",
            kl_in_reward="fp32",
            kl_loss="fp32",
            rloo="fp32",
            seq_mean="i32",
            inv_denominator="fp32",
            KIND="constexpr",
            BLOCK="constexpr",
            A_BLOCK="constexpr",
        ),
        dict(KIND=kind, BLOCK=_BLOCK, A_BLOCK=lanes),
        num_warps=4,
        num_stages=1,
    )
    for kind in range(len(KL_KINDS))
    for lanes in _ATTEMPT_BLOCKS
]


def aot_launches() -> list[Launch]:
    """Every launch configuration `score_loss` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _run_triton(logp, ref, old, attempt, cu_seqlens, group_ids, rewards, coef, kind):
    s_count, attempts = rewards.shape
    lanes = next((b for b in _ATTEMPT_BLOCKS if b >= attempts), None)
    if lanes is None:
        raise NotImplementedError(
            f"score_loss's Triton kernel covers up to {_ATTEMPT_BLOCKS[-1]} attempts, got {attempts} (use impl='torch')"
        )
    dev = logp.device
    order = torch.argsort(group_ids, stable=True)
    _, counts = torch.unique_consecutive(group_ids[order], return_counts=True)
    group_start = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=dev)
    group_start[1:] = counts.cumsum(0)
    returns = torch.empty(s_count, attempts, dtype=torch.float32, device=dev)
    adv, kl = torch.empty_like(returns), torch.empty_like(returns)
    grad = torch.empty_like(logp)
    parts = torch.empty(counts.numel(), 2, dtype=torch.float32, device=dev)
    cfg = select(_TABLE, KIND=KL_KINDS.index(kind), A_BLOCK=lanes)
    launch(
        cfg,
        (counts.numel(),),
        logp,
        ref,
        old,
        attempt,
        cu_seqlens,
        order.to(torch.int32),
        group_start,
        rewards,
        coef["reward_weight"],
        coef["progress_bonus"],
        coef["beta"],
        returns,
        adv,
        kl,
        grad,
        parts,
        attempts,
        coef["kl_in_reward"],
        coef["kl_loss"],
        coef["rloo"],
        coef["seq_mean"],
        coef["inv_denominator"],
    )
    pg, kl_term = parts.sum(0)
    return returns, adv, kl, grad, pg, kl_term


# ----------------------------------------------------------------------------------------------
# torch reference (same formulas, vectorised over tokens and trajectories)
# ----------------------------------------------------------------------------------------------
def _run_torch(logp, ref, old, attempt, cu_seqlens, group_ids, rewards, coef, kind):
    s_count, attempts = rewards.shape
    dev = logp.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(s_count, device=dev), lengths)
    att = attempt.long()
    active = att > 0
    slot = (att - 1).clamp(min=0)
    kl_tok, dkl_tok = kl_value_and_grad_torch(logp, ref, kind)
    zeros = torch.zeros(s_count, attempts, dtype=torch.float32, device=dev)
    kl = zeros.clone().index_put_((seq[active], slot[active]), kl_tok[active], accumulate=True)
    n_tok = zeros.clone().index_put_((seq[active], slot[active]), torch.ones_like(kl_tok[active]), accumulate=True)
    previous = torch.cat([zeros[:, :1], rewards[:, :-1]], dim=1)
    base = coef["reward_weight"] * rewards + coef["progress_bonus"] * (rewards - previous)
    betas = coef["beta"]
    returns = base - coef["kl_in_reward"] * betas * kl
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    group_sum = torch.zeros(counts.numel(), attempts, dtype=torch.float32, device=dev).index_add_(0, inverse, returns)
    k_minus_1 = (counts[inverse] - 1).clamp(min=1).float()[:, None]
    adv = returns - coef["rloo"] * (group_sum[inverse] - returns) / k_minus_1
    if coef["seq_mean"]:
        weight_seq = coef["inv_denominator"] / n_tok.sum(1).clamp(min=1.0)
        weight = weight_seq[seq]
    else:
        weight = torch.full_like(logp, coef["inv_denominator"])
    adv_tok = torch.where(active, adv[seq, slot], 0.0)
    beta_tok = torch.where(active, betas[slot], 0.0)
    ratio = torch.exp(logp - old)
    pg_tok = torch.where(active, -adv_tok * ratio, 0.0)
    kl_term_tok = torch.where(active, coef["kl_loss"] * beta_tok * kl_tok, 0.0)
    grad = torch.where(active, weight * (-adv_tok * ratio + coef["kl_loss"] * beta_tok * dkl_tok), 0.0)
    return returns, adv, kl, grad, (weight * pg_tok).sum(), (weight * kl_term_tok).sum()


class _ScoreLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref, old, attempt, cu_seqlens, group_ids, rewards, coef, kind, use_triton):
        run = _run_triton if use_triton else _run_torch
        returns, adv, kl, grad, pg, kl_term = run(
            logp.detach(), ref, old, attempt, cu_seqlens, group_ids, rewards, coef, kind
        )
        ctx.save_for_backward(grad)
        loss = pg + kl_term
        ctx.mark_non_differentiable(returns, adv, kl)
        return loss, returns, adv, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        return (grad * grad_loss,) + (None,) * 9


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------
def _check_tensor(name, t, ndim=1):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_number(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_per_attempt(name, values, attempts: int, minimum=None) -> list[float]:
    """`values` as a list of one finite number per attempt."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name} must hold one number per attempt, got {values!r}")
    if len(values) != attempts:
        raise ValueError(f"{name} has {len(values)} entries, rewards has {attempts} attempts")
    for a, value in enumerate(values, start=1):
        _check_number(f"{name}[attempt {a}]", value, minimum)
    return [float(v) for v in values]


def score_loss(
    logp,
    ref_logp,
    attempt,
    cu_seqlens,
    group_ids,
    rewards,
    *,
    reward_weight,
    progress_bonus,
    beta,
    kl_kind="k1",
    kl_placement="kl_in_reward",
    baseline="rloo",
    normalization="token_mean",
    loss_denominator=None,
    old_logp=None,
    impl="auto",
) -> ScoreLossOutput:
    """SCoRe loss over a packed batch of A-attempt trajectories; formulas in the module docstring.

    `rewards` [S, A]; per attempt a: return before the KL `reward_weight[a] * r_a +
    progress_bonus[a] * (r_a - r_{a-1})` (progress_bonus[0] must be 0), and `beta[a]` weighs its KL
    (in the return or in the loss) against `ref_logp`.
    """
    # --- validate -------------------------------------------------------------------------
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}")
    if kl_placement not in KL_PLACEMENTS:
        raise ValueError(f"kl_placement must be one of {KL_PLACEMENTS}, got {kl_placement!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    for name, t in (
        ("logp", logp),
        ("ref_logp", ref_logp),
        ("attempt", attempt),
        ("cu_seqlens", cu_seqlens),
        ("group_ids", group_ids),
    ):
        _check_tensor(name, t)
    _check_tensor("rewards", rewards, ndim=2)
    if old_logp is not None:
        _check_tensor("old_logp", old_logp)
    n = logp.shape[0]
    s_count = cu_seqlens.shape[0] - 1
    attempts = rewards.shape[1]
    if attempts < 1:
        raise ValueError("rewards must have at least one attempt column")
    weights = _check_per_attempt("reward_weight", reward_weight, attempts)
    bonuses = _check_per_attempt("progress_bonus", progress_bonus, attempts)
    betas = _check_per_attempt("beta", beta, attempts, 0.0)
    if bonuses[0] != 0.0:
        raise ValueError(f"progress_bonus[attempt 1] must be 0 (no attempt before it), got {bonuses[0]}")
    for name, t in (("logp", logp), ("ref_logp", ref_logp), ("old_logp", old_logp), ("rewards", rewards)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    for name, t in (("ref_logp", ref_logp), ("attempt", attempt), ("old_logp", old_logp)):
        if t is not None and t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries, logp has {n}")
    if attempt.is_floating_point() or attempt.dtype == torch.bool:
        raise ValueError(f"attempt must be an integer tensor, got {attempt.dtype}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if s_count < 1:
        raise ValueError("cu_seqlens must hold at least two offsets (one trajectory)")
    if group_ids.dtype != torch.int64:
        raise ValueError(f"group_ids must be int64, got {group_ids.dtype}")
    for name, t in (("group_ids", group_ids), ("rewards", rewards)):
        if t.shape[0] != s_count:
            raise ValueError(f"{name} has {t.shape[0]} entries, cu_seqlens describes {s_count} trajectories")
    tensors = {
        "logp": logp,
        "ref_logp": ref_logp,
        "attempt": attempt,
        "cu_seqlens": cu_seqlens,
        "group_ids": group_ids,
        "rewards": rewards,
        "old_logp": old_logp,
    }
    for name, t in tensors.items():
        if t is not None and t.device != logp.device:
            raise ValueError(f"{name} is on {t.device}, logp on {logp.device}")
    for name in ("ref_logp", "old_logp"):
        if tensors[name] is not None and tensors[name].requires_grad:
            raise ValueError(f"{name} requires grad; it must be a constant (pass .detach())")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at len(logp)={n}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if n and bool(((attempt < 0) | (attempt > attempts)).any()):
        raise ValueError(f"attempt values must be 0 (context) or an attempt 1..{attempts} (rewards' columns)")
    if baseline == "rloo":
        uniq, counts = torch.unique(group_ids, return_counts=True)
        if bool((counts < 2).any()):
            lone = int(uniq[counts < 2][0])
            raise ValueError(
                f"group_ids: group {lone} has a single trajectory; the leave-one-out baseline "
                "needs k >= 2 per group (or pass baseline='none')"
            )
    if loss_denominator is None:
        denominator = int((attempt > 0).sum()) if normalization == "token_mean" else s_count
    else:
        _check_number("loss_denominator", loss_denominator)
        if loss_denominator <= 0:
            raise ValueError(f"loss_denominator must be > 0, got {loss_denominator}")
        denominator = loss_denominator
    # "auto" takes the torch path for more attempts than the kernel has lanes; "triton" says so
    with_triton = use_triton(impl, logp, "score_loss") and (impl == "triton" or attempts <= _ATTEMPT_BLOCKS[-1])

    # --- compute --------------------------------------------------------------------------
    def per_attempt(values):
        return torch.tensor(values, dtype=torch.float32, device=logp.device)

    coef = dict(
        reward_weight=per_attempt(weights),
        progress_bonus=per_attempt(bonuses),
        beta=per_attempt(betas),
        kl_in_reward=1.0 if kl_placement == "kl_in_reward" else 0.0,
        kl_loss=1.0 if kl_placement == "kl_loss" else 0.0,
        rloo=1.0 if baseline == "rloo" else 0.0,
        seq_mean=1 if normalization == "sequence_mean" else 0,
        inv_denominator=1.0 / max(denominator, 1),
    )
    logp32 = logp.float()
    loss, returns, adv, kl = _ScoreLoss.apply(
        logp32.contiguous(),
        ref_logp.detach().float().contiguous(),
        (logp32.detach() if old_logp is None else old_logp.float()).contiguous(),
        attempt.to(torch.int32).contiguous(),
        cu_seqlens.contiguous(),
        group_ids.contiguous(),
        rewards.float().contiguous(),
        coef,
        kl_kind,
        with_triton,
    )
    return ScoreLossOutput(loss=loss, returns=returns, advantages=adv, kl=kl)
