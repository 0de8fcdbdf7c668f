"""Paged-attention test cases: K/V stored into shuffled blocks of a random-filled cache, and the float64
dense attention they must give (used by the kernel's tests and the engine's CPU attention tests)."""

import math

import torch

from score.kernels.kv_store import store_kv


def dense_reference(q, keys, values, q_lens, ctx_lens, scale):
    """Float64 attention per sequence: query i of a q_len tail sits at position ctx - q_len + i."""
    outs, row = [], 0
    for k, v, q_len, ctx in zip(keys, values, q_lens, ctx_lens, strict=True):
        group = q.shape[1] // k.shape[1]
        k = k[:ctx].double().repeat_interleave(group, 1)
        v = v[:ctx].double().repeat_interleave(group, 1)
        qq = q[row : row + q_len].double()
        row += q_len
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outs)


def build_case(ctx_lens, q_lens, block_size, hq, hkv, d, dtype=torch.float32, seed=0):
    """Random K/V stored through `store_kv` (Triton) into shuffled blocks of a random-filled cache."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(needed) + 5
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(needed) + 1  # one spare column: padding must never be read
    tables, keys, values = [], [], []
    for ctx, nb in zip(ctx_lens, needed, strict=True):
        blocks = [free.pop() for _ in range(nb)]
        tables.append(blocks + torch.randint(0, num_blocks, (width - nb,), generator=gen).tolist())
        k = torch.randn(ctx, hkv, d, generator=gen).to(dtype)
        v = torch.randn(ctx, hkv, d, generator=gen).to(dtype)
        slots = torch.tensor(
            [blocks[i // block_size] * block_size + i % block_size for i in range(ctx)], dtype=torch.int32
        )
        store_kv(k, v, k_cache, v_cache, slots, impl="torch" if dtype == torch.float64 else "triton")
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return (
        dict(
            q=q,
            k_cache=k_cache,
            v_cache=v_cache,
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            cu_seqlens_q=cu,
            max_q_len=max(q_lens),
            max_context_len=max(ctx_lens),
        ),
        keys,
        values,
    )
