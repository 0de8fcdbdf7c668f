"""Rotary position embedding (HF's rotate-half form) of q and k together, in one launch each way.

For one token, a head x [D] = (x1, x2) split in halves, and that token's cos, sin [D] in HF's
layout (`cat(freqs, freqs)`, so the halves are equal, but they are read separately):

    rotate_half(x) = (-x2, x1)
    y = x cos + rotate_half(x) sin:   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2

q [N, Hq, D] and k [N, Hkv, D] share cos and sin [N, D] over their heads. The map is a rotation
by each frequency's angle, linear in x, so the backward is the transpose, a rotation by the
opposite angle:

    dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1

cos and sin are functions of the positions, not parameters: they take no gradient (None).

Rounding: the torch reference computes in the storage dtype, op by op, exactly as the decoder's
`model.apply_rope` does (so the two agree bit for bit); the Triton kernel computes in fp32 and
rounds once to the storage dtype.

Triton: one kernel serves both directions (a BACKWARD constexpr swaps the signs). Its grid is
(N, q head blocks + k head blocks): a program takes one token and BLOCK_H heads of q or of k,
loads that token's cos/sin once per chunk of BLOCK_D frequencies and rotates the [BLOCK_H, BLOCK_D]
tiles of both halves. BLOCK_D is the half-dim rounded up to a power of two, 8 to 128; larger head
dims loop over chunks of 128. Inputs may be strided (a slice of a fused qkv projection); outputs
are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_DS = (8, 16, 32, 64, 128)  # half-dim blocks; D = 256 is one chunk of 128
_TILE = 1024  # elements per half-tile (BLOCK_H x BLOCK_D) for the larger head dims
_MAX_BLOCK_H = 16  # small head dims: no more heads per program than models have


def _block_h(block_d: int) -> int:
    return min(_MAX_BLOCK_H, _TILE // block_d)


def _num_warps(block_d: int) -> int:
    # about 128 elements per warp and half-tile; 4 warps from BLOCK_D = 32 up
    return max(1, min(4, _block_h(block_d) * block_d // 128))


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    token,
    head0,
    H,
    HALF,
    stride_n,
    stride_h,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    # token is int64: N x H x D may pass 2**31 even though one token's heads never do.
    # out_ptr is the token's contiguous [H, D] output row (a row of q_out, or a KV cache slot)
    x_row = x_ptr + token * stride_n + heads[:, None] * stride_h
    out_row = out_ptr + heads[:, None] * (2 * HALF)
    cs_row = token * (2 * HALF)
    for d0 in range(0, HALF, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        ok = head_ok[:, None] & d_ok[None, :]
        c1 = tl.load(cos_ptr + cs_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cs_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cs_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cs_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(x_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + d[None, :], mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(out_row + d[None, :], o1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_row + HALF + d[None, :], o2.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    Hq,
    Hkv,
    HALF,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(Hq, BLOCK_H)
    # the first q_blocks programs of a token take q's heads, the rest k's: a block never mixes them
    if block < q_blocks:
        _rotate_heads(
            q_ptr,
            q_out_ptr + token * (Hq * 2 * HALF),
            cos_ptr,
            sin_ptr,
            token,
            block * BLOCK_H,
            Hq,
            HALF,
            stride_qn,
            stride_qh,
            BACKWARD,
            BLOCK_H,
            BLOCK_D,
        )
    else:
        _rotate_heads(
            k_ptr,
            k_out_ptr + token * (Hkv * 2 * HALF),
            cos_ptr,
            sin_ptr,
            token,
            (block - q_blocks) * BLOCK_H,
            Hkv,
            HALF,
            stride_kn,
            stride_kh,
            BACKWARD,
            BLOCK_H,
            BLOCK_D,
        )


def _table():
    table = []
    for dtype in _DTYPES:
        t = "*" + triton_type(dtype)
        for backward in (0, 1):
            for block_d in _BLOCK_DS:
                table.append(
                    Launch(
                        _rope_kernel,
                        dict(
                            q_ptr=t,
                            k_ptr=t,
                            cos_ptr=t,
                            sin_ptr=t,
                            q_out_ptr=t,
                            k_out_ptr=t,
                            Hq="i32",
                            Hkv="i32",
                            HALF="i32",
                            stride_qn="i32",
                            stride_qh="i32",
                            stride_kn="i32",
                            stride_kh="i32",
                            BACKWARD="constexpr",
                            BLOCK_H="constexpr",
                            BLOCK_D="constexpr",
                        ),
                        dict(BACKWARD=backward, BLOCK_H=_block_h(block_d), BLOCK_D=block_d),
                        num_warps=_num_warps(block_d),
                        num_stages=1,
                    )
                )
    return table


_TABLE = _table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `apply_rope` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _block_d(half: int) -> int:
    return min(_BLOCK_DS[-1], max(_BLOCK_DS[0], triton.next_power_of_2(half)))


def _entry(dtype: torch.dtype, backward: bool, half: int) -> Launch:
    want = "*" + triton_type(dtype)
    block_d = _block_d(half)
    (cfg,) = [
        c
        for c in _TABLE
        if c.signature["q_ptr"] == want and c.constexprs["BACKWARD"] == backward and c.constexprs["BLOCK_D"] == block_d
    ]
    return cfg


def _rotate(q, k, cos, sin, backward: bool):
    """(q_out, k_out), contiguous: one launch over both; q and k may be strided, cos/sin contiguous."""
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernel steps the head dim by 1
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n, hq, d = q.shape
    hkv = k.shape[1]
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    cfg = _entry(q.dtype, backward, d // 2)
    block_h = cfg.constexprs["BLOCK_H"]
    grid = (n, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    launch(cfg, grid, q, k, cos, sin, q_out, k_out, hq, hkv, d // 2, q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    return q_out, k_out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_rot.to(cos.dtype), dk_rot.to(cos.dtype), cos, sin, backward=True)
        return dq, dk, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_torch(q, k, cos, sin):
    """The reference: the decoder's formula in the storage dtype, for q and k (cos/sin detached)."""
    cos, sin = cos.detach().unsqueeze(-2), sin.detach().unsqueeze(-2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def check_rope(q, k, cos, sin, op: str = "apply_rope") -> None:
    """The argument checks of `apply_rope` (and of ops that rotate inside, named `op` in the errors)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{op}: q and k must be 3-D [N, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k must have the same N and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    n, _, d = q.shape
    if d % 2:
        raise ValueError(f"{op}: head dim D must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (n, d):
            raise ValueError(f"{op}: {name} must be [N, D] = [{n}, {d}], got {tuple(t.shape)}")
    dtypes = {t.dtype for t in (q, k, cos, sin)}
    if len(dtypes) != 1:
        raise ValueError(
            f"{op}: q, k, cos and sin must share one dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(f"{op}: dtype must be float32, bfloat16 or float16, got {q.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto"):
    """(q_rot, k_rot): rotate-half RoPE of q [N, Hq, D] and k [N, Hkv, D] with per-token cos, sin
    [N, D], all one dtype (fp32, bf16, fp16). Differentiable in q and k; cos and sin take no gradient."""
    check_rope(q, k, cos, sin)
    if not use_triton(impl, q, "apply_rope"):
        return apply_rope_torch(q, k, cos, sin)
    return _RoPE.apply(q, k, cos, sin)
