"""The engine's paged attention on plain torch ops (model/engine/torch_attention.py) against a float64
dense reference: a plan reused by every layer of a step, decode steps that keep each layer's keys and
extend them step by step, new K/V handed over instead of read back, and a layer outside the kept ones."""

import pytest
import torch

from score.kernels.kv_store import store_kv
from score.model.engine.torch_attention import PagedAttentionBuffers, plan_paged_attention, planned_attention
from tests.helpers.paged_cases import build_case, dense_reference

CASES = [
    # ctx_lens, q_lens: decode batch, prefill over a cached prefix, whole-prompt prefill, mixed
    ([5, 17, 1, 40], [1, 1, 1, 1]),
    ([33, 20], [7, 20]),
    ([5, 17, 1, 40], [1, 17, 1, 9]),
]


def plan_of(args, block_size, buffers=None, continues=None, num_layers=1):
    return plan_paged_attention(
        args["block_tables"],
        args["context_lens"],
        args["cu_seqlens_q"],
        block_size,
        args["max_q_len"],
        args["max_context_len"],
        buffers,
        continues,
        num_layers=num_layers,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size,hq,hkv,d", [(1, 4, 2, 16), (3, 6, 1, 24), (16, 2, 2, 32)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_plan_serves_every_layer_of_a_step(dtype, block_size, hq, hkv, d, case):
    ctx_lens, q_lens = CASES[case]
    args, keys, values = build_case(ctx_lens, q_lens, block_size, hq, hkv, d, dtype=dtype, seed=case)
    plan = plan_of(args, block_size)
    ref = dense_reference(args["q"], keys, values, q_lens, ctx_lens, d**-0.5)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for _ in range(2):  # a plan is built once per engine step and reused by every layer
        out = planned_attention(args["q"], args["k_cache"], args["v_cache"], plan, d**-0.5)
        assert out.dtype == dtype and out.shape == args["q"].shape
        torch.testing.assert_close(out.double(), ref, atol=tolerance, rtol=tolerance)


def test_decode_steps_extend_the_kept_keys():
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
        plan = plan_of(step_args, 3, buffers, continues)
        assert (plan.extend is not None) == continues
        ref = dense_reference(step_args["q"], keys, values, [1] * 4, ctx_lens, 8**-0.5)
        for _ in range(2):  # two layers' calls share the plan
            out = planned_attention(step_args["q"], args["k_cache"], args["v_cache"], plan, 8**-0.5)
            torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_decode_extend_from_new_kv_equals_reading_the_cache():
    """A continuing decode step may hand its new k/v over instead of having them read back from the
    cache (the engine's CPU decode): the output is bit-identical."""
    full = [6, 18, 2, 41]
    args, _, _ = build_case(full, [1] * 4, 3, 4, 2, 8)
    outs = {}
    for use_new in (False, True):
        gen = torch.Generator().manual_seed(2)
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
            step_args = dict(
                args, context_lens=torch.tensor(ctx_lens, dtype=torch.int32), max_context_len=max(ctx_lens)
            )
            plan = plan_of(step_args, 3, buffers, continues)
            q = torch.randn(4, 4, 8, generator=gen)
            new_kv = torch.stack((k_new, v_new), dim=2) if use_new else None
            outs[use_new, step] = planned_attention(q, k_cache, v_cache, plan, 8**-0.5, new_kv=new_kv)
    for step in range(3):
        assert torch.equal(outs[False, step], outs[True, step])


def test_a_layer_outside_the_kept_ones_is_refused():
    args, _, _ = build_case([6, 7], [1, 1], 4, 6, 2, 8)
    plan = plan_of(args, 4, PagedAttentionBuffers(), continues=False, num_layers=2)
    planned_attention(args["q"], args["k_cache"], args["v_cache"], plan, 0.5, layer=1)
    with pytest.raises(ValueError, match="layer 2 is outside the plan's 2 kept layers"):
        planned_attention(args["q"], args["k_cache"], args["v_cache"], plan, 0.5, layer=2)
