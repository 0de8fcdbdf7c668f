"""Two-attempt SCoRe returns, leave-one-out advantages and REINFORCE loss over a packed batch.

Inputs. Per token (N): `logp` (policy, requires grad), `ref_logp` (frozen reference),
optional `old_logp` (the policy that sampled the tokens), `attempt` in {0 = context/prompt/
instruction, 1, 2}. Per trajectory (S, packed back to back by `cu_seqlens`): `group_ids`
(trajectories of one prompt share an id; a call holds whole groups), rewards `r1`, `r2`.

The caller chooses the four coefficients of the returns (each training stage of SCoRe is one
choice of them; this op does not know about stages): `r1_weight`, `progress_bonus`,
`beta_attempt1`, `beta_attempt2` (written w1, b, beta_1, beta_2 below).

Formulas (s = trajectory, a = attempt, t = token; KL_t = kl_penalty(logp_t, ref_logp_t, kl_kind)):

    KL[s,a]  = sum_{t in s, attempt_t = a} KL_t                       (sequence KL, detached)
    base[s]  = (w1 r1,  r2 + b (r2 - r1))                             (b: bonus for progress on attempt 2)
    R[s,a]   = base[s,a] - beta_a KL[s,a]     if kl_placement == "kl_in_reward"
               base[s,a]                      if kl_placement == "kl_loss"
    A[s,a]   = R[s,a] - (sum_{s' in g(s)} R[s',a] - R[s,a]) / (k_g - 1)   baseline == "rloo" (k_g >= 2)
               R[s,a]                                                   baseline == "none"
    ratio_t  = exp(logp_t - old_logp_t)       (old_logp defaults to logp.detach(): ratio = 1, on-policy)
    l_t      = -A[s_t, a_t] ratio_t + [kl_loss] beta_{a_t} KL_t        for attempt_t in {1, 2}; 0 otherwise
    loss     = sum_t w_t l_t,   w_t = 1 / D                     normalization == "token_mean"
                                w_t = 1 / (n_s D)               normalization == "sequence_mean"
    D        = loss_denominator, default: active tokens (token_mean) or trajectories (sequence_mean)
               of this call; n_s = active tokens of trajectory s.

    d loss / d logp_t = w_t (-A ratio_t + [kl_loss] beta_{a_t} dKL_t/dlogp_t)

Discount is 0: each attempt's tokens get that attempt's own advantage, so the progress bonus
b (r2 - r1) reaches attempt-2 tokens only. With kl_in_reward the KL inside the returns is
detached (like TRL's RLOO); with kl_loss its gradient flows through the per-token term. The
importance ratio is not clipped (no PPO clip): `old_logp` is for an off-by-a-few-steps policy
(e.g. engine vs trainer numerics), not for many epochs over one batch.

Triton: one program per prompt group makes one pass over the group's trajectories (sequence KL
sums, returns, group sums) and a second that writes returns/advantages/KL, the per-token gradient
and the group's share of the loss; the partial losses are summed in torch (deterministic).
The loss is a scalar, so its gradient w.r.t. logp is computed in forward and scaled in backward.
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


@dataclasses.dataclass
class ScoreLossOutput:
    """`loss` (scalar, differentiable w.r.t. logp); per trajectory [S, 2] (attempt 1, attempt 2):
    `returns`, `advantages`, `kl` (sequence KL sums); `stats`: python floats for logging."""

    loss: torch.Tensor
    returns: torch.Tensor
    advantages: torch.Tensor
    kl: torch.Tensor
    stats: dict


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_kl(logp_ptr, ref_ptr, attempt_ptr, start, end, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """(KL attempt 1, KL attempt 2, tokens attempt 1, tokens attempt 2) of tokens [start, end)."""
    kl1 = tl.zeros([BLOCK], tl.float32)
    kl2 = tl.zeros([BLOCK], tl.float32)
    n1 = tl.zeros([BLOCK], tl.float32)
    n2 = tl.zeros([BLOCK], tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < end
        att = tl.load(attempt_ptr + offs, mask=ok, other=0)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
        rf = tl.load(ref_ptr + offs, mask=ok, other=0.0)
        kl, _ = kl_value_and_grad(lp, rf, KIND)
        kl1 += tl.where(att == 1, kl, 0.0)
        kl2 += tl.where(att == 2, kl, 0.0)
        n1 += (att == 1).to(tl.float32)
        n2 += (att == 2).to(tl.float32)
    return tl.sum(kl1, axis=0), tl.sum(kl2, axis=0), tl.sum(n1, axis=0), tl.sum(n2, axis=0)


@triton.jit
def _score_loss_kernel(
    logp_ptr,
    ref_ptr,
    old_ptr,
    attempt_ptr,
    cu_seqlens_ptr,
    order_ptr,
    group_start_ptr,
    r1_ptr,
    r2_ptr,
    returns_ptr,
    adv_ptr,
    kl_ptr,
    grad_ptr,
    loss_part_ptr,
    r1_weight,
    progress_bonus,
    beta_attempt1,
    beta_attempt2,
    kl_in_reward,
    kl_loss,
    rloo,
    seq_mean,
    inv_denominator,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    g_begin = tl.load(group_start_ptr + g)
    g_end = tl.load(group_start_ptr + g + 1)
    k_minus_1 = tl.maximum(g_end - g_begin - 1, 1).to(tl.float32)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    sum_r1 = zero
    sum_r2 = zero
    # Pass 1: the group's summed returns (the leave-one-out baseline needs them).
    for i in range(g_begin, g_end):
        s = tl.load(order_ptr + i)
        kl1, kl2, n1, n2 = _sequence_kl(
            logp_ptr, ref_ptr, attempt_ptr, tl.load(cu_seqlens_ptr + s), tl.load(cu_seqlens_ptr + s + 1), KIND, BLOCK
        )
        r1 = tl.load(r1_ptr + s)
        r2 = tl.load(r2_ptr + s)
        sum_r1 += r1_weight * r1 - kl_in_reward * beta_attempt1 * kl1
        sum_r2 += r2 + progress_bonus * (r2 - r1) - kl_in_reward * beta_attempt2 * kl2
    pg_total = zero
    kl_total = zero
    # Pass 2: returns, advantages, per-token gradient and loss (sequence sums are recomputed
    # rather than re-read, so no store -> load ordering across threads is needed).
    for i in range(g_begin, g_end):
        s = tl.load(order_ptr + i)
        start = tl.load(cu_seqlens_ptr + s)
        end = tl.load(cu_seqlens_ptr + s + 1)
        kl1, kl2, n1, n2 = _sequence_kl(logp_ptr, ref_ptr, attempt_ptr, start, end, KIND, BLOCK)
        r1 = tl.load(r1_ptr + s)
        r2 = tl.load(r2_ptr + s)
        ret1 = r1_weight * r1 - kl_in_reward * beta_attempt1 * kl1
        ret2 = r2 + progress_bonus * (r2 - r1) - kl_in_reward * beta_attempt2 * kl2
        adv1 = ret1 - rloo * (sum_r1 - ret1) / k_minus_1
        adv2 = ret2 - rloo * (sum_r2 - ret2) / k_minus_1
        tl.store(returns_ptr + 2 * s, ret1)
        tl.store(returns_ptr + 2 * s + 1, ret2)
        tl.store(adv_ptr + 2 * s, adv1)
        tl.store(adv_ptr + 2 * s + 1, adv2)
        tl.store(kl_ptr + 2 * s, kl1)
        tl.store(kl_ptr + 2 * s + 1, kl2)
        weight = inv_denominator
        if seq_mean != 0:
            weight = inv_denominator / tl.maximum(n1 + n2, 1.0)
        pg_acc = tl.zeros([BLOCK], tl.float32)
        kl_acc = tl.zeros([BLOCK], tl.float32)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            att = tl.load(attempt_ptr + offs, mask=ok, other=0)
            lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
            rf = tl.load(ref_ptr + offs, mask=ok, other=0.0)
            old = tl.load(old_ptr + offs, mask=ok, other=0.0)
            kl, dkl = kl_value_and_grad(lp, rf, KIND)
            active = att > 0
            adv = tl.where(att == 1, adv1, adv2)
            beta = tl.where(att == 1, beta_attempt1, beta_attempt2)
            ratio = tl.exp(lp - old)
            grad = weight * (-adv * ratio + kl_loss * beta * dkl)
            tl.store(grad_ptr + offs, tl.where(active, grad, 0.0), mask=ok)
            pg_acc += tl.where(active, -adv * ratio, 0.0)
            kl_acc += tl.where(active, kl_loss * beta * kl, 0.0)
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
            r1_ptr="*fp32",
            r2_ptr="*fp32",
            returns_ptr="*fp32",
            adv_ptr="*fp32",
            kl_ptr="*fp32",
            grad_ptr="*fp32",
            loss_part_ptr="*fp32",
            r1_weight="fp32",
            progress_bonus="fp32",
            beta_attempt1="fp32",
            beta_attempt2="fp32",
            kl_in_reward="fp32",
            kl_loss="fp32",
            rloo="fp32",
            seq_mean="i32",
            inv_denominator="fp32",
            KIND="constexpr",
            BLOCK="constexpr",
        ),
        dict(KIND=kind, BLOCK=_BLOCK),
        num_warps=4,
        num_stages=1,
    )
    for kind in range(len(KL_KINDS))
]


def aot_launches() -> list[Launch]:
    """Every launch configuration `score_loss` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _run_triton(logp, ref, old, attempt, cu_seqlens, group_ids, r1, r2, coef, kind):
    s_count = r1.numel()
    dev = logp.device
    order = torch.argsort(group_ids, stable=True)
    _, counts = torch.unique_consecutive(group_ids[order], return_counts=True)
    group_start = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=dev)
    group_start[1:] = counts.cumsum(0)
    returns = torch.empty(s_count, 2, dtype=torch.float32, device=dev)
    adv, kl = torch.empty_like(returns), torch.empty_like(returns)
    grad = torch.empty_like(logp)
    parts = torch.empty(counts.numel(), 2, dtype=torch.float32, device=dev)
    cfg = select(_TABLE, KIND=KL_KINDS.index(kind))
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
        r1,
        r2,
        returns,
        adv,
        kl,
        grad,
        parts,
        coef["r1_weight"],
        coef["progress_bonus"],
        coef["beta_attempt1"],
        coef["beta_attempt2"],
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
def _run_torch(logp, ref, old, attempt, cu_seqlens, group_ids, r1, r2, coef, kind):
    s_count = r1.numel()
    dev = logp.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(s_count, device=dev), lengths)
    att = attempt.long()
    active = att > 0
    slot = (att - 1).clamp(min=0)
    kl_tok, dkl_tok = kl_value_and_grad_torch(logp, ref, kind)
    zeros = torch.zeros(s_count, 2, dtype=torch.float32, device=dev)
    kl = zeros.clone().index_put_((seq[active], slot[active]), kl_tok[active], accumulate=True)
    n_tok = zeros.clone().index_put_((seq[active], slot[active]), torch.ones_like(kl_tok[active]), accumulate=True)
    base = torch.stack([coef["r1_weight"] * r1, r2 + coef["progress_bonus"] * (r2 - r1)], dim=1)
    betas = torch.tensor([coef["beta_attempt1"], coef["beta_attempt2"]], dtype=torch.float32, device=dev)
    returns = base - coef["kl_in_reward"] * betas * kl
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    group_sum = torch.zeros(counts.numel(), 2, dtype=torch.float32, device=dev).index_add_(0, inverse, returns)
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
    def forward(ctx, logp, ref, old, attempt, cu_seqlens, group_ids, r1, r2, coef, kind, use_triton):
        run = _run_triton if use_triton else _run_torch
        returns, adv, kl, grad, pg, kl_term = run(
            logp.detach(), ref, old, attempt, cu_seqlens, group_ids, r1, r2, coef, kind
        )
        ctx.save_for_backward(grad)
        loss = pg + kl_term
        ctx.mark_non_differentiable(returns, adv, kl, pg, kl_term)
        return loss, returns, adv, kl, pg, kl_term

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 11
        return (grad * grad_loss,) + (None,) * 10


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


