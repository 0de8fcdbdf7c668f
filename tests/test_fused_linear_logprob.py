"""fused_linear_logprob against a float64 log_softmax reference (torch path and Triton path).

The Triton path runs under TRITON_INTERPRET=1 on CPU, so its shapes are small; the torch path
(the CPU training path) also gets a mid shape that spans several vocab and token chunks.
"""

import importlib

import pytest
import torch

from score.kernels import fused_linear_logprob
from score.kernels.fused_linear_logprob import IGNORE_INDEX

# The package exports a function of the same name, so reach the module through importlib.
flp = importlib.import_module("score.kernels.fused_linear_logprob")

TOL = {torch.float32: dict(val=2e-5, grad=2e-4), torch.bfloat16: dict(val=2e-5, grad=3e-2)}


def reference(hidden, weight, targets, temperature):
    """float64 logp and entropy of log_softmax(hidden @ weight.T / T) (inputs as given, upcast)."""
    z = (hidden.double() @ weight.double().t()) / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logp = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def make_inputs(n, d, v, dtype, seed, ignore=(), weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.5).to(weight_dtype or dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    for i in ignore:
        targets[i] = IGNORE_INDEX
    return hidden, weight, targets


def check(n, d, v, dtype, impl, temperature, seed, ignore=(), weight_dtype=None):
    hidden, weight, targets = make_inputs(n, d, v, dtype, seed, ignore, weight_dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy = fused_linear_logprob(h, w, targets, temperature=temperature, return_entropy=True, impl=impl)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == (n,) and entropy.shape == (n,)
    gen = torch.Generator().manual_seed(seed + 1)
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    (logp * g_logp + entropy * g_ent).sum().backward()

    h64 = hidden.double().requires_grad_()
    # a weight of another dtype enters at the hidden states' precision (as autocast's linear rounds it)
    w64 = weight.to(dtype).double().requires_grad_()
    ref_logp, ref_ent = reference(h64, w64, targets, temperature)
    (ref_logp * g_logp.double() + ref_ent * g_ent.double()).sum().backward()

    tol = TOL[dtype]
    scale_lp = 1 + ref_logp.abs()
    assert ((logp.double() - ref_logp).abs() / scale_lp).max() < tol["val"] * 10
    assert (entropy.double() - ref_ent).abs().max() < tol["val"] * 10 * (1 + ref_ent.abs().max())
    for got, want, want_dtype in ((h.grad, h64.grad, dtype), (w.grad, w64.grad, weight.dtype)):
        assert got.dtype == want_dtype and torch.isfinite(got).all()
        err = (got.double() - want).abs().max() / (want.abs().max() + 1e-12)
        assert err < tol["grad"], f"relative gradient error {err:.2e}"
    for i in ignore:
        assert logp[i] == 0 and entropy[i] == 0
    if ignore:
        # an ignored token contributes no gradient: its hidden row only sees the entropy-free zero path
        assert torch.all(h.grad[list(ignore)] == 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_match_float64(impl, dtype):
    check(47, 31, 123, dtype, impl, temperature=1.0, seed=0, ignore=(5, 46))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_hidden_with_fp32_master_weight(impl):
    """What autocast over fp32 master weights hands the LM head: bf16 rows, the fp32 weight; the
    weight's gradient comes back in fp32."""
    check(47, 31, 123, torch.bfloat16, impl, temperature=0.7, seed=4, ignore=(3,), weight_dtype=torch.float32)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_temperature_and_vocab_not_power_of_two(impl):
    # V = 4099 spans several vocab tiles / splits, so the online max and split merge are exercised.
    check(21, 40, 4099, torch.float32, impl, temperature=0.7, seed=3)


def test_torch_path_mid_shape_spans_chunks(monkeypatch):
    # Shrink the tile budget so 300 tokens x 5000 vocab crosses token AND vocab chunk boundaries.
    monkeypatch.setattr(flp, "TILE_ELEMENTS", 256 * 1024)
    monkeypatch.setattr(flp, "_chunks", lambda n, v, granule=256: (128, 1024))
    check(300, 64, 5000, torch.float32, "torch", temperature=1.3, seed=7, ignore=(0, 299))
    check(300, 64, 5000, torch.bfloat16, "torch", temperature=1.0, seed=8)


def test_triton_matches_torch_path_bitwise_close():
    hidden, weight, targets = make_inputs(33, 24, 300, torch.float32, seed=11)
    a = fused_linear_logprob(hidden, weight, targets, impl="torch")
    b = fused_linear_logprob(hidden, weight, targets, impl="triton")
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_only_logp_gradient_and_no_entropy_requested():
    hidden, weight, targets = make_inputs(17, 16, 70, torch.float32, seed=5)
    h = hidden.clone().requires_grad_()
    logp = fused_linear_logprob(h, weight, targets, impl="torch")  # weight needs no grad
    g = torch.randn(17)
    (logp * g).sum().backward()
    h64 = hidden.double().requires_grad_()
    ref, _ = reference(h64, weight, targets, 1.0)
    (ref * g.double()).sum().backward()
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-5)


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like made during the test starts as NaN (or -1 for integers)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_output_element_is_written(impl, nan_poisoned_empty):
    hidden, weight, targets = make_inputs(19, 16, 150, torch.float32, seed=2, ignore=(4,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fused_linear_logprob(h, w, targets, return_entropy=True, impl=impl)
    (logp.sum() + ent.sum()).backward()
    for t in (logp, ent, h.grad, w.grad):
        assert torch.isfinite(t).all()


def test_empty_batch():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    logp = fused_linear_logprob(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)
    logp.sum().backward()
    assert torch.all(weight.grad == 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=torch.randn(4, 8, 1)), "hidden"),
        (dict(weight=torch.randn(10, 7)), "hidden sizes differ"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets has 5"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), r"targets\[2\] = 10"),
        (dict(targets=torch.tensor([0, 1, -3, 2])), r"targets\[2\] = -3"),
        (dict(targets=torch.zeros(4)), "targets must be int64"),
        (
            dict(hidden=torch.randn(4, 8, dtype=torch.float64), weight=torch.randn(10, 8, dtype=torch.float64)),
            r"\(hidden, weight\) dtypes torch.float64",
        ),
        # an fp32 weight may serve bf16 hidden states (master weights under autocast), not the reverse
        (dict(weight=torch.randn(10, 8, dtype=torch.bfloat16)), r"torch.float32, torch.bfloat16 not supported"),
        (dict(weight=torch.randn(8, 10).t()), "contiguous"),
        (dict(temperature=0.0), "temperature"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.tensor([0, 1, 9, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprob(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)
