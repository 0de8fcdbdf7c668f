"""Paged attention and the KV store kernel against a float64 dense reference.

The Triton path runs under TRITON_INTERPRET=1 on CPU (small shapes); the torch path is the
engine's CPU path. Sequences get shuffled physical blocks, padded block tables point at foreign
blocks, and the cache is filled with random data everywhere, so reading a wrong row shows up.
"""

import pytest
import torch

from score.kernels.kv_store import store_kv
from score.kernels.paged_attention import paged_attention, paged_attention_triton
from tests.helpers.paged_cases import build_case, dense_reference

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


def test_torch_float64_is_exact():
    args, keys, values = build_case([12, 7], [3, 7], 2, 4, 2, 8, dtype=torch.float64)
    ref = dense_reference(args["q"], keys, values, [3, 7], [12, 7], 8**-0.5)
    out = paged_attention(**args, impl="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


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
    with pytest.raises(ValueError, match="block_tables has 1 columns, context length 9 needs 3 blocks of 4"):
        paged_attention(**{**args, "block_tables": args["block_tables"][:, :1], "max_context_len": 9})
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
