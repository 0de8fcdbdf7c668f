"""RoPE of q and k and the paged KV store of k and v, in one launch: the engine's per-layer step
between the q/k/v projection and paged attention.

q [N, Hq, D], k and v [N, Hkv, D] are the new tokens' projections (k before RoPE), cos and sin
[N, D] their rotary tables in HF's layout (see kernels/rope.py), and `slot_mapping` int32 [N] each
token's cache row (slot = block * block_size + offset) in k_cache and v_cache [num_blocks,
block_size, Hkv, D], contiguous; a negative slot stores nothing (see kernels/kv_store.py). The op
returns q rotated (contiguous) and writes rotated k and plain v into the caches, so rotated k
never makes a round trip through memory and one launch replaces two.

The result is bit for bit what `apply_rope` followed by `store_kv` gives on either path: the torch
reference is exactly that composition, and the kernel runs `apply_rope`'s rotation (fp32 math,
one rounding) with the cache slot as its output row. Forward only: the engine runs without
autograd.

Triton: grid (N, q head blocks + 2 x KV head blocks) with `apply_rope`'s head blocks and warps.
A program takes one token and BLOCK_H heads of q (rotated into q_out), of k (rotated into its
cache slot) or of v (copied into its slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton
from .kv_store import check_store_kv, store_kv_torch
from .rope import _BLOCK_DS, _DTYPES, _block_d, _block_h, _num_warps, _rotate_heads, apply_rope_torch, check_rope


@triton.jit
def _copy_heads(x_ptr, out_ptr, token, head0, H, D, stride_n, stride_h, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    heads = head0 + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    x_row = x_ptr + token * stride_n + heads[:, None] * stride_h
    out_row = out_ptr + heads[:, None] * D
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        ok = head_ok[:, None] & (d < D)[None, :]
        tl.store(out_row + d[None, :], tl.load(x_row + d[None, :], mask=ok), mask=ok)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    Hq,
    Hkv,
    HALF,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(Hq, BLOCK_H)
    kv_blocks = tl.cdiv(Hkv, BLOCK_H)
    # blocks [0, q_blocks) rotate q's heads, the next kv_blocks k's, the last kv_blocks copy v's
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
            False,
            BLOCK_H,
            BLOCK_D,
        )
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            row = slot * (Hkv * 2 * HALF)
            if block < q_blocks + kv_blocks:
                _rotate_heads(
                    k_ptr,
                    k_cache_ptr + row,
                    cos_ptr,
                    sin_ptr,
                    token,
                    (block - q_blocks) * BLOCK_H,
                    Hkv,
                    HALF,
                    stride_kn,
                    stride_kh,
                    False,
                    BLOCK_H,
                    BLOCK_D,
                )
            else:
                _copy_heads(
                    v_ptr,
                    v_cache_ptr + row,
                    token,
                    (block - q_blocks - kv_blocks) * BLOCK_H,
                    Hkv,
                    2 * HALF,
                    stride_vn,
                    stride_vh,
                    BLOCK_H,
                    2 * BLOCK_D,
                )


def _table() -> list[Launch]:
    table = []
    for dtype in _DTYPES:
        t = "*" + triton_type(dtype)
        signature = dict.fromkeys(
            ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr"), t
        )
        signature["slot_ptr"] = "*i32"
        signature.update(dict.fromkeys(("Hq", "Hkv", "HALF"), "i32"))
        strides = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh")
        signature.update(dict.fromkeys(strides, "i32"))
        signature.update(BLOCK_H="constexpr", BLOCK_D="constexpr")
        for block_d in _BLOCK_DS:
            table.append(
                Launch(
                    _rope_store_kv_kernel,
                    signature,
                    dict(BLOCK_H=_block_h(block_d), BLOCK_D=block_d),
                    num_warps=_num_warps(block_d),
                    num_stages=1,
                )
            )
    return table


_TABLE = _table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `rope_store_kv` can use (see kernels/aot.py)."""
    return list(_TABLE)


def _entry(dtype: torch.dtype, half: int) -> Launch:
    want, block_d = "*" + triton_type(dtype), _block_d(half)
    (cfg,) = [c for c in _TABLE if c.signature["q_ptr"] == want and c.constexprs["BLOCK_D"] == block_d]
    return cfg


def rope_store_kv_torch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    q_rot, k_rot = apply_rope_torch(q, k, cos, sin)
    store_kv_torch(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot


def rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # heads step D by 1
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n, hq, d = q.shape
    hkv = k.shape[1]
    if n == 0:
        return q_out
    cfg = _entry(q.dtype, d // 2)
    block_h = cfg.constexprs["BLOCK_H"]
    grid = (n, triton.cdiv(hq, block_h) + 2 * triton.cdiv(hkv, block_h))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    launch(cfg, grid, q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, hq, hkv, d // 2, *strides)
    return q_out


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """q rotated; k rotated and v stored at cache rows `slot_mapping` (negative = skip), in place.
    Inputs may be strided (slices of a fused qkv projection); no autograd."""
    check_rope(q, k, cos, sin, op="rope_store_kv")
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    if use_triton(impl, q, "rope_store_kv"):
        return rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_store_kv_torch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
