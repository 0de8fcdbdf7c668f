"""rope_store_kv (RoPE of q and k and the KV store in one launch), Triton under the interpreter and
the torch reference: bit for bit `apply_rope` then `store_kv` of the same path, within tolerance
of float64; strided q/k/v (slices of a fused projection), GQA and MQA, odd and large head dims,
skipped (negative) slots, every other cache row untouched; the launch table and bad input."""

import pytest
import torch

from score.kernels.kv_store import store_kv
from score.kernels.rope import apply_rope
from score.kernels.rope_kv_store import aot_launches, rope_store_kv
from tests.test_rope_kernel import TOL, rope64, rope_tables

SHAPES = [(5, 3, 1, 10), (7, 4, 2, 64), (3, 2, 2, 6), (2, 1, 1, 320), (6, 14, 2, 64), (3, 20, 4, 64)]


def case(shape, dtype, seed):
    """A fused [N, Hq + 2 Hkv, D] projection's q, k, v slices, rope tables, random-filled caches
    and a slot mapping into shuffled rows with one skipped token."""
    n, hq, hkv, d = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, hq + 2 * hkv, d, generator=gen).to(dtype)
    q, k, v = qkv.split((hq, hkv, hkv), dim=1)
    cos, sin = rope_tables(n, d, dtype, offset=300)
    num_blocks, block_size = 4, 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int32)
    slots[n // 2] = -1
    return q, k, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_apply_rope_then_store_kv_bit_for_bit(impl, dtype, shape):
    q, k, v, cos, sin, k_cache, v_cache, slots = case(shape, dtype, seed=sum(shape))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, k_rot = apply_rope(q, k, cos, sin, impl=impl)
    store_kv(k_rot, v, want_k, want_v, slots, impl=impl)

    got_q = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, impl=impl)
    assert got_q.shape == q.shape and got_q.dtype == dtype and got_q.is_contiguous()
    assert torch.equal(got_q, want_q)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_float64_and_only_mapped_rows_change(impl, shape):
    dtype = torch.bfloat16
    q, k, v, cos, sin, k_cache, v_cache, slots = case(shape, dtype, seed=7 + sum(shape))
    before_k, before_v = k_cache.clone(), v_cache.clone()
    got_q = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, impl=impl)

    cos64, sin64 = cos.double(), sin.double()
    torch.testing.assert_close(got_q.double(), rope64(q.double(), cos64, sin64), **TOL[dtype])
    hkv, d = k.shape[1:]
    k_rows, v_rows = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    stored = slots >= 0
    rows = slots[stored].long()
    k64 = rope64(k.double(), cos64, sin64)[stored]
    torch.testing.assert_close(k_rows[rows].double(), k64, **TOL[dtype])
    assert torch.equal(v_rows[rows], v[stored])
    untouched = torch.ones(k_rows.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(k_rows[untouched], before_k.view(-1, hkv, d)[untouched])
    assert torch.equal(v_rows[untouched], before_v.view(-1, hkv, d)[untouched])


def test_no_tokens_is_a_no_op():
    q, k, v, cos, sin, k_cache, v_cache, slots = case((3, 2, 1, 8), torch.float32, seed=0)
    before = k_cache.clone()
    out = rope_store_kv(q[:0], k[:0], v[:0], cos[:0], sin[:0], k_cache, v_cache, slots[:0], impl="triton")
    assert out.shape == (0, 2, 8) and torch.equal(k_cache, before)


def test_launch_table_covers_every_dtype_and_head_block():
    table = aot_launches()
    assert len(table) == 3 * 5
    assert {c.signature["q_ptr"] for c in table} == {"*fp32", "*bf16", "*fp16"}
    assert all(c.signature["slot_ptr"] == "*i32" for c in table)


def test_bad_input_names_the_op_and_the_problem():
    q, k, v, cos, sin, k_cache, v_cache, slots = case((3, 2, 1, 8), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"rope_store_kv: cos must be \[N, D\]"):
        rope_store_kv(q, k, v, cos[:2], sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be int32"):
        rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots.long())
    with pytest.raises(ValueError, match="k and v must both be"):
        rope_store_kv(q, k, v[:, :0], cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="dtype"):
        rope_store_kv(q, k, v, cos, sin, k_cache.double(), v_cache.double(), slots)
