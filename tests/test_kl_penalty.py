"""kl_penalty values and gradients against float64 formulas, both implementations."""

import pytest
import torch

from score.kernels import kl_penalty


def reference(logp, ref, kind):
    """float64 value and autograd gradient of each estimator (k3 with verl's clamps)."""
    lp = logp.double().requires_grad_()
    d = lp - ref.double()
    if kind == "k1":
        value = d
    elif kind == "k2":
        value = 0.5 * d**2
    else:
        r = (-d).clamp(-20, 20)
        value = (r.exp() - r - 1).clamp(-10, 10)
    (grad,) = torch.autograd.grad(value.sum(), lp)
    if kind == "k3+":
        grad = d.detach()  # straight-through: k2's gradient
    return value.detach(), grad


def inputs(n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=gen) * 5
    ref = -torch.rand(n, generator=gen) * 5
    # the clamps: log-ratios beyond ±20 and k3 values beyond 10
    logp[:4] = torch.tensor([-30.0, -1.0, -13.0, 0.0])
    ref[:4] = torch.tensor([0.0, -31.0, 0.0, -12.5])
    return logp, ref


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k3+"])
def test_value_and_gradient(kind, impl):
    logp, ref = inputs(seed=["k1", "k2", "k3", "k3+"].index(kind))
    lp = logp.clone().requires_grad_()
    value = kl_penalty(lp, ref, kind, impl=impl)
    upstream = torch.randn(logp.shape[0])
    (value * upstream).sum().backward()
    want_value, want_grad = reference(logp, ref, kind)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), want_value, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lp.grad.double(), want_grad * upstream.double(), rtol=1e-5, atol=1e-5)


def test_k3_clamps_bind():
    logp, ref = inputs()
    value = kl_penalty(logp, ref, "k3")
    assert value.max() <= 10.0
    assert value[0] == 10.0  # ref - logp = 30 -> clamped log-ratio, then clamped value


def test_bf16_logp_and_2d_shape():
    logp, ref = inputs(64)
    value = kl_penalty(logp.view(8, 8).bfloat16(), ref.view(8, 8), "k2")
    want, _ = reference(logp.bfloat16().float(), ref, "k2")
    assert value.shape == (8, 8)
    assert torch.allclose(value.reshape(-1).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kl_penalty(torch.zeros(3), torch.zeros(4)), "shape"),
        (lambda: kl_penalty(torch.zeros(3), torch.zeros(3), "k4"), "kind"),
        (lambda: kl_penalty(torch.zeros(3, dtype=torch.long), torch.zeros(3)), "logp must be a floating"),
        (lambda: kl_penalty(torch.zeros(3), torch.zeros(3, requires_grad=True)), "ref_logp requires grad"),
        (lambda: kl_penalty(torch.zeros(3), torch.zeros(3), impl="fast"), "impl"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