def score_loss(
    logp,
    ref_logp,
    attempt,
    cu_seqlens,
    group_ids,
    r1,
    r2,
    *,
    r1_weight,
    progress_bonus,
    beta_attempt1,
    beta_attempt2,
    kl_kind="k1",
    kl_placement="kl_in_reward",
    baseline="rloo",
    normalization="token_mean",
    loss_denominator=None,
    old_logp=None,
    impl="auto",
) -> ScoreLossOutput:
    """Two-attempt SCoRe loss over a packed batch; formulas in the module docstring.

    Returns before the KL: attempt 1 `r1_weight * r1`, attempt 2 `r2 + progress_bonus * (r2 - r1)`;
    `beta_attempt1` / `beta_attempt2` weigh each attempt's KL (in the return or in the loss).
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
    _check_number("r1_weight", r1_weight)
    _check_number("progress_bonus", progress_bonus)
    _check_number("beta_attempt1", beta_attempt1, 0.0)
    _check_number("beta_attempt2", beta_attempt2, 0.0)
    for name, t in (
        ("logp", logp),
        ("ref_logp", ref_logp),
        ("attempt", attempt),
        ("cu_seqlens", cu_seqlens),
        ("group_ids", group_ids),
        ("r1", r1),
        ("r2", r2),
    ):
        _check_tensor(name, t)
    if old_logp is not None:
        _check_tensor("old_logp", old_logp)
    n = logp.shape[0]
    s_count = cu_seqlens.shape[0] - 1
    for name, t in (("logp", logp), ("ref_logp", ref_logp), ("old_logp", old_logp), ("r1", r1), ("r2", r2)):
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
    for name, t in (("group_ids", group_ids), ("r1", r1), ("r2", r2)):
        if t.shape[0] != s_count:
            raise ValueError(f"{name} has {t.shape[0]} entries, cu_seqlens describes {s_count} trajectories")
    tensors = {
        "logp": logp,
        "ref_logp": ref_logp,
        "attempt": attempt,
        "cu_seqlens": cu_seqlens,
        "group_ids": group_ids,
        "r1": r1,
        "r2": r2,
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
    if n and bool(((attempt < 0) | (attempt > 2)).any()):
        raise ValueError("attempt values must be 0 (context), 1 or 2")
    if baseline == "rloo":
        uniq, counts = torch.unique(group_ids, return_counts=True)
        if bool((counts < 2).any()):
            lone = int(uniq[counts < 2][0])
            raise ValueError(
                f"group_ids: group {lone} has a single trajectory; the leave-one-out baseline "
                "needs k >= 2 per group (or pass baseline='none')"
            )
    active_tokens = int((attempt > 0).sum())
    if loss_denominator is None:
        denominator = active_tokens if normalization == "token_mean" else s_count
    else:
        _check_number("loss_denominator", loss_denominator)
        if loss_denominator <= 0:
            raise ValueError(f"loss_denominator must be > 0, got {loss_denominator}")
        denominator = loss_denominator
    with_triton = use_triton(impl, logp, "score_loss")

    # --- compute --------------------------------------------------------------------------
    coef = dict(
        r1_weight=float(r1_weight),
        progress_bonus=float(progress_bonus),
        beta_attempt1=float(beta_attempt1),
        beta_attempt2=float(beta_attempt2),
        kl_in_reward=1.0 if kl_placement == "kl_in_reward" else 0.0,
        kl_loss=1.0 if kl_placement == "kl_loss" else 0.0,
        rloo=1.0 if baseline == "rloo" else 0.0,
        seq_mean=1 if normalization == "sequence_mean" else 0,
        inv_denominator=1.0 / max(denominator, 1),
    )
    logp32 = logp.float()
    ref32 = ref_logp.detach().float().contiguous()
    old32 = (logp32.detach() if old_logp is None else old_logp.float()).contiguous()
    loss, returns, adv, kl, pg, kl_term = _ScoreLoss.apply(
        logp32.contiguous(),
        ref32,
        old32,
        attempt.to(torch.int32).contiguous(),
        cu_seqlens.contiguous(),
        group_ids.contiguous(),
        r1.float().contiguous(),
        r2.float().contiguous(),
        coef,
        kl_kind,
        with_triton,
    )
    stats = {
        "loss": float(loss.detach()),
        "pg_loss": float(pg),
        "kl_term": float(kl_term),
        "return_1": float(returns[:, 0].mean()),
        "return_2": float(returns[:, 1].mean()),
        "reward_1": float(r1.float().mean()),
        "reward_2": float(r2.float().mean()),
        "kl_1": float(kl[:, 0].mean()),
        "kl_2": float(kl[:, 1].mean()),
        "adv_mean": float(adv.mean()),
        "adv_std": float(adv.std(unbiased=False)),
        "tokens_1": float((attempt == 1).sum()),
        "tokens_2": float((attempt == 2).sum()),
        "loss_denominator": float(denominator),
    }
    return ScoreLossOutput(loss=loss, returns=returns, advantages=adv, kl=kl, stats=stats)
