"""The per-step attention context the engine's forward (inference_model.py) hands every layer.

Each layer calls `ctx(layer_idx, q, k, v)` with the new tokens' q [N, Hq, D] and k/v [N, Hkv, D]
(after q/k-norm), or `ctx.attend_kv(layer_idx, q, kv)` with them grouped per KV head (the plain-ops
path). The context (1) stores k/v into the layer's cache blocks through `slot_mapping`, (2) runs
this step's copy-on-write row copies — after the store, because a copy source may be a block
filled in this very step by another sequence of the batch — and (3) returns paged attention of q
over each sequence's blocks. All step metadata (block tables, lengths, gather plan) is built once
per step, not per layer. On the kernel backends the context `applies_rope`: the forward hands over
q and k before RoPE with rope=(cos, sin), and one launch rotates q and k and stores k and v
(kernels/rope_kv_store.py); on the torch backend q and k arrive rotated.

Backends: "triton" (our kernel, CUDA), "torch" (plain torch ops, CPU: torch_attention.py), "flash" (flash-attn's
`flash_attn_varlen_func` with a block table; needs fp16/bf16 on CUDA and block_size % 256 == 0).
"""

from __future__ import annotations

import torch

from score.kernels import paged_attention, store_kv
from score.kernels.kv_store import check_store_kv
from score.kernels.paged_attention import check_paged_attention
from score.kernels.rope_kv_store import rope_store_kv

from .torch_attention import plan_paged_attention, planned_attention
from .workspace import DecodeWorkspace

BACKENDS = ("auto", "triton", "torch", "flash")


def flash_varlen_with_block_table():
    """flash-attn's varlen function if it is installed and loads, else None (never an error)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    return flash_attn_varlen_func


def layer_views(kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: (k_cache, v_cache) [num_blocks, block_size, Hkv, D], the same two as rows
    [num_blocks * block_size, Hkv, D] (what a store indexes) and both as [2, rows, Hkv, D] (what
    one store of k|v indexes), taken once per pool, not per step."""
    views = []
    for i in range(kv_cache.shape[1]):
        k, v = kv_cache[0, i], kv_cache[1, i]
        views.append((k, v, k.flatten(0, 1), v.flatten(0, 1), kv_cache[:, i].flatten(1, 2)))
    return views


