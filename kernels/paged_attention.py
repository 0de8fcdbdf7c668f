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
- torch (`paged_attention_torch`): the CPU path and the test oracle. One gather of every
  sequence's keys through its block table, then torch's fused SDPA with a boolean mask (GQA
  native) in fp32 (float64 stays float64). The gather indices and masks depend only on the step,
  not the layer, so `plan_paged_attention` builds them once and every layer reuses the plan; a
  caller that runs step after step keeps the gather storage in one `PagedAttentionBuffers`.

flash-attn is not used here; the engine picks it separately (it needs 256-token blocks).
Not done: ALiBi, sliding windows, logit soft-capping (no supported model family uses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

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
    """The argument checks of `paged_attention` (a caller that reuses one plan for every layer of
    a step runs them once, then calls `paged_attention_torch`)."""
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


class PagedAttentionBuffers:
    """Storage of the torch path that outlives one call: shared by every layer of a step, and by
    later steps when the caller keeps the object (the engine keeps one for its whole life).

    A fresh multi-MB tensor per layer costs more in page faults than the copy that fills it, so
    the K and V gathers write into grown-on-demand storage. Decode steps of one batch also keep
    each layer's gathered keys and values, and the step's mask (see `plan_paged_attention`).
    """

    def __init__(self):
        self._gathered: dict[str, torch.Tensor] = {}  # "k" / "v" -> flat storage
        # (sequences, token capacity) the kept decode buffers were made for, None before any decode
        self.decode_shape: tuple[int, int] | None = None
        # every layer's kept keys and values in one tensor [layers, sequences, 2 Hkv, capacity, D]
        # (a layer's K heads then its V heads), and its per-layer views
        self.decode_kv: torch.Tensor | None = None
        self.decode_kv_layers: tuple[torch.Tensor, ...] = ()
        # compute dtype -> [sequences, capacity] additive mask (0 where a key is visible, -inf past
        # it) and the same as [sequences, 1, 1, capacity], the shape SDPA takes
        self.decode_masks: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # Hkv -> `decode_index`'s constant parts
        self._kv_heads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (Hkv, device) -> `kv_heads`
        self._columns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its [S, 1, 1] view)

    def gathered(self, name: str, rows: int, row_size: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised [rows, row_size] tensor of `like`'s dtype and device for gather `name`."""
        numel = rows * row_size
        buf = self._gathered.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._gathered[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(rows, row_size)

    def start_decode(self, num_seqs: int, capacity: int) -> None:
        """Size the kept decode buffers for a new batch (their contents are refilled)."""
        self.decode_shape = (num_seqs, capacity)
        self.decode_masks.clear()
        self._index.clear()

    def kept_kv(self, num_layers: int, heads: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per layer, the kept [sequences, heads, capacity, head_dim] keys|values of a decode batch
        (zeros when made, stale but finite after: the mask hides what a sequence has not stored)."""
        num_seqs, capacity = self.decode_shape
        shape = (num_layers, num_seqs, heads, capacity, head_dim)
        kept = self.decode_kv
        if kept is None or kept.shape != shape or kept.dtype != like.dtype or kept.device != like.device:
            self.decode_kv = like.new_zeros(shape)
            self.decode_kv_layers = self.decode_kv.unbind(0)
        return self.decode_kv_layers

    def column(self, values: torch.Tensor) -> torch.Tensor:
        """`values` [S] or [S, 1] as [S, 1, 1] (index_put_ indices broadcast so), kept for the last
        few tensors: a caller that reuses its buffers step after step (the engine's decode step)
        gets the same view again without an op."""
        kept = self._columns.get(id(values))
        if kept is None or kept[0] is not values:
            if len(self._columns) >= 8:
                self._columns.pop(next(iter(self._columns)))
            kept = self._columns[id(values)] = values, values.view(-1, 1, 1)
        return kept[1]

    def kv_heads(self, kv_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(K or V [1, 1, 2], head [1, Hkv, 1]): the index_put_ indices, broadcast with a row index
        [N, 1, 1], of every element of a k|v [N, Hkv, 2, D] in a [2, rows, Hkv, D] layer cache."""
        key = (kv_heads, torch.device(device))
        if key not in self._kv_heads:
            arange = torch.arange(max(2, kv_heads), device=device)
            self._kv_heads[key] = arange[:2].view(1, 1, 2), arange[:kv_heads].view(1, kv_heads, 1)
        return self._kv_heads[key]

    def decode_index(self, positions: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, ...]:
        """`index_put_` indices of each sequence's new k|v [S, Hkv, 2, D] at `positions` [S, 1] in a
        kept [S, 2 Hkv, capacity, D] buffer (K heads, then V heads)."""
        parts = self._index.get(kv_heads)
        if parts is None:
            device = positions.device
            half, head = self.kv_heads(kv_heads, device)
            parts = self._index[kv_heads] = (
                torch.arange(positions.shape[0], device=device).view(-1, 1, 1),
                head + kv_heads * half,
            )
        return parts[0], parts[1], self.column(positions)


@dataclass
class PagedAttentionPlan:
    """Per-step gather indices and masks for the torch path, shared by every layer."""

    block_tables: torch.Tensor  # [S, >= ceil(T / block_size)] int32, as the caller gave them
    visible: torch.Tensor | None  # [S, 1, max_q, T] bool: query i of sequence s may see key t
    query_index: tuple[torch.Tensor, torch.Tensor] | None  # packed row -> (sequence, i)
    max_q_len: int
    max_context_len: int
    block_size: int
    buffers: PagedAttentionBuffers
    # decode with persistent per-layer key buffers (see `plan_paged_attention`): their token
    # capacity, and when this step continues the previous one, each sequence's new key position
    # [S, 1] int64 (then `visible` and `query_index` are not built: the kept mask is extended instead)
    decode_capacity: int = 0
    extend: torch.Tensor | None = None
    new_key_rows: torch.Tensor | None = None  # their cache rows, when read back (`_new_key_rows`)
    num_layers: int = 1  # the layers whose decode keys are kept (a call names its `layer`)
    # this step's [S, Hkv, T, D] views of every layer's kept keys and of its values, taken once
    kept_views: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
    kept_index: tuple[torch.Tensor, ...] | None = None  # `decode_index` of this step
    # `visible` as the additive float mask SDPA makes of a boolean one, per compute dtype: built on
    # the first layer's call instead of inside every layer's SDPA (same values, same kernel)
    masks: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def num_blocks(self) -> int:
        """Blocks per sequence holding keys 0..T-1."""
        return -(-self.max_context_len // self.block_size)

    @cached_property
    def block_index(self) -> torch.Tensor:
        """[S, num_blocks] int64 block ids (made when a gather needs them: a continuing decode
        step reads none)."""
        return self.block_tables[:, : self.num_blocks].long()


def plan_paged_attention(
    block_tables,
    context_lens,
    cu_seqlens_q,
    block_size: int,
    max_q_len: int,
    max_context_len: int,
    buffers: PagedAttentionBuffers | None = None,
    continues_decode: bool | None = None,
    num_tokens: int | None = None,
    decode_positions: torch.Tensor | None = None,
    num_layers: int = 1,
) -> PagedAttentionPlan:
    """Build the torch path's gather plan once per step (`max_*` are host ints: no device sync).

    `buffers`: storage kept by the caller across steps (default: fresh, for this step's layers).
    `continues_decode` (a caller that keeps `buffers` across steps, e.g. the engine): None keeps
    the plain per-layer gather. Otherwise decode steps keep every layer's gathered keys and values
    and the mask in `buffers`, and True promises that this step decodes exactly the sequences of
    the previous step, in the same order, each one token further, with its older K/V untouched:
    then only the new token's K/V are copied into the buffers and its mask entry opened, instead of
    gathering every key and building the mask again.

    `num_tokens` (optional, a host int) is the number of query rows, `cu_seqlens_q[-1]`, and
    `decode_positions` (optional, int64 [S, 1]) each sequence's new key position `context_lens - 1`
    of a decode step: a caller that knows them saves the ops (and on CUDA the sync) of reading them.
    `num_layers`: how many layers' keys a decode batch keeps (`paged_attention_torch`'s `layer`).
    """
    device = block_tables.device
    num_seqs = context_lens.numel()
    needed_blocks = -(-max_context_len // block_size)
    if block_tables.shape[1] < needed_blocks:
        raise ValueError(
            f"block_tables has {block_tables.shape[1]} columns, context length "
            f"{max_context_len} needs {needed_blocks} blocks of {block_size}"
        )
    buffers = PagedAttentionBuffers() if buffers is None else buffers
    n = num_tokens
    if n is None and cu_seqlens_q.device.type == "cpu":
        n = int(cu_seqlens_q[-1])
    decode = continues_decode is not None and max_q_len == 1 and n == num_seqs
    state = buffers.decode_shape
    if decode and continues_decode and state is not None and state[0] == num_seqs and max_context_len <= state[1]:
        positions = (context_lens.long() - 1)[:, None] if decode_positions is None else decode_positions
        return PagedAttentionPlan(
            block_tables,
            None,
            None,
            1,
            max_context_len,
            block_size,
            buffers,
            state[1],
            extend=positions,
            num_layers=num_layers,
        )
    pos = torch.arange(max_context_len, device=device)
    ctx = context_lens.long()
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    q_pos = (ctx - q_lens)[:, None] + torch.arange(max_q_len, device=device)  # [S, max_q]
    visible = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx[:, None, None])
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=n)
    row_in_seq = torch.arange(seq_of_row.numel(), device=device) - cu[seq_of_row]
    plan = PagedAttentionPlan(
        block_tables,
        visible[:, None],
        (seq_of_row, row_in_seq),
        max_q_len,
        max_context_len,
        block_size,
        buffers,
        num_layers=num_layers,
    )
    if decode:  # a fresh batch: room for 256 more tokens before the next full gather
        plan.decode_capacity = (needed_blocks + -(-256 // block_size)) * block_size
        buffers.start_decode(num_seqs, plan.decode_capacity)
    return plan


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch path's math dtype: float64 for float64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a same-dtype `.to` returns x unchanged but still costs a dispatch; a decode step makes many
    return x if x.dtype == dtype else x.to(dtype)


def paged_attention_torch(
    q,
    k_cache,
    v_cache,
    plan: PagedAttentionPlan,
    scale: float,
    new_kv: torch.Tensor | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Reference paged attention (see module docstring); math in fp32, or float64 for float64 input.

    q [N, Hq, D] returns [N, Hq, D]; q grouped per KV head, [N, Hkv, group, D], is taken too, and
    a decode step of a plan that keeps keys then returns [S, Hkv, group, D] (SDPA's own output).
    `layer` (< plan.num_layers): whose kept keys a decode step reads. `new_kv` (decode only,
    optional): this step's k|v [S, Hkv, 2, D], exactly what was just stored at each sequence's
    last position; a continuing decode step copies them into the kept buffers instead of reading
    them back out of the cache.
    """
    num_seqs, max_ctx = plan.num_seqs, plan.max_context_len
    n, d, hkv = q.shape[0], q.shape[-1], k_cache.shape[2]
    decode = plan.max_q_len == 1 and n == num_seqs
    if q.dim() == 4:
        if q.shape[1] != hkv:
            raise ValueError(f"q grouped per KV head must be [N, {hkv}, group, D], got {tuple(q.shape)}")
        if not (decode and plan.decode_capacity):  # only SDPA over the kept keys takes it as it is
            q = q.flatten(1, 2)
    hq = q.shape[1] * q.shape[2] if q.dim() == 4 else q.shape[1]
    compute = _compute_dtype(q.dtype)
    mask = plan.masks.get(compute)
    if mask is None:
        mask = plan.masks[compute] = (_decode_mask if plan.decode_capacity else _mask)(plan, compute)

    def gather(cache, name):  # whole blocks (row copies), one gather per step and layer: [S, Hkv, T, D]
        num_gathered = plan.num_blocks * plan.block_size
        index = plan.block_index.view(-1)
        rows = plan.buffers.gathered(name, index.numel(), cache[0].numel(), cache)
        torch.index_select(cache.view(cache.shape[0], -1), 0, index, out=rows)
        return _cast(rows.view(num_seqs, num_gathered, hkv, d)[:, :max_ctx].transpose(1, 2), compute)

    if decode:
        # the query heads sharing a KV head become that head's query rows ([S, Hkv, group, D]):
        # SDPA's CPU kernel runs one q row per (sequence, head) far below its multi-row speed;
        # the mask [S, 1, 1, T] broadcasts
        q_grouped = _cast(q if q.dim() == 4 else q.view(num_seqs, hkv, hq // hkv, d), compute)
        if plan.decode_capacity:
            keys, values = _kept_keys(plan, layer, k_cache, v_cache, new_kv)
            keys, values = _cast(keys, compute), _cast(values, compute)
            out = _cast(F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=mask, scale=scale), q.dtype)
            return out if q.dim() == 4 else out.view(n, hq, d)
        keys, values = gather(k_cache, "k"), gather(v_cache, "v")
        out = F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=mask, scale=scale)
        return _cast(out.reshape(n, hq, d), q.dtype)
    q_pad = q.new_zeros(num_seqs, plan.max_q_len, hq, d).index_put(plan.query_index, q)
    # key 0 is visible to every row (padded query rows see the whole context): no row is all masked
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2).to(compute),
        gather(k_cache, "k"),
        gather(v_cache, "v"),
        attn_mask=mask,
        scale=scale,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)[plan.query_index].to(q.dtype)  # [S, max_q, Hq, D] -> packed rows


def _mask(plan: PagedAttentionPlan, dtype: torch.dtype) -> torch.Tensor:
    """What SDPA computes from the boolean mask: where(visible, 0, -inf)."""
    zeros = torch.zeros(plan.visible.shape, dtype=dtype, device=plan.visible.device)
    return zeros.masked_fill_(plan.visible.logical_not(), float("-inf"))


def _decode_mask(plan: PagedAttentionPlan, dtype: torch.dtype) -> torch.Tensor:
    """`_mask` of a decode step [S, 1, 1, T] from the kept [S, capacity] one: built whole for a fresh
    batch, else extended by each sequence's new key."""
    if plan.extend is None:
        num_seqs, capacity = plan.buffers.decode_shape
        kept = torch.full((num_seqs, capacity), float("-inf"), dtype=dtype, device=plan.block_tables.device)
        kept[:, : plan.max_context_len].masked_fill_(plan.visible.view(num_seqs, -1), 0.0)
        plan.buffers.decode_masks[dtype] = kept, kept[:, None, None]
    else:
        kept = plan.buffers.decode_masks[dtype][0]
        kept.scatter_(1, plan.extend, 0.0)
    return plan.buffers.decode_masks[dtype][1][..., : plan.max_context_len]


def _new_key_rows(plan: PagedAttentionPlan) -> torch.Tensor:
    """Cache rows [S] (block * block_size + offset) of a continuing step's new keys, once per step."""
    if plan.new_key_rows is None:
        positions, block_size = plan.extend[:, 0], plan.block_size
        blocks = plan.block_index.gather(1, (positions // block_size)[:, None]).squeeze(1)
        plan.new_key_rows = blocks * block_size + positions % block_size
    return plan.new_key_rows


def _kept_keys(
    plan: PagedAttentionPlan, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, new: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, Hkv, T, D] keys and values of `layer` from the kept buffers, this step's added first.

    Positions past a sequence's length hold zeros or older finite keys; the mask hides them. A fresh
    batch gathers each layer's keys from the cache; a continuing step adds its new k|v ([S, Hkv, 2,
    D], `new`, else read from the cache) with one index_put_. The views of all layers are taken on
    the step's first call: slices of one tensor, they see what later layers store.
    """
    if not 0 <= layer < plan.num_layers:
        raise ValueError(f"layer {layer} is outside the plan's {plan.num_layers} kept layers")
    num_seqs, block_size = plan.num_seqs, plan.block_size
    hkv, d = k_cache.shape[2:]
    kept = plan.buffers.kept_kv(plan.num_layers, 2 * hkv, d, k_cache)[layer]
    if plan.extend is None:
        num_keys = plan.num_blocks * block_size
        for heads, cache in ((slice(0, hkv), k_cache), (slice(hkv, 2 * hkv), v_cache)):
            gathered = cache.view(cache.shape[0], -1)[plan.block_index].view(num_seqs, num_keys, hkv, d)
            kept[:, heads, :num_keys] = gathered.transpose(1, 2)
    else:
        if new is None:
            rows = _new_key_rows(plan)
            new = torch.stack((k_cache.view(-1, hkv, d)[rows], v_cache.view(-1, hkv, d)[rows]), dim=2)
        if plan.kept_index is None:
            plan.kept_index = plan.buffers.decode_index(plan.extend, hkv)
        kept.index_put_(plan.kept_index, new)
    if plan.kept_views is None:
        keys, values = plan.buffers.decode_kv.narrow(3, 0, plan.max_context_len).split(hkv, dim=2)
        plan.kept_views = keys.unbind(0), values.unbind(0)
    return plan.kept_views[0][layer], plan.kept_views[1][layer]


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
    plan: PagedAttentionPlan | None = None,
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
    if plan is None:
        plan = plan_paged_attention(
            block_tables, context_lens, cu_seqlens_q, k_cache.shape[1], max_q_len, max_context_len
        )
    return paged_attention_torch(q, k_cache, v_cache, plan, scale)


def aot_launches() -> list[Launch]:
    """Every launch configuration `paged_attention` can use (see kernels/aot.py)."""
    return list(_TABLE.values())
