"""rms_norm (with and without the fused residual add) and swiglu, Triton under the interpreter and
the torch reference, against float64 autograd on odd shapes, forward and backward with random
upstream gradients, in fp32 and bf16."""

import pytest
import torch

from score.kernels import rms_norm, swiglu
from score.model.model import RMSNorm

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def rms_norm64(x, w, eps, r=None):
    h = x if r is None else x + r
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)), h


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 1100)])
def test_rms_norm_forward_and_backward_against_float64(impl, dtypes, with_residual, shape):
    x_dtype, w_dtype = dtypes
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(x_dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(w_dtype).requires_grad_()
    r = torch.randn(shape, generator=gen).to(x_dtype).requires_grad_() if with_residual else None
    y, h = rms_norm(x, w, 1e-6, r, impl=impl)
    assert y.dtype == torch.promote_types(x_dtype, w_dtype) and y.shape == x.shape
    dy = torch.randn(shape, generator=gen).to(y.dtype)
    dh = torch.randn(shape, generator=gen).to(x_dtype) if with_residual else None
    grads = torch.autograd.grad(
        (y, h) if with_residual else (y,), (x, w, r) if with_residual else (x, w), (dy, dh) if with_residual else (dy,)
    )

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if with_residual else None
    y64, h64 = rms_norm64(x64, w64, 1e-6, r64)
    outs = (y64, h64) if with_residual else (y64,)
    ups = (dy.double(), dh.double()) if with_residual else (dy.double(),)
    ref = torch.autograd.grad(outs, (x64, w64, r64) if with_residual else (x64, w64), ups)
    tol = TOL[x_dtype]
    torch.testing.assert_close(y.double(), y64, **tol)
    if with_residual:
        torch.testing.assert_close(h.double(), h64, **tol)
    scale = {"atol": tol["atol"] * shape[-1] ** 0.5 * 4, "rtol": tol["rtol"]}  # dw sums over rows
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got.double(), want, **scale)


def test_rms_norm_equals_the_decoders_norm_bit_for_bit_on_cpu():
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=gen))
    x = torch.randn(7, 64, generator=gen)
    y, _ = rms_norm(x, norm.weight, 1e-5, impl="torch")
    assert torch.equal(y, norm(x))
    y_triton, _ = rms_norm(x, norm.weight, 1e-5, impl="triton")
    torch.testing.assert_close(y_triton, norm(x), atol=1e-6, rtol=1e-6)


def test_rms_norm_bad_input_is_named():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        rms_norm(x, torch.ones(8), 1e-6, torch.randn(3, 9))
    with pytest.raises(ValueError, match="not supported"):
        rms_norm(x.double(), torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="eps must be > 0"):
        rms_norm(x, torch.ones(8), 0.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (3, 1500)])
def test_swiglu_forward_and_backward_against_float64(impl, dtype, shape):
    gen = torch.Generator().manual_seed(shape[1])
    gate = (torch.randn(shape, generator=gen) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    y = swiglu(gate, up, impl=impl)
    dy = torch.randn(shape, generator=gen).to(dtype)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = torch.nn.functional.silu(g64) * u64
    rg, ru = torch.autograd.grad(y64, (g64, u64), dy.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(dgate.double(), rg, **tol)
    torch.testing.assert_close(dup.double(), ru, **tol)
    assert y.dtype == dgate.dtype == dtype


def test_swiglu_bad_input_is_named():
    with pytest.raises(ValueError, match="must match in shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        swiglu(torch.randn(2, 3).double(), torch.randn(2, 3).double())