class AttentionContext:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        *,
        backend: str,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        max_q_len: int,
        max_context_len: int,
        copy_src: torch.Tensor | None,
        copy_dst: torch.Tensor | None,
        workspace: DecodeWorkspace | None = None,
        continues_decode: bool | None = None,
        layer_caches: list | None = None,
        store_rows: torch.Tensor | None = None,
        decode_positions: torch.Tensor | None = None,
        checked: bool = False,
    ):
        """`workspace` (optional): buffers the torch path keeps across steps. `layer_caches`
        (optional): `layer_views(kv_cache)`, which an engine takes once instead of once per step.
        A caller that knows them from the host (the decode step) may give, for the torch path,
        `store_rows`, `slot_mapping` as int64 with no skipped (negative) slot, and for a decode
        step `decode_positions`, int64 [S, 1] = context_lens - 1: their ops are then saved.
        `checked`: the caller vouches that the arguments are consistent (a decode step over its own
        buffers, checked on the first step of each batch size): the torch path skips its checks."""
        self.kv_cache = kv_cache  # [2, layers, num_blocks, block_size, Hkv, D]
        self.layer_caches = layer_caches
        self.backend = backend
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.cu_seqlens_q = cu_seqlens_q
        self.max_q_len = max_q_len
        self.max_context_len = max_context_len
        self.copy_src, self.copy_dst = copy_src, copy_dst  # cache rows (block * block_size + offset)
        self.scale = kv_cache.shape[-1] ** -0.5
        self.plan = None
        if backend == "torch":
            buffers = None if workspace is None else workspace.attention
            self.plan = plan_paged_attention(
                block_tables,
                context_lens,
                cu_seqlens_q,
                kv_cache.shape[3],
                max_q_len,
                max_context_len,
                buffers,
                continues_decode,
                num_tokens=None if store_rows is None else store_rows.shape[0],
                decode_positions=decode_positions,
                num_layers=kv_cache.shape[1],
            )
            # The torch path is the CPU one, where a step's many small per-layer ops show: the
            # stores' int64 rows are converted once per step and the arguments checked on the
            # first layer's call only (every layer of a step has the same shapes). Negative
            # (skipped) slots, which the engine never makes, take store_kv's filtering path.
            if store_rows is None:
                rows = slot_mapping.long()
                store_rows = rows if bool((rows >= 0).all()) else None
            self._store_rows = store_rows
            self._kv_store_index = None  # `attend_kv`'s index_put_ indices, made on its first call
            self._checked = checked
        self.cu_seqlens_k = self.flash = None
        if backend == "flash":
            self.flash = flash_varlen_with_block_table()
            self.cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))

    @property
    def applies_rope(self) -> bool:
        return self.backend != "torch"

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache, k_rows, v_rows, _ = self._caches(layer_idx)
        if self.backend == "torch":
            if rope is not None:
                raise ValueError("the torch backend takes q and k after RoPE (it does not apply_rope)")
            self._check(q, k, v, k_cache, v_cache)
            if self._store_rows is None:
                store_kv(k, v, k_cache, v_cache, self.slot_mapping, impl="torch")
            else:
                k_rows.index_copy_(0, self._store_rows, k)
                v_rows.index_copy_(0, self._store_rows, v)
            return self._torch_attention(layer_idx, q, None, k_cache, v_cache, k_rows, v_rows)
        if rope is None:
            store_kv(k, v, k_cache, v_cache, self.slot_mapping, impl="triton")
        else:
            q = rope_store_kv(q, k, v, *rope, k_cache, v_cache, self.slot_mapping, impl="triton")
        self._copy_on_write(k_rows, v_rows)
        if self.backend == "flash":
            return self.flash(
                q,
                k_cache,
                v_cache,
                cu_seqlens_q=self.cu_seqlens_q,
                cu_seqlens_k=self.cu_seqlens_k,
                max_seqlen_q=self.max_q_len,
                max_seqlen_k=self.max_context_len,
                softmax_scale=self.scale,
                causal=True,
                block_table=self.block_tables,
            )
        return paged_attention(
            q,
            k_cache,
            v_cache,
            self.block_tables,
            self.context_lens,
            self.cu_seqlens_q,
            max_q_len=self.max_q_len,
            max_context_len=self.max_context_len,
            scale=self.scale,
            impl="triton",
        )

    def attend_kv(self, layer_idx: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """`self(layer_idx, q, k, v)` for the engine's forward on plain ops, which hands over q
        [N, Hkv, group, D] and k|v [N, Hkv, 2, D] as views of one tensor: on the torch path one
        index_put_ stores k and v into the cache, a decode step adds both to its kept keys at once
        and runs on the grouped q as it is. Returns [N, Hq, D], or [S, Hkv, group, D] after a
        decode step with kept keys."""
        if self.backend != "torch" or self._store_rows is None:
            return self(layer_idx, q.flatten(1, 2), *kv.unbind(2))
        k_cache, v_cache, k_rows, v_rows, kv_rows = self._caches(layer_idx)
        if self._kv_store_index is None:
            if not self._checked:
                self._check(q.flatten(1, 2), *kv.unbind(2), k_cache, v_cache)
            half, head = self.plan.buffers.kv_heads(kv.shape[1], kv.device)
            self._kv_store_index = (half, self.plan.buffers.column(self._store_rows), head)
        kv_rows.index_put_(self._kv_store_index, kv)
        return self._torch_attention(layer_idx, q, kv, k_cache, v_cache, k_rows, v_rows)

    def _caches(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        if self.layer_caches is not None:
            return self.layer_caches[layer_idx]
        k_cache, v_cache = self.kv_cache[0, layer_idx], self.kv_cache[1, layer_idx]
        return k_cache, v_cache, k_cache.flatten(0, 1), v_cache.flatten(0, 1), self.kv_cache[:, layer_idx].flatten(1, 2)

    def _check(self, q, k, v, k_cache, v_cache) -> None:
        if self._checked:  # once per step, or never when the caller vouches for the arguments
            return
        check_store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        check_paged_attention(
            q,
            k_cache,
            v_cache,
            self.block_tables,
            self.context_lens,
            self.cu_seqlens_q,
            self.max_q_len,
            self.max_context_len,
        )
        self._checked = True

    def _torch_attention(self, layer_idx, q, kv, k_cache, v_cache, k_rows, v_rows) -> torch.Tensor:
        """The torch path after this layer's store: copy-on-write, then paged attention. `kv` (or
        None) is what was stored, for a decode step to reuse instead of reading it back."""
        self._copy_on_write(k_rows, v_rows)
        # a decode step's new k/v are exactly its last-position rows unless a copy could have
        # overwritten them (no copies: the attention reuses them instead of reading the cache back)
        new_kv = kv if self.copy_src is None and self._store_rows is not None else None
        return planned_attention(q, k_cache, v_cache, self.plan, self.scale, new_kv=new_kv, layer=layer_idx)

    def _copy_on_write(self, k_rows, v_rows) -> None:
        if self.copy_src is not None:
            for rows in (k_rows, v_rows):
                rows[self.copy_dst] = rows[self.copy_src]
