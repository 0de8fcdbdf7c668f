"""RMSNorm, optionally fused with the residual add before it, in HF's rounding order.

For rows x [N, D] (any leading shape), weight w [D] and, when given, residual r [N, D]:

    h    = x + r                     (in x's dtype, as `hidden = residual + hidden`; h = x without r)
    rstd = 1 / sqrt(mean(h^2) + eps) (fp32)
    y    = w * to_dtype(h * rstd)    (normalise in fp32, round to x's dtype, then the weight: HF's order)

returns y (dtype of w * x) and, with a residual, h (the next layer's residual stream).

Backward, with xhat = h * rstd and g = dL/dy (the cast to x's dtype passes gradients through, as
autograd's `.to` does):

    dxhat = g w
    dh    = rstd (dxhat - xhat mean(dxhat xhat)) + dL/dh_out      (the last term with a residual)
    dx    = dr = dh,   dw = sum over rows of g to_dtype(xhat)

Triton: the forward is one program per row in two passes over D (sum of squares, then normalise),
saving rstd; the backward runs a fixed grid of programs over rows, each keeping its own row of dw
partial sums, which torch adds up (deterministic, fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

_BLOCK = 1024
_BWD_PROGRAMS = 128
DTYPE_COMBOS = (  # (x dtype, weight dtype): the weight matches x, or stays fp32 (master weights)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
)


@triton.jit
def _rms_norm_fwd(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, D, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < D
        h = tl.load(x_ptr + base + cols, mask=ok, other=0.0)
        if HAS_RES:
            # rounded once to x's dtype, as torch's bf16/fp16 add (fp32 math, one rounding)
            r = tl.load(res_ptr + base + cols, mask=ok, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(h_ptr + base + cols, h, mask=ok)
        hf = h.to(tl.float32)
        total += hf * hf
    rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < D
        if HAS_RES:
            h = tl.load(h_ptr + base + cols, mask=ok, other=0.0)
        else:
            h = tl.load(x_ptr + base + cols, mask=ok, other=0.0)
        xhat = (h.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_bwd(
    h_ptr,
    w_ptr,
    rstd_ptr,
    dy_ptr,
    dh_out_ptr,
    dx_ptr,
    dw_part_ptr,
    N,
    D,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    width = tl.full([], 0, tl.int64) + D  # 64-bit row offsets: N x D may pass 2**31
    for row in range(pid, N, programs):
        base = row * width
        rstd = tl.load(rstd_ptr + row)
        dot = tl.zeros([BLOCK], tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < D
            xhat = tl.load(h_ptr + base + cols, mask=ok, other=0.0).to(tl.float32) * rstd
            g = tl.load(dy_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            dot += g * w * xhat
        mean = tl.sum(dot, axis=0) / D
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < D
            xhat = tl.load(h_ptr + base + cols, mask=ok, other=0.0).to(tl.float32) * rstd
            g = tl.load(dy_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            dh = rstd * (g * w - xhat * mean)
            if HAS_RES:
                dh += tl.load(dh_out_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + cols, dh.to(dx_ptr.dtype.element_ty), mask=ok)
            xc = xhat.to(h_ptr.dtype.element_ty).to(tl.float32)
            part = dw_part_ptr + pid * width + cols
            tl.store(part, tl.load(part, mask=ok, other=0.0) + g * xc, mask=ok)


def _table():
    table = []
    for x_dtype, w_dtype in DTYPE_COMBOS:
        x, w = "*" + triton_type(x_dtype), "*" + triton_type(w_dtype)
        y = "*" + triton_type(torch.promote_types(x_dtype, w_dtype))
        for has_res in (0, 1):
            table.append(
                Launch(
                    _rms_norm_fwd,
                    dict(
                        x_ptr=x,
                        res_ptr=x,
                        w_ptr=w,
                        y_ptr=y,
                        h_ptr=x,
                        rstd_ptr="*fp32",
                        D="i32",
                        eps="fp32",
                        HAS_RES="constexpr",
                        BLOCK="constexpr",
                    ),
                    dict(HAS_RES=has_res, BLOCK=_BLOCK),
                    num_warps=4,
                    num_stages=1,
                )
            )
            table.append(
                Launch(
                    _rms_norm_bwd,
                    dict(
                        h_ptr=x,
                        w_ptr=w,
                        rstd_ptr="*fp32",
                        dy_ptr=y,
                        dh_out_ptr=x,
                        dx_ptr=x,
                        dw_part_ptr="*fp32",
                        N="i32",
                        D="i32",
                        HAS_RES="constexpr",
                        BLOCK="constexpr",
                    ),
                    dict(HAS_RES=has_res, BLOCK=_BLOCK),
                    num_warps=4,
                    num_stages=1,
                )
            )
    return table


_TABLE = _table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `rms_norm` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _entry(kernel, x_dtype, w_dtype, has_res: bool) -> Launch:
    x, w = "*" + triton_type(x_dtype), "*" + triton_type(w_dtype)
    (cfg,) = [
        c
        for c in _TABLE
        if c.kernel is kernel
        and c.signature["w_ptr"] == w
        and c.signature["h_ptr"] == x
        and c.constexprs["HAS_RES"] == has_res
    ]
    return cfg


def rms_norm_torch(x, weight, eps: float, residual=None):
    """The reference, in the module docstring's order: (y, h) with h = None without a residual."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y, (None if residual is None else h)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        n = x2.shape[0]
        has_res = residual is not None
        r2 = residual.reshape(-1, D).contiguous() if has_res else x2
        w = weight.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        h = torch.empty_like(x2) if has_res else x2
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        if n:
            cfg = _entry(_rms_norm_fwd, x.dtype, weight.dtype, has_res)
            launch(cfg, (n,), x2, r2, w, y, h, rstd, D, float(eps))
        ctx.save_for_backward(h, w, rstd)
        ctx.has_res, ctx.shape = has_res, shape
        return y.view(shape), (h.view(shape) if has_res else None)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, w, rstd = ctx.saved_tensors
        n, D = h.shape
        dy = dy.reshape(n, D).contiguous().to(torch.promote_types(h.dtype, w.dtype))
        has_res = ctx.has_res and dh_out is not None
        dh_out = dh_out.reshape(n, D).contiguous().to(h.dtype) if has_res else h
        dx = torch.empty_like(h)
        programs = max(1, min(n, _BWD_PROGRAMS))
        parts = torch.zeros(programs, D, dtype=torch.float32, device=h.device)
        if n:
            cfg = _entry(_rms_norm_bwd, h.dtype, w.dtype, has_res)
            launch(cfg, (programs,), h, w, rstd, dy, dh_out, dx, parts, n, D)
        dw = parts.sum(0).to(w.dtype)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_res else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, impl: str = "auto"
):
    """(y, h): RMSNorm of `x` (+ `residual`, when given) over the last dimension; h is the summed
    residual stream (None without a residual). Differentiable in x, weight and residual."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("rms_norm: x and weight must be torch.Tensors")
    if (x.dtype, weight.dtype) not in DTYPE_COMBOS:
        raise ValueError(
            f"rms_norm: (x, weight) dtypes {x.dtype}, {weight.dtype} not supported; supported: the same float "
            "dtype, or a bf16/fp16 x with an fp32 weight"
        )
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, "
            f"{residual.dtype}"
        )
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"rms_norm: {name} is on {t.device}, x on {x.device}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"rms_norm: eps must be > 0, got {eps!r}")
    if not use_triton(impl, x, "rms_norm"):
        return rms_norm_torch(x, weight, eps, residual)
    return _RMSNorm.apply(x, weight, residual, float(eps))
