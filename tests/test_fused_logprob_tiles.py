"""The tile candidates `bench/sweep_fused_logprob_tiles.py` times on a GPU compute the fused
log-prob path's results: under the interpreter, each candidate's forward (log-probs, entropy) and
backward (both gradients, with random upstream gradients for log-probs and entropy) against the
float64 autograd of the plain formula, bf16, on a shape with partial tiles on every edge."""

import pytest
import torch

from bench.sweep_fused_logprob_tiles import CANDIDATES, run_candidate


@pytest.fixture(scope="module")
def case():
    gen = torch.Generator().manual_seed(0)
    n, d, v = 37, 64, 300
    hidden = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, d, generator=gen) * 0.3).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen)
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_all = torch.log_softmax(h @ w.t(), dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    grad_h, grad_w = torch.autograd.grad((logp, entropy), (h, w), (g_logp.double(), g_ent.double()))
    return (hidden, weight, targets, g_logp, g_ent), (logp.detach(), entropy.detach(), grad_h, grad_w)


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: "x".join(map(str, c)))
def test_candidate_matches_float64(case, candidate):
    inputs, want = case
    got = run_candidate(candidate, *inputs)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err <= 2e-2, f"{candidate} {name}: {err:.3g}"
