"""varlen_attention: Triton (under the interpreter) and the torch reference against float64
attention computed one sequence at a time, forward and backward with random upstream gradients;
fp32 and bf16; GQA and MQA; causal and not; odd head dims and empty sequences; strided inputs."""

import math

import pytest
import torch

from score.kernels.varlen_attention import aot_launches, varlen_attention

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def attention64(q, k, v, lengths, causal):
    """Float64 reference: explicit softmax per sequence and query head (KV head h // group)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs, start = [], 0
    for length in lengths:
        qs, ks, vs = (t[start : start + length].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            visible = torch.ones(length, length, dtype=torch.bool).tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += length
    return torch.cat(outs)


def packed(lengths, hq, hkv, d, dtype, gen):
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def check_against_float64(q, k, v, cu, lengths, causal, impl, dtype, gen):
    out = varlen_attention(q, k, v, cu, max(lengths), causal, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention64(*leaves, lengths, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "lengths, hq, hkv, d",
    [([5, 1, 9], 4, 2, 16), ([3, 0, 7], 2, 1, 24), ([70], 2, 2, 8)],
)
def test_forward_and_backward_against_float64(impl, dtype, causal, lengths, hq, hkv, d):
    gen = torch.Generator().manual_seed(sum(lengths) + d)
    q, k, v, cu = packed(lengths, hq, hkv, d, dtype, gen)
    check_against_float64(q, k, v, cu, lengths, causal, impl, dtype, gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_slices_of_a_fused_projection(impl):
    """q, k, v as views of one [N, Hq + 2 Hkv, D] tensor, as a fused qkv projection gives them."""
    gen = torch.Generator().manual_seed(3)
    lengths, hq, hkv, d = [4, 6], 4, 1, 32
    qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=gen).requires_grad_()
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    check_against_float64(q, k, v, cu, lengths, True, impl, torch.float32, gen)


def test_triton_equals_the_torch_reference_and_never_crosses_a_boundary():
    """Changing one sequence's keys leaves every other sequence's output unchanged, bit for bit."""
    gen = torch.Generator().manual_seed(8)
    lengths = [6, 5, 7]
    q, k, v, cu = packed(lengths, 2, 1, 16, torch.float32, gen)
    out = varlen_attention(q, k, v, cu, 7, impl="triton")
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 7, impl="torch"), **TOL[torch.float32])
    k2 = k.detach().clone()
    k2[6:11] += 1.0
    out2 = varlen_attention(q, k2, v, cu, 7, impl="triton")
    assert torch.equal(out[:6], out2[:6]) and torch.equal(out[11:], out2[11:])
    assert not torch.equal(out[6:11], out2[6:11])


def test_bad_input_is_named():
    gen = torch.Generator().manual_seed(0)
    q, k, v, cu = packed([3, 4], 4, 2, 8, torch.float32, gen)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        varlen_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="must rise from 0 to N=7"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="max_seqlen=3 < the longest sequence"):
        varlen_attention(q, k, v, cu, 3)
    with pytest.raises(ValueError, match=r"multiple of KV heads \(3\)"):
        varlen_attention(q, torch.randn(7, 3, 8), torch.randn(7, 3, 8), cu, 4)
    with pytest.raises(ValueError, match="share one dtype"):
        varlen_attention(q, k.bfloat16(), v, cu, 4)
    with pytest.raises(ValueError, match="head dims up to 128"):
        big = torch.randn(7, 1, 160)
        varlen_attention(big, big, big, cu, 4, impl="triton")


def test_aot_table_holds_every_dispatch_choice():
    from score.kernels.varlen_attention import _cfg

    table = aot_launches()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (8, 24, 64, 80, 128):
            for kind in ("fwd", "dkdv", "dq", "delta"):
                assert _cfg(kind, dtype, d) in table
