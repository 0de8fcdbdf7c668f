"""apply_rope (q and k in one launch), Triton under the interpreter and the torch reference, against
float64 autograd of the rotate-half formula: forward and backward with random upstream gradients,
fp32 and bf16, odd head dims, GQA and MQA, strided inputs (slices of a fused qkv projection)."""

import pytest
import torch

from score.kernels.rope import aot_launches, apply_rope
from score.model import model

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}


def rope_tables(n, d, dtype, offset=0):
    """HF's cos/sin [N, D] (`cat(freqs, freqs)`), rounded to `dtype` as `score.model.model.rope_tables` does."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = (torch.arange(n).float() + offset)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope64(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def qkv_slices(n, hq, hkv, d, dtype, gen):
    """q, k as views into one fused [N, Hq + 2 Hkv, D] projection (the leaf, returned first)."""
    qkv = torch.randn(n, hq + 2 * hkv, d, generator=gen).to(dtype).requires_grad_()
    return qkv, qkv[:, :hq], qkv[:, hq : hq + hkv]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 1, 10), (7, 4, 2, 64), (3, 2, 2, 6), (2, 1, 1, 320)])
def test_forward_and_backward_against_float64(impl, dtype, shape):
    n, hq, hkv, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    qkv, q, k = qkv_slices(n, hq, hkv, d, dtype, gen)
    cos, sin = rope_tables(n, d, dtype, offset=1000)
    q_rot, k_rot = apply_rope(q, k, cos, sin, impl=impl)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and q_rot.dtype == k_rot.dtype == dtype
    dq_rot, dk_rot = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    (dqkv,) = torch.autograd.grad((q_rot, k_rot), qkv, (dq_rot, dk_rot))

    qkv64 = qkv.detach().double().requires_grad_()
    cos64, sin64 = cos.double(), sin.double()
    q64, k64 = rope64(qkv64[:, :hq], cos64, sin64), rope64(qkv64[:, hq : hq + hkv], cos64, sin64)
    (ref,) = torch.autograd.grad((q64, k64), qkv64, (dq_rot.double(), dk_rot.double()))
    tol = TOL[dtype]
    torch.testing.assert_close(q_rot.double(), q64, **tol)
    torch.testing.assert_close(k_rot.double(), k64, **tol)
    torch.testing.assert_close(dqkv.double(), ref, **tol)
    assert not dqkv[:, hq + hkv :].any()  # v's slice takes no gradient


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp16_with_every_other_head_and_a_transposed_input(impl):
    gen = torch.Generator().manual_seed(11)
    n, hq, hkv, d = 4, 4, 2, 80
    q = torch.randn(n, 2 * hq, d, generator=gen).half()[:, ::2].requires_grad_()  # head stride 2 D
    k = torch.randn(n, d, hkv, generator=gen).half().transpose(1, 2).requires_grad_()  # stride 1 over heads
    cos, sin = rope_tables(n, d, torch.float16)
    q_rot, k_rot = apply_rope(q, k, cos, sin, impl=impl)
    dq_rot, dk_rot = torch.randn(q.shape, generator=gen).half(), torch.randn(k.shape, generator=gen).half()
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_rot, dk_rot))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = (rope64(q64, cos.double(), sin.double()), rope64(k64, cos.double(), sin.double()))
    ref_grads = torch.autograd.grad(ref, (q64, k64), (dq_rot.double(), dk_rot.double()))
    for got, want in zip((q_rot, k_rot, dq, dk), ref + ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_reference_equals_the_decoders_rope_bit_for_bit_on_cpu(dtype):
    gen = torch.Generator().manual_seed(5)
    n, hq, hkv, d = 6, 4, 2, 64
    q, k = torch.randn(n, hq, d, generator=gen).to(dtype), torch.randn(n, hkv, d, generator=gen).to(dtype)
    cos, sin = rope_tables(n, d, dtype, offset=37)
    q_rot, k_rot = apply_rope(q, k, cos, sin, impl="torch")
    assert torch.equal(q_rot, model.apply_rope(q, cos, sin))
    assert torch.equal(k_rot, model.apply_rope(k, cos, sin))
    q_tri, k_tri = apply_rope(q, k, cos, sin, impl="triton")
    torch.testing.assert_close(q_tri, q_rot, **TOL[dtype])
    torch.testing.assert_close(k_tri, k_rot, **TOL[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_zero_tokens(impl):
    q = torch.zeros(0, 4, 8, requires_grad=True)
    k = torch.zeros(0, 2, 8, requires_grad=True)
    cos, sin = rope_tables(0, 8, torch.float32)
    q_rot, k_rot = apply_rope(q, k, cos, sin, impl=impl)
    assert q_rot.shape == (0, 4, 8) and k_rot.shape == (0, 2, 8)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (torch.zeros(0, 4, 8), torch.zeros(0, 2, 8)))
    assert dq.shape == q.shape and dk.shape == k.shape


def test_cos_and_sin_take_no_gradient():
    q, k = torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 1, 8)
    cos, sin = rope_tables(2, 8, torch.float32)
    cos.requires_grad_()
    for impl in ("triton", "torch"):
        q_rot, _ = apply_rope(q, k, cos, sin, impl=impl)
        q_rot.sum().backward()
        assert cos.grad is None and q.grad is not None


def test_bad_input_is_named():
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    cos, sin = rope_tables(3, 8, torch.float32)
    with pytest.raises(ValueError, match="q must be a torch.Tensor"):
        apply_rope(q.tolist(), k, cos, sin)
    with pytest.raises(ValueError, match=r"must be 3-D \[N, H, D\]"):
        apply_rope(q.reshape(3, 32), k, cos, sin)
    with pytest.raises(ValueError, match="same N and D"):
        apply_rope(q, torch.randn(2, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="head dim D must be even, got 7"):
        apply_rope(torch.randn(3, 4, 7), torch.randn(3, 2, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"sin must be \[N, D\] = \[3, 8\]"):
        apply_rope(q, k, cos, sin[:2])
    with pytest.raises(ValueError, match="share one dtype"):
        apply_rope(q, k, cos.bfloat16(), sin)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        apply_rope(q.double(), k.double(), cos.double(), sin.double())
    with pytest.raises(ValueError, match="impl must be one of"):
        apply_rope(q, k, cos, sin, impl="cuda")


@pytest.mark.parametrize("d", [6, 10, 64, 80, 96, 128, 256, 512])
def test_every_head_dim_launches_one_table_entry(d):
    """The dispatcher's choice for each dtype and direction is in the AOT table, exactly once."""
    from score.kernels.rope import _entry

    table = aot_launches()
    assert len(table) <= 30
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for backward in (0, 1):
            assert _entry(dtype, backward, d // 2) in table
