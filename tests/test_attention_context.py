"""The engine's attention context on the torch path: handing q grouped per KV head and k|v side by
side (`attend_kv`, the model's engine path on plain ops) stores and attends exactly as handing them
over apart, through a prefill, a fresh decode batch and continuing decode steps, for every layer."""

import pytest
import torch

from score.model.engine.attention_context import AttentionContext, layer_views
from score.model.engine.workspace import DecodeWorkspace

LAYERS, BLOCKS, BLOCK, HKV, HQ, D = 3, 12, 4, 2, 6, 8


def contexts(pool, workspace, lengths, q_lens, continues, store_rows):
    """One step's context: sequence s owns blocks 3s..3s+2, its last q_lens[s] positions are new."""
    tables = torch.tensor([[3 * s, 3 * s + 1, 3 * s + 2] for s in range(len(lengths))], dtype=torch.int32)
    slots = [
        int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK for s, n in enumerate(lengths) for p in range(n - q_lens[s], n)
    ]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    decode = max(q_lens) == 1
    return AttentionContext(
        pool,
        backend="torch",
        slot_mapping=torch.tensor(slots, dtype=torch.int32),
        block_tables=tables,
        context_lens=torch.tensor(lengths, dtype=torch.int32),
        cu_seqlens_q=cu,
        max_q_len=max(q_lens),
        max_context_len=max(lengths),
        copy_src=None,
        copy_dst=None,
        workspace=workspace,
        continues_decode=continues if decode else False,
        layer_caches=layer_views(pool),
        store_rows=torch.tensor(slots) if store_rows else None,
        decode_positions=torch.tensor(lengths)[:, None] - 1 if decode else None,
    )


@pytest.mark.parametrize("store_rows", [True, False])
def test_attend_kv_equals_the_separate_call(store_rows):
    gen = torch.Generator().manual_seed(0)
    pools = [torch.zeros(2, LAYERS, BLOCKS, BLOCK, HKV, D) for _ in range(2)]
    workspaces = [DecodeWorkspace(), DecodeWorkspace()]
    steps = [([5, 9, 2, 7], [5, 9, 2, 7], False)]  # prefill
    steps += [([6 + t, 10 + t, 3 + t, 8 + t], [1] * 4, t > 0) for t in range(3)]  # fresh, then continuing
    for lengths, q_lens, continues in steps:
        n = sum(q_lens)
        apart, side_by_side = (
            contexts(p, w, lengths, q_lens, continues, store_rows) for p, w in zip(pools, workspaces, strict=True)
        )
        for layer in range(LAYERS):
            # what the model hands over: views of one [N, Hkv, group + 2, D] tensor
            qkv = torch.randn(n, HKV, HQ // HKV + 2, D, generator=gen)
            q, kv = qkv.split((HQ // HKV, 2), dim=2)
            want = apart(layer, q.reshape(n, HQ, D), kv[:, :, 0], kv[:, :, 1])
            got = side_by_side.attend_kv(layer, q, kv)
            assert torch.equal(got.reshape(want.shape), want)
        assert torch.equal(pools[0], pools[1])
