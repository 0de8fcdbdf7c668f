"""Paged attention and the KV store kernel against a float64 dense reference.

The Triton path runs under TRITON_INTERPRET=1 on CPU (small shapes); the torch path is the
engine's CPU path. Sequences get shuffled physical blocks, padded block tables point at foreign
blocks, and the cache is filled with random data everywhere, so reading a wrong row shows up.
"""

import math

import pytest
import torch

from score.kernels.kv_store import store_kv
from score.kernels.paged_attention import (
    PagedAttentionBuffers,
    paged_attention,
    paged_attention_triton,
    plan_paged_attention,
)


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


CASES = [
    # ctx_lens, q_lens: decode batch, prefill over a cached prefix, whole-prompt prefill, mixed
    ([5, 17, 1, 40], [1, 1, 1, 1]),
    ([33, 20], [7, 20]),
    ([5, 17, 1, 40], [1, 17, 1, 9]),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("block_size,hq,hkv,d", [(1, 4, 2, 16), (3, 6, 1, 24), (16, 2, 2, 32)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_dense_reference(impl, block_size, hq, hkv, d, case):
    ctx_lens, q_lens = CASES[case]
    args, keys, values = build_case(ctx_lens, q_lens, block_size, hq, hkv, d, seed=case)
    out = paged_attention(**args, impl=impl)
    ref = dense_reference(args["q"], keys, values, q_lens, ctx_lens, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == args["q"].shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_triton_bf16_and_custom_scale_into_poisoned_output():
    args, keys, values = build_case([30, 9, 64], [30, 2, 1], 4, 8, 2, 64, dtype=torch.bfloat16)
    out = torch.full_like(args["q"], float("nan"))
    paged_attention_triton(
        args["q"],
        args["k_cache"],
        args["v_cache"],
        args["block_tables"],
        args["context_lens"],
        args["cu_seqlens_q"],
        0.3,
        args["max_q_len"],
        out=out,
    )
    ref = dense_reference(args["q"], keys, values, [30, 2, 1], [30, 9, 64], 0.3)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    torch_out = paged_attention(**args, scale=0.3, impl="torch")
    torch.testing.assert_close(torch_out.double(), ref, atol=3e-2, rtol=3e-2)


def test_torch_float64_is_exact_and_plan_is_reusable():
    args, keys, values = build_case([12, 7], [3, 7], 2, 4, 2, 8, dtype=torch.float64)
    plan = plan_paged_attention(
        args["block_tables"], args["context_lens"], args["cu_seqlens_q"], 2, args["max_q_len"], args["max_context_len"]
    )
    ref = dense_reference(args["q"], keys, values, [3, 7], [12, 7], 8**-0.5)
    for _ in range(2):  # a plan is built once per engine step and reused by every layer
        out = paged_attention(**args, impl="torch", plan=plan)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_torch_decode_steps_extend_the_kept_keys():
    """Consecutive decode steps of one batch copy only each new token's K/V into the kept buffers."""
    full = [6, 18, 2, 41]
    args, keys, values = build_case(full, [1] * 4, 3, 4, 2, 8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    buffers = PagedAttentionBuffers()
    for step, continues in ((0, False), (1, True)):
        ctx_lens = [c - 1 + step for c in full]  # step 0 sees all but the last position
        if step == 1:  # the new token's K/V land in the cache (as the engine's store does)
            for s, ctx in enumerate(ctx_lens):
                block = args["block_tables"][s, (ctx - 1) // 3]
                for cache, ref in ((args["k_cache"], keys), (args["v_cache"], values)):
                    ref[s][ctx - 1] = torch.randn(2, 8, generator=gen, dtype=torch.float64)
                    cache[block, (ctx - 1) % 3] = ref[s][ctx - 1]
        step_args = dict(
            args,
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            max_context_len=max(ctx_lens),
            q=torch.randn(4, 4, 8, generator=gen, dtype=torch.float64),
        )
        plan = plan_paged_attention(
            step_args["block_tables"],
            step_args["context_lens"],
            args["cu_seqlens_q"],
            3,
            1,
            max(ctx_lens),
            buffers,
            continues_decode=continues,
        )
        assert (plan.extend is not None) == continues
        ref = dense_reference(step_args["q"], keys, values, [1] * 4, ctx_lens, 8**-0.5)
        for _ in range(2):  # two layers' calls share the plan
            torch.testing.assert_close(
                paged_attention(**step_args, impl="torch", plan=plan), ref, atol=1e-12, rtol=1e-12
            )


def test_torch_decode_extend_from_new_kv_equals_reading_the_cache():
    """A continuing decode step may hand its new k/v to the torch path instead of having them read
    back from the cache (the engine's CPU decode): the output is bit-identical."""
    from score.kernels.paged_attention import paged_attention_torch

    full = [6, 18, 2, 41]
    args, _, _ = build_case(full, [1] * 4, 3, 4, 2, 8)
    gen = torch.Generator().manual_seed(2)
    outs = {}
    for use_new in (False, True):
        buffers = PagedAttentionBuffers()
        k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
        for step, continues in ((0, False), (1, True), (2, True)):
            ctx_lens = [c - 2 + step for c in full]
            k_new = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(step))
            v_new = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(10 + step))
            slots = torch.tensor(
                [int(args["block_tables"][s, (c - 1) // 3]) * 3 + (c - 1) % 3 for s, c in enumerate(ctx_lens)],
                dtype=torch.int32,
            )
            store_kv(k_new, v_new, k_cache, v_cache, slots, impl="torch")
            context_lens = torch.tensor(ctx_lens, dtype=torch.int32)
            plan = plan_paged_attention(
                args["block_tables"],
                context_lens,
                args["cu_seqlens_q"],
                3,
                1,
                max(ctx_lens),
                buffers,
                continues_decode=continues,
            )
            q = torch.randn(4, 4, 8, generator=gen)
            new_kv = torch.stack((k_new, v_new), dim=2) if use_new else None
            outs[use_new, step] = paged_attention_torch(q, k_cache, v_cache, plan, 8**-0.5, new_kv=new_kv)
        gen = torch.Generator().manual_seed(2)
    for step in range(3):
        assert torch.equal(outs[False, step], outs[True, step])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_store_kv_writes_only_mapped_rows(impl):
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(6, 4, 3, 5, generator=gen)
    v_cache = torch.randn(6, 4, 3, 5, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k = torch.randn(5, 3, 5, generator=gen)
    v = torch.randn(5, 3, 5, generator=gen)
    slots = torch.tensor([7, -1, 0, 23, 12], dtype=torch.int32)  # -1: padding token, skipped
    store_kv(k, v, k_cache, v_cache, slots, impl=impl)
    k_expect, v_expect = k_before.view(-1, 3, 5).clone(), v_before.view(-1, 3, 5).clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_expect[slot], v_expect[slot] = k[i], v[i]
    assert torch.equal(k_cache.view(-1, 3, 5), k_expect)
    assert torch.equal(v_cache.view(-1, 3, 5), v_expect)


def test_bad_inputs_name_the_argument():
    args, _, _ = build_case([5], [1], 4, 4, 2, 8)
    with pytest.raises(ValueError, match="context_lens must be int32"):
        paged_attention(**{**args, "context_lens": args["context_lens"].long()})
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention(**{**args, "q": torch.randn(1, 3, 8)})
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(**{**args, "cu_seqlens_q": torch.tensor([0, 1, 1], dtype=torch.int32)})
    with pytest.raises(ValueError, match="impl"):
        paged_attention(**args, impl="cuda")
    with pytest.raises(ValueError, match="max_q_len"):
        paged_attention(**{**args, "max_q_len": 0})
    k = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping must be int32"):
        store_kv(k, k, args["k_cache"], args["v_cache"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows of k"):
        store_kv(
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 8),
            args["k_cache"],
            args["v_cache"],
            torch.tensor([0, 1], dtype=torch.int32),
        )
