"""Per-token KL estimators between the policy and the frozen reference model.

With d = logp - ref_logp (log-ratio policy/reference at the sampled token):

    k1  = d                                       gradient  1
    k2  = d^2 / 2                                 gradient  d
    k3  = e^(-d') + d' - 1,  d' = clamp(d, ±20)   gradient  1 - e^(-d')  (0 where either clamp binds)
          value clamped to [-10, 10] afterwards (it is never negative, so only +10 can bind)
    k3+ = k3's value with k2's gradient d         (straight-through: the unbiased KL gradient)

k3 and its clamps follow verl's `low_var_kl`; the clamps keep one badly off-policy token from
dominating a batch. All arithmetic is fp32; the output is fp32.

`ref_logp` is a constant (the reference model is frozen); passing one that requires grad is an
error rather than a silently dropped gradient. `kl_value_and_grad` is the Triton building block
that the SCoRe loss kernel reuses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, select
from .dispatch import use_triton

KL_KINDS = ("k1", "k2", "k3", "k3+")
KL_LOG_RATIO_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0
_BLOCK = 1024


@triton.jit
def kl_value_and_grad(logp, ref_logp, KIND: tl.constexpr):
    """(kl, d kl / d logp) for fp32 tensors; KIND indexes KL_KINDS."""
    d = logp - ref_logp
    if KIND == 0:
        value = d
        grad = tl.full(d.shape, 1.0, tl.float32)
    elif KIND == 1:
        value = 0.5 * d * d
        grad = d
    else:
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        ratio = tl.exp(-dc)
        raw = ratio + dc - 1.0
        value = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        if KIND == 2:
            inside = (d >= -20.0) & (d <= 20.0) & (raw <= 10.0) & (raw >= -10.0)
            grad = tl.where(inside, 1.0 - ratio, 0.0)
        else:
            grad = d
    return value, grad


@triton.jit
def _kl_kernel(logp_ptr, ref_ptr, value_ptr, grad_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0)
    value, grad = kl_value_and_grad(logp, ref, KIND)
    tl.store(value_ptr + offs, value, mask=ok)
    tl.store(grad_ptr + offs, grad, mask=ok)


_TABLE = [
    Launch(
        _kl_kernel,
        dict(
            logp_ptr="*fp32",
            ref_ptr="*fp32",
            value_ptr="*fp32",
            grad_ptr="*fp32",
            n="i32",
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
    """Every launch configuration `kl_penalty` can use (see kernels/aot.py)."""
    return list(_TABLE)


def kl_value_and_grad_torch(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str):
    """torch reference of `kl_value_and_grad`: (kl, d kl / d logp), fp32."""
    d = logp.float() - ref_logp.float()
    if kind == "k1":
        return d.clone(), torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, d
    dc = d.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    ratio = torch.exp(-dc)
    raw = ratio + dc - 1.0
    value = raw.clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
    if kind == "k3":
        inside = (d.abs() <= KL_LOG_RATIO_CLAMP) & (raw.abs() <= KL_VALUE_CLAMP)
        return value, torch.where(inside, 1.0 - ratio, 0.0)
    return value, d


def _kl_triton(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str):
    n = logp.numel()
    value = torch.empty(n, dtype=torch.float32, device=logp.device)
    grad = torch.empty_like(value)
    cfg = select(_TABLE, KIND=KL_KINDS.index(kind))
    launch(cfg, (triton.cdiv(n, _BLOCK),), logp, ref_logp, value, grad, n)
    return value, grad


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind, use_triton):
        flat, ref = logp.reshape(-1).float().contiguous(), ref_logp.reshape(-1).float().contiguous()
        if use_triton and flat.numel() > 0:
            value, grad = _kl_triton(flat, ref, kind)
        else:
            value, grad = kl_value_and_grad_torch(flat, ref, kind)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = logp.shape, logp.dtype
        return value.view(logp.shape)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out.reshape(-1).float() * grad).view(ctx.shape).to(ctx.dtype), None, None, None


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", *, impl: str = "auto") -> torch.Tensor:
    """Per-token KL estimate (fp32, same shape as logp); differentiable w.r.t. logp.

    kind: "k1" | "k2" | "k3" | "k3+" (see module docstring). impl: "auto" (Triton for CUDA
    tensors, torch otherwise), "triton", "torch".
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} differs from logp shape {tuple(logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"ref_logp is on {ref_logp.device}, logp on {logp.device}")
    if ref_logp.requires_grad:
        raise ValueError("ref_logp requires grad: the reference model is frozen; pass ref_logp.detach()")
    return _KLPenalty.apply(logp, ref_logp, kind, use_triton(impl, logp, "kl_penalty"))
