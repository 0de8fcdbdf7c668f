"""The engine's paged attention on plain torch ops (its "torch" backend, the CPU path), with the state
it keeps between calls.

Same maths as `score.kernels.paged_attention` (whose layout and argument conventions it follows),
organised for an engine that runs step after step and layer after layer:
- one gather plan per step (`plan_paged_attention`): the gather indices and masks depend only on the
  step, not the layer, so every layer reuses them;
- one gather of every sequence's keys through its block table into storage kept across steps
  (`PagedAttentionBuffers`: a fresh multi-MB tensor per layer costs more in page faults than the
  copy that fills it), then torch's fused SDPA with the mask in fp32 (float64 stays float64);
- decode steps of one batch keep every layer's gathered keys and values and the step's mask, and a
  step that continues the previous one adds only its new token's K/V (`continues_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F


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
    `num_layers`: how many layers' keys a decode batch keeps (`planned_attention`'s `layer`).
    """
    device = block_tables.device
    num_seqs = context_lens.numel()
    needed_blocks = -(-max_context_len // block_size)  # block_tables is as wide (check_paged_attention)
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


def planned_attention(
    q,
    k_cache,
    v_cache,
    plan: PagedAttentionPlan,
    scale: float,
    new_kv: torch.Tensor | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Paged attention over a step's `plan` (module docstring); math in fp32, or float64 for float64 input.

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
