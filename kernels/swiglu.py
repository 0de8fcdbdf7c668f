"""SwiGLU's elementwise part, `silu(gate) * up`, fused: one read of each input, one write.

Forward and backward are one pass each in fp32 registers, whatever the storage dtype:

    s = sigmoid(g),  y = g s u
    dL/du = dy * g s
    dL/dg = dy * u * s (1 + g (1 - s))

Backward recomputes s from the saved inputs instead of storing it. The torch reference runs the same
formulas (fp32, then the storage dtype), so both paths round once per output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

_BLOCK = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(out_ptr + offs, (g * s * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(gate_ptr, up_ptr, dout_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(dup_ptr + offs, (dy * g * s).to(dup_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=ok)


def _table():
    table = []
    for dtype in _DTYPES:
        t = "*" + triton_type(dtype)
        table.append(
            Launch(
                _swiglu_fwd,
                dict(gate_ptr=t, up_ptr=t, out_ptr=t, n="i64", BLOCK="constexpr"),
                dict(BLOCK=_BLOCK),
                num_warps=4,
                num_stages=1,
            )
        )
        table.append(
            Launch(
                _swiglu_bwd,
                dict(gate_ptr=t, up_ptr=t, dout_ptr=t, dgate_ptr=t, dup_ptr=t, n="i64", BLOCK="constexpr"),
                dict(BLOCK=_BLOCK),
                num_warps=4,
                num_stages=1,
            )
        )
    return table


_TABLE = _table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `swiglu` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _entry(kernel, dtype: torch.dtype) -> Launch:
    want = "*" + triton_type(dtype)
    (cfg,) = [c for c in _TABLE if c.kernel is kernel and c.signature["gate_ptr"] == want]
    return cfg


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference: fp32 arithmetic, one rounding to the inputs' dtype."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_grads_torch(gate, up, dout):
    """(d gate, d up) by the module docstring's formulas, fp32, rounded to the inputs' dtype."""
    g, u, dy = gate.float(), up.float(), dout.float()
    s = torch.sigmoid(g)
    return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, use_triton):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.use_triton = use_triton
        if not use_triton or gate.numel() == 0:
            return swiglu_torch(gate, up)
        out = torch.empty_like(gate)
        n = gate.numel()
        launch(_entry(_swiglu_fwd, gate.dtype), (triton.cdiv(n, _BLOCK),), gate, up, out, n)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous().to(gate.dtype)
        if not ctx.use_triton or gate.numel() == 0:
            dgate, dup = swiglu_grads_torch(gate, up, dout)
            return dgate, dup, None
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        launch(_entry(_swiglu_bwd, gate.dtype), (triton.cdiv(n, _BLOCK),), gate, up, dout, dgate, dup, n)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """`silu(gate) * up` (any shape, gate and up alike), differentiable in both; fp32 inside."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"swiglu: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"swiglu: gate and up must match in shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}"
        )
    return _SwiGLU.apply(gate, up, use_triton(impl, gate, "swiglu"))
