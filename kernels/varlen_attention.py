"""Attention over packed variable-length sequences, without padding (FlashAttention-2 style).

Layout: q [N, Hq, D], k and v [N, Hkv, D]; int32 `cu_seqlens` [S+1] with sequence s on rows
cu[s] .. cu[s+1]-1 (cu[0] = 0, cu[S] = N). Query head h reads KV head h // (Hq // Hkv). Within
sequence s, with row indices i, j local to it and scale c (1/sqrt(D) by default):

    S_ij = c q_i . k_j,   visible when j <= i (causal) or always (causal=False)
    P    = softmax over visible j of S,   O = P V

Attention never crosses a sequence boundary, and no padded row is ever computed.

Backward, with dO the upstream gradient and delta_i = rowsum(dO_i * O_i):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = c dS K,   dK = c dS^T Q

and dK, dV of a KV head sum over the query heads of its group.

Triton (FlashAttention-2): the forward runs one program per (tile of BLOCK_M query rows,
sequence, query head) on a grid sized by `max_seqlen`; a tile past its sequence's end returns at
once. It streams BLOCK_N keys at a time with an online softmax in fp32 in base 2 (log2(e) c is
folded into the scores, so exp2 replaces exp) and stops at the tile's last row when causal. Key
blocks wholly visible to the tile skip the mask; only the diagonal (causal) or the ragged tail
(non-causal) pay for it. It saves the base-2 log-sum-exp `lse` [Hq, N] fp32, lse_i =
log2 sum_j exp2(log2(e) S_ij), so the backward rebuilds P = exp2(log2(e) S - lse) exactly.
The backward is three kernels and no atomics, so it is deterministic:
- delta: rowsum(dO * O) in fp32, [Hq, N];
- dK/dV: one program per (key block, sequence, KV head), looping over the group's query heads and
  over query blocks from the diagonal on (causal) or from the start, accumulating in fp32;
- dQ: one program per (query block, sequence, query head), looping over key blocks up to the
  diagonal.
Dots run in the input dtype with fp32 accumulation; fp32 inputs multiply in full IEEE fp32 (the
default would be TF32). Head dims pad up to a power of two, 32 .. 128, with masks (80 and 96
run as 128); heads larger than 128 are refused by the Triton path (the caller falls back): their
tiles either spill or leave too few rows per program to be worth a kernel.

torch (`varlen_attention_torch`, the CPU path): a loop over sequences, each one
`F.scaled_dot_product_attention` in fp32 (GQA native), no padding either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_DS = (32, 64, 128)
_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b):
    """a @ b in fp32; fp32 operands multiply in IEEE fp32 (the default would be TF32)."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_rows(base_ptr, rows, rows_ok, stride_n, d, d_ok):
    """The [len(rows), BLOCK_D] tile of rows `rows` (local to a sequence) at `base_ptr`, zeros outside."""
    offs = rows.to(tl.int64)[:, None] * stride_n + d[None, :]
    return tl.load(base_ptr + offs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _fwd_key_blocks(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    rows,
    seq_len,
    d,
    d_ok,
    qk_scale,
    lo,
    hi,
    causal,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys lo .. hi-1, in base 2."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < seq_len
        k = _load_rows(k_base, n, n_ok, stride_kn, d, d_ok)
        v = _load_rows(v_base, n, n_ok, stride_vn, d, d_ok)
        s = _dot(q, tl.trans(k)) * qk_scale
        if MASK:
            visible = n_ok[None, :] & ((n[None, :] <= rows[:, None]) | (causal == 0))
            s = tl.where(visible, s, float("-inf"))
        # the first block any row meets holds key 0, visible to every row: m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _varlen_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    total,
    group,
    head_dim,
    causal,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    m0 = tile * BLOCK_M
    if m0 >= seq_len:  # the grid is sized for the longest sequence
        return
    kv_head = head // group
    first = start.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = _load_rows(q_ptr + first * stride_qn + head * stride_qh, rows, rows_ok, stride_qn, d, d_ok)
    k_base = k_ptr + first * stride_kn + kv_head * stride_kh
    v_base = v_ptr + first * stride_vn + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # causal: keys before the tile are visible to all its rows, the diagonal block is masked and
    # keys past it are never read; otherwise whole key blocks, then the ragged tail masked
    full_end = tl.where(causal != 0, m0, seq_len // BLOCK_N * BLOCK_N)
    kv_end = tl.where(causal != 0, tl.minimum(seq_len, m0 + BLOCK_M), seq_len)
    acc, m_i, l_i = _fwd_key_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        rows,
        seq_len,
        d,
        d_ok,
        qk_scale,
        0,
        full_end,
        causal,
        False,
        BLOCK_N,
    )
    acc, m_i, l_i = _fwd_key_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        rows,
        seq_len,
        d,
        d_ok,
        qk_scale,
        full_end,
        kv_end,
        causal,
        True,
        BLOCK_N,
    )

    out = acc / l_i[:, None]
    o_offs = rows.to(tl.int64)[:, None] * stride_on + d[None, :]
    o_base = o_ptr + first * stride_on + head * stride_oh
    tl.store(o_base + o_offs, out.to(o_ptr.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + head.to(tl.int64) * total + first + rows, m_i + tl.math.log2(l_i), mask=rows_ok)


@triton.jit
def _varlen_bwd_delta(
    o_ptr, do_ptr, delta_ptr, stride_on, stride_oh, total, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """delta[h, i] = sum_d dO[i, h, d] O[i, h, d] in fp32 (O and dO share one layout)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    rows_ok = rows < total
    base = rows.to(tl.int64)[:, None] * stride_on + head * stride_oh
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = rows_ok[:, None] & (d < head_dim)[None, :]
        o = tl.load(o_ptr + base + d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + base + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(delta_ptr + head.to(tl.int64) * total + rows, acc, mask=rows_ok)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qn,
    stride_on,
    n,
    seq_len,
    d,
    d_ok,
    qk_scale,
    lo,
    hi,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Add the contributions of query rows lo .. hi-1 (one head) to a key block's (dk, dv), both
    transposed-side: rows of dk/dv are keys. Works on S^T so no tile is transposed twice."""
    for start in range(lo, hi, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        m_ok = m < seq_len
        q = _load_rows(q_base, m, m_ok, stride_qn, d, d_ok)
        do = _load_rows(do_base, m, m_ok, stride_on, d, d_ok)
        # lse = +inf past the sequence makes P^T = 0 there without a mask
        lse = tl.load(lse_base + m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + m, mask=m_ok, other=0.0)
        p_t = tl.math.exp2(_dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASK:  # the diagonal block: key n sees query m only when n <= m
            p_t = tl.where(n[:, None] <= m[None, :], p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do)
        dp_t = _dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _varlen_bwd_dkdv(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_seqlens_ptr,
    scale,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_dkn,
    stride_dkh,
    total,
    group,
    head_dim,
    causal,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block for one KV head (dO, dK and dV are [N, H, D] contiguous)."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    n0 = tile * BLOCK_N
    if n0 >= seq_len:
        return
    first = start.to(tl.int64)
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k = _load_rows(k_ptr + first * stride_kn + kv_head * stride_kh, n, n_ok, stride_kn, d, d_ok)
    v = _load_rows(v_ptr + first * stride_vn + kv_head * stride_vh, n, n_ok, stride_vn, d, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # causal: queries before the block see none of it, those on its diagonal are masked, those
    # past its end see all of it; otherwise every query sees all of it (no diagonal range)
    diag_end = tl.where(causal != 0, tl.minimum(seq_len, n0 + BLOCK_N), n0)
    full_start = tl.where(causal != 0, n0 + BLOCK_N, 0)
    for g in range(0, group):  # the group's query heads in turn: a deterministic sum, no atomics
        head = kv_head * group + g
        q_base = q_ptr + first * stride_qn + head * stride_qh
        do_base = do_ptr + first * stride_on + head * stride_oh
        lse_base = lse_ptr + head.to(tl.int64) * total + first
        delta_base = delta_ptr + head.to(tl.int64) * total + first
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qn,
            stride_on,
            n,
            seq_len,
            d,
            d_ok,
            qk_scale,
            n0,
            diag_end,
            True,
            BLOCK_M,
        )
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qn,
            stride_on,
            n,
            seq_len,
            d,
            d_ok,
            qk_scale,
            full_start,
            seq_len,
            False,
            BLOCK_M,
        )
    offs = (first + n).to(tl.int64)[:, None] * stride_dkn + kv_head * stride_dkh + d[None, :]
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    rows,
    seq_len,
    d,
    d_ok,
    qk_scale,
    lo,
    hi,
    causal,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Add the contributions of keys lo .. hi-1 to a query block's dq (unscaled)."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < seq_len
        k = _load_rows(k_base, n, n_ok, stride_kn, d, d_ok)
        v = _load_rows(v_base, n, n_ok, stride_vn, d, d_ok)
        p = tl.math.exp2(_dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK:
            visible = n_ok[None, :] & ((n[None, :] <= rows[:, None]) | (causal == 0))
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _varlen_bwd_dq(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_seqlens_ptr,
    scale,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    total,
    group,
    head_dim,
    causal,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block for one query head (dO and dQ share O's contiguous layout)."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    m0 = tile * BLOCK_M
    if m0 >= seq_len:
        return
    kv_head = head // group
    first = start.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = _load_rows(q_ptr + first * stride_qn + head * stride_qh, rows, rows_ok, stride_qn, d, d_ok)
    o_base = first * stride_on + head * stride_oh
    do = _load_rows(do_ptr + o_base, rows, rows_ok, stride_on, d, d_ok)
    # lse = +inf past the sequence makes P = 0 on those rows
    lse = tl.load(lse_ptr + head.to(tl.int64) * total + first + rows, mask=rows_ok, other=float("inf"))
    delta = tl.load(delta_ptr + head.to(tl.int64) * total + first + rows, mask=rows_ok, other=0.0)
    k_base = k_ptr + first * stride_kn + kv_head * stride_kh
    v_base = v_ptr + first * stride_vn + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = tl.where(causal != 0, m0, seq_len // BLOCK_N * BLOCK_N)  # as in the forward
    kv_end = tl.where(causal != 0, tl.minimum(seq_len, m0 + BLOCK_M), seq_len)
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        rows,
        seq_len,
        d,
        d_ok,
        qk_scale,
        0,
        full_end,
        causal,
        False,
        BLOCK_N,
    )
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        rows,
        seq_len,
        d,
        d_ok,
        qk_scale,
        full_end,
        kv_end,
        causal,
        True,
        BLOCK_N,
    )
    offs = rows.to(tl.int64)[:, None] * stride_on + d[None, :]
    tl.store(dq_ptr + o_base + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


# (fp32 inputs, BLOCK_D) -> kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward and
# dQ step over keys (BLOCK_M % BLOCK_N == 0, so a tile's causal diagonal starts on a key block);
# dK/dV steps over queries (BLOCK_N % BLOCK_M == 0, likewise). fp32 IEEE dots get no tensor
# cores and need their operands in registers, hence the smaller tiles.
_TILES = {
    (False, 32): dict(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    (False, 64): dict(fwd=(128, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    (False, 128): dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 8, 2), dq=(64, 32, 4, 2)),
    (True, 32): dict(fwd=(64, 32, 4, 2), dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2)),
    (True, 64): dict(fwd=(64, 32, 4, 2), dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2)),
    (True, 128): dict(fwd=(64, 32, 8, 2), dkdv=(16, 32, 4, 2), dq=(32, 32, 4, 2)),
}
_DELTA_BLOCKS = dict(BLOCK_M=64, BLOCK_D=64)  # one config for every head dim: it loops over D
_KERNELS = dict(fwd=_varlen_fwd, dkdv=_varlen_bwd_dkdv, dq=_varlen_bwd_dq, delta=_varlen_bwd_delta)
_POINTER_TYPES = dict(lse_ptr="*fp32", delta_ptr="*fp32", cu_seqlens_ptr="*i32")  # the rest: input dtype
_FLOAT_ARGS = ("scale", "qk_scale")  # the rest of the scalars: i32


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    """Every argument's type, read off its name (see `_POINTER_TYPES`, `_FLOAT_ARGS`)."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _POINTER_TYPES.get(name, "*" + triton_type(dtype))
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def _build_table() -> dict:
    """Every launch the dispatch can make: (kernel kind, dtype, BLOCK_D) -> Launch.

    Causal or not is a runtime argument: it only moves loop bounds and adds one comparison to the
    masked blocks, not worth doubling the table for.
    """
    table = {}
    for dtype in _DTYPES:
        for block_d in _BLOCK_DS:
            for kind, (bm, bn, warps, stages) in _TILES[dtype == torch.float32, block_d].items():
                assert (bn % bm if kind == "dkdv" else bm % bn) == 0, (kind, bm, bn)
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
                kernel = _KERNELS[kind]
                table[kind, dtype, block_d] = Launch(kernel, _signature(kernel, dtype, consts), consts, warps, stages)
        consts = dict(_DELTA_BLOCKS)
        table["delta", dtype, None] = Launch(
            _varlen_bwd_delta, _signature(_varlen_bwd_delta, dtype, consts), consts, num_warps=4, num_stages=1
        )
    return table


_TABLE = _build_table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `varlen_attention` can use (see kernels/aot.py)."""
    return list(_TABLE.values())


def _cfg(kind: str, dtype: torch.dtype, head_dim: int) -> Launch:
    block_d = None if kind == "delta" else max(_BLOCK_DS[0], triton.next_power_of_2(head_dim))
    return _TABLE[kind, dtype, block_d]


def _forward_triton(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """(out [N, Hq, D] contiguous, lse [Hq, N] fp32 in base 2)."""
    n, hq, d = q.shape
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    cfg = _cfg("fwd", q.dtype, d)
    grid = (triton.cdiv(max_seqlen, cfg.constexprs["BLOCK_M"]), cu_seqlens.numel() - 1, hq)
    launch(
        cfg,
        grid,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        n,
        hq // k.shape[1],
        d,
        int(causal),
    )
    return out, lse


def _backward_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """(dq, dk, dv): dout, dq share out's contiguous layout; dk, dv are [N, Hkv, D] contiguous."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    dout = dout.to(q.dtype).contiguous()
    dq = torch.empty_like(out)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if n == 0:
        return dq, dk, dv
    delta = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    cfg = _cfg("delta", q.dtype, d)
    launch(cfg, (triton.cdiv(n, cfg.constexprs["BLOCK_M"]), hq), out, dout, delta, out.stride(0), out.stride(1), n, d)
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
    )
    cfg = _cfg("dkdv", q.dtype, d)
    launch(
        cfg,
        (triton.cdiv(max_seqlen, cfg.constexprs["BLOCK_N"]), num_seqs, hkv),
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens,
        scale,
        scale * _LOG2E,
        *strides,
        dk.stride(0),
        dk.stride(1),
        n,
        hq // hkv,
        d,
        int(causal),
    )
    cfg = _cfg("dq", q.dtype, d)
    launch(
        cfg,
        (triton.cdiv(max_seqlen, cfg.constexprs["BLOCK_M"]), num_seqs, hq),
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        cu_seqlens,
        scale,
        scale * _LOG2E,
        *strides,
        n,
        hq // hkv,
        d,
        int(causal),
    )
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        out, lse = _forward_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward_triton(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, *, scale: float | None = None):
    """The reference: one fp32 `F.scaled_dot_product_attention` per sequence (differentiable).

    Reads cu_seqlens on the host (a device sync for CUDA tensors); `max_seqlen` is unused.
    """
    n, hq, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    compute = torch.promote_types(q.dtype, torch.float32)
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:  # [L, H, D] -> [1, H, L, D]; is_causal is top-left aligned, as wanted for L x L
            qs, ks, vs = (t[a:b].transpose(0, 1)[None].to(compute) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=hq != k.shape[1])
            outs.append(o[0].transpose(0, 1))
    if not outs:  # no rows at all: an empty result that still belongs to the graph
        return q.clone()
    return torch.cat(outs).to(q.dtype)


def _check(q, k, v, cu_seqlens, max_seqlen) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"varlen_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or q.shape[-1] < 1:
        raise ValueError(f"varlen_attention: q must be [N, Hq, D] with D >= 1, got shape {tuple(q.shape)}")
    n, hq, d = q.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(
            f"varlen_attention: k and v must both be [N={n}, Hkv, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[1] < 1 or hq % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"varlen_attention: q, k, v must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {t.device}, q on {q.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "varlen_attention: cu_seqlens must be int32 [S+1] with S >= 1, got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < (1 if n else 0):
        raise ValueError(f"varlen_attention: max_seqlen must be an int >= 1 (the longest sequence), got {max_seqlen!r}")
    if cu_seqlens.device.type == "cpu":  # free to check here; on a GPU it would cost a sync
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if bounds[0] != 0 or bounds[-1] != n or min(lengths) < 0:
            raise ValueError(f"varlen_attention: cu_seqlens must rise from 0 to N={n}, got {bounds}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} < the longest sequence ({max(lengths)})")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention within each packed sequence (module docstring), differentiable in q, k, v.

    q [N, Hq, D], k/v [N, Hkv, D] (fp32, bf16 or fp16, one dtype; Hq a multiple of Hkv);
    cu_seqlens int32 [S+1] from 0 to N; `max_seqlen` a host int >= the longest sequence (it sizes
    the grid; with CUDA tensors a smaller one leaves rows uncomputed, as nothing is read back to
    check it). Returns [N, Hq, D] in q's dtype. scale: 1/sqrt(D) by default. impl: "triton"
    (CUDA, or the interpreter; head dims up to 128), "torch", or "auto" (Triton on CUDA tensors).
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(impl, q, "varlen_attention"):
        return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, causal, scale=scale)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"varlen_attention: the Triton path takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if cu_seqlens.numel() - 1 > 65535:  # grid axis 1 (CUDA's limit)
        raise ValueError(f"varlen_attention: the Triton path takes up to 65535 sequences, got {cu_seqlens.numel() - 1}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, bool(causal), float(scale))
