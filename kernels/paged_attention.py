"""Attention over a paged KV cache: one kernel for decode and for prefill over a cached prefix.

Layout (one layer): `k_cache`, `v_cache` [num_blocks, block_size, Hkv, D]; sequence s owns the
blocks `block_tables[s, :]` (int32, padded with any valid block id); its keys are positions
0 .. context_lens[s]-1. The new queries of all sequences are packed: q [N, Hq, D] with
`cu_seqlens_q` int32 [S+1]. Sequence s has q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s] new
tokens, which are its LAST q_len positions (their K/V are already stored in the cache), so query
i (0-based among the new ones) sits at position context_lens[s] - q_len + i and sees keys
0 .. that position: causal within the new tokens, everything before them. Decode is q_len = 1;
prefill with nothing cached is q_len = context_len. Grouped-query heads: query head h reads KV
head h // (Hq // Hkv). Any block size (1 included) and head dim up to 256.

Two implementations of the same maths:
- Triton (`_paged_attention_kernel`): one program per (tile of BLOCK_M query rows, sequence, KV
  head). A query row is a (token, head-in-group) pair, so decode with GQA still fills the tile
  with the group's heads. Keys are gathered BLOCK_N positions at a time through the block table
  (position -> block id, offset), which is what lets the block size be anything. Online softmax
  in fp32; fp32 inputs multiply in full IEEE fp32 (the dot would otherwise default to TF32 on
  tensor-core GPUs), 16-bit inputs in their own precision with fp32 accumulation. The tile
  stops at its last query's position, so the causal part costs nothing extra.
- torch (`paged_attention_torch`): the reference, and what `impl="torch"` runs. Every sequence's
  keys gathered through its block table, its new queries scattered into a padded batch, one SDPA
  with a boolean mask (GQA native) in fp32 (float64 stays float64). Built anew at every call: it
  keeps nothing between calls. (The engine's CPU path, which keeps its gathers and decode keys
  from step to step, is score.model.engine.torch_attention.)

flash-attn is not used here; the engine picks it separately (it needs 256-token blocks).
Not done: ALiBi, sliding windows, logit soft-capping (no supported model family uses them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    context_lens_ptr,
    cu_seqlens_q_ptr,
    scale,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_on,
    stride_oh,
    stride_bt,
    block_size,
    group,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * group:  # the grid is sized for the longest query of the batch
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // group
    head = kv_head * group + rows % group
    row_ok = token < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_offs = (q_start + token).to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx_len - q_len + token

    last_token = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // group, q_len - 1)
    kv_end = ctx_len - q_len + last_token + 1  # keys past the tile's last query are never seen

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        block = tl.load(bt_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
        offset = n % block_size
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if q_ptr.dtype.element_ty == tl.float32:  # fp32 stays fp32 (the default would be TF32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        # position 0 is visible to every row, so m_new is finite from the first tile on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if q_ptr.dtype.element_ty == tl.float32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    o_offs = (q_start + token).to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _build_table() -> dict:
    """Every launch the dispatch can make, keyed by (dtype, BLOCK_M, BLOCK_D).

    Head dims pad up to 64, 128 or 256 (the real model families use 64 or 128), which keeps the
    set of compiled variants small. Decode-sized query tiles (query length x group <= 16) get 16
    rows, prefill tiles 64. BLOCK_N shrinks at D=256 to keep K/V tiles inside shared memory.
    """
    ints = [
        "stride_qn",
        "stride_qh",
        "stride_kb",
        "stride_ks",
        "stride_kh",
        "stride_vb",
        "stride_vs",
        "stride_vh",
        "stride_on",
        "stride_oh",
        "stride_bt",
        "block_size",
        "group",
        "head_dim",
    ]
    table = {}
    for dtype in _DTYPES:
        ptr = "*" + triton_type(dtype)
        for block_d in (64, 128, 256):
            for block_m in (16, 64):
                signature = {
                    "q_ptr": ptr,
                    "k_cache_ptr": ptr,
                    "v_cache_ptr": ptr,
                    "out_ptr": ptr,
                    "block_tables_ptr": "*i32",
                    "context_lens_ptr": "*i32",
                    "cu_seqlens_q_ptr": "*i32",
                    "scale": "fp32",
                }
                signature.update({name: "i32" for name in ints})
                constexprs = dict(BLOCK_M=block_m, BLOCK_N=32 if block_d >= 256 else 64, BLOCK_D=block_d)
                signature.update({k: "constexpr" for k in constexprs})
                table[dtype, block_m, block_d] = Launch(
                    _paged_attention_kernel, signature, constexprs, num_warps=4, num_stages=2
                )
    return table


_TABLE = _build_table()


def _launch_config(max_q_len: int, group: int, head_dim: int, dtype: torch.dtype) -> Launch:
    block_m = 16 if max_q_len * group <= 16 else 64
    return _TABLE[dtype, block_m, max(64, triton.next_power_of_2(head_dim))]


def check_paged_attention(
    q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_q_len: int, max_context_len: int
) -> None:
    """The argument checks of `paged_attention` (a caller that runs many layers over one step's
    arguments may run them once)."""
    if max_q_len < 1 or max_context_len < max_q_len:
        raise ValueError(f"need 1 <= max_q_len <= max_context_len, got {max_q_len}, {max_context_len}")
    if q.dim() != 3:
        raise ValueError(f"q must be [N, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head dim of q ({d}) and k_cache ({k_cache.shape[3]}) differ")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported")
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    s = context_lens.numel()
    if block_tables.dim() != 2 or block_tables.shape[0] != s:
        raise ValueError(f"block_tables must be [S={s}, max_blocks], got {tuple(block_tables.shape)}")
    if cu_seqlens_q.shape != (s + 1,):
        raise ValueError(f"cu_seqlens_q must have S+1 = {s + 1} entries, got {tuple(cu_seqlens_q.shape)}")
    needed_blocks = -(-max_context_len // k_cache.shape[1])
    if block_tables.shape[1] < needed_blocks:
        raise ValueError(
            f"block_tables has {block_tables.shape[1]} columns, context length "
            f"{max_context_len} needs {needed_blocks} blocks of {k_cache.shape[1]}"
        )


def paged_attention_torch(
    q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_q_len: int, max_context_len: int, scale: float
) -> torch.Tensor:
    """The reference (module docstring): [N, Hq, D] in q's dtype, math in fp32, or float64 for
    float64 input."""
    device, (n, hq, d) = q.device, q.shape
    num_seqs, block_size, hkv = context_lens.numel(), k_cache.shape[1], k_cache.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    context, cu = context_lens.long(), cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    key_pos = torch.arange(max_context_len, device=device)
    q_pos = (context - q_lens)[:, None] + torch.arange(max_q_len, device=device)  # [S, max_q]
    visible = (key_pos <= q_pos[:, :, None]) & (key_pos < context[:, None, None])  # [S, max_q, T]
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=n)
    rows = (seq, torch.arange(n, device=device) - cu[seq])  # packed row -> (sequence, query i)
    blocks = block_tables[:, : -(-max_context_len // block_size)].long()

    def gather(cache):  # whole blocks through the block table: [S, Hkv, T, D]
        return cache[blocks].flatten(1, 2)[:, :max_context_len].transpose(1, 2).to(compute)

    q_padded = q.new_zeros(num_seqs, max_q_len, hq, d).index_put(rows, q)
    # key 0 is visible to every row (padded query rows see the whole context): no row is all masked
    out = F.scaled_dot_product_attention(
        q_padded.transpose(1, 2).to(compute),
        gather(k_cache),
        gather(v_cache),
        attn_mask=visible[:, None],
        scale=scale,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)[rows].to(q.dtype)


def paged_attention_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    cu_seqlens_q,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n, hq, d = q.shape
    num_seqs = context_lens.numel()
    hkv = k_cache.shape[2]
    group = hq // hkv
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if out is None:
        out = torch.empty_like(q)
    if n == 0 or num_seqs == 0:
        return out
    cfg = _launch_config(max_q_len, group, d, q.dtype)
    grid = (triton.cdiv(max_q_len * group, cfg.constexprs["BLOCK_M"]), num_seqs, hkv)
    launch(
        cfg,
        grid,
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        cu_seqlens_q,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.shape[1],
        group,
        d,
    )
    return out


def paged_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    cu_seqlens_q,
    *,
    max_q_len: int,
    max_context_len: int,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of packed new queries over each sequence's paged keys (module docstring).

    q [N, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] holding the new tokens' K/V
    already; block_tables int32 [S, max_blocks]; context_lens int32 [S] (cached + new tokens);
    cu_seqlens_q int32 [S+1]. `max_q_len` / `max_context_len` are host ints bounding the batch
    (they size the grid / gather without a device sync). Returns [N, Hq, D] in q's dtype.
    impl: "triton" (CUDA, or the interpreter), "torch", or "auto" (Triton on CUDA tensors).
    """
    check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_q_len, max_context_len)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if use_triton(impl, q, "paged_attention"):
        if q.dtype not in _DTYPES:
            raise ValueError(f"the Triton path takes {_DTYPES}, got {q.dtype}")
        return paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, max_q_len)
    return paged_attention_torch(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_q_len, max_context_len, scale
    )


def aot_launches() -> list[Launch]:
    """Every launch configuration `paged_attention` can use (see kernels/aot.py)."""
    return list(_TABLE.values())
