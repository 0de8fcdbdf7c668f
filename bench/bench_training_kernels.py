"""The training kernels against the eager ops they replace, forward + backward, on one GPU.

    pytest bench/bench_training_kernels.py --benchmark-only -q -s

Per op and model shape (Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-3-8B), bf16, 16 x 1,024 packed tokens:
`rms_norm` with the residual add (eager: add, then HF's RMSNorm ops), `swiglu` (eager:
`F.silu(gate) * up`), `apply_rope` on q and k (eager: HF's rotate-half, twice) and
`varlen_attention` (eager: the decoder's SDPA over sequences scattered into a zero-padded batch;
the packed sequences have lengths 64..1,024, so padding is real). Both sides run in this process,
rounds interleaved; reported: milliseconds of each (best round), the speed-up, and whether the
kernel beats the eager ops (the issue's target at every shape).

CUDA only: on CPU the kernels run under Triton's interpreter, which measures nothing about them
(their CPU tests are tests/test_fused_norm_swiglu.py, test_rope_kernel.py, test_varlen_attention.py).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from score.kernels import apply_rope, rms_norm, swiglu, varlen_attention
from score.model.attention import causal_attention
from score.model.model import RMSNorm
from score.model.model import apply_rope as rope_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times the Triton kernels: needs a CUDA GPU")

SHAPES = {  # hidden, intermediate, q heads, kv heads, head dim
    "0.5B": (896, 4864, 14, 2, 64),
    "1.5B": (1536, 8960, 12, 2, 128),
    "8B": (4096, 14336, 32, 8, 128),
}
TOKENS, ROUNDS = 16 * 1024, 20
DTYPE = torch.bfloat16


def _time(fn) -> float:
    """Best-of-rounds milliseconds of fn() (forward and backward)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _fwd_bwd(fn, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o for o in outs if o is not None], [torch.ones_like(o) for o in outs if o is not None])

    return run


def _leaf(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_()


def cases(shape):
    hidden, inter, hq, hkv, d = SHAPES[shape]
    x, r, w = _leaf(TOKENS, hidden), _leaf(TOKENS, hidden), torch.ones(hidden, device="cuda", dtype=DTYPE)
    norm = RMSNorm(hidden, 1e-6).to("cuda", DTYPE)
    gate, up = _leaf(TOKENS, inter), _leaf(TOKENS, inter)
    q, k, v = _leaf(TOKENS, hq, d), _leaf(TOKENS, hkv, d), _leaf(TOKENS, hkv, d)
    angles = torch.arange(TOKENS, device="cuda")[:, None] * torch.rand(d // 2, device="cuda")
    cos, sin = torch.cat((angles, angles), -1).cos().to(DTYPE), torch.cat((angles, angles), -1).sin().to(DTYPE)
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < TOKENS:
        n = min(int(torch.randint(64, 1025, (1,), generator=gen)), TOKENS - total)
        lengths.append(n)
        total += n
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    longest = max(lengths)
    return {
        "rms_norm+residual": (
            _fwd_bwd(lambda a, b: rms_norm(a, w, 1e-6, b), x, r),
            _fwd_bwd(lambda a, b: (lambda h: (norm(h), h))(b + a), x, r),
        ),
        "swiglu": (_fwd_bwd(swiglu, gate, up), _fwd_bwd(lambda g, u: F.silu(g) * u, gate, up)),
        "apply_rope": (
            _fwd_bwd(lambda a, b: apply_rope(a, b, cos, sin), q, k),
            _fwd_bwd(lambda a, b: (rope_eager(a, cos, sin), rope_eager(b, cos, sin)), q, k),
        ),
        "varlen_attention": (
            _fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, longest), q, k, v),
            _fwd_bwd(
                lambda a, b, c: causal_attention(
                    a, b, c, scale=d**-0.5, cu_seqlens=cu, max_seqlen=longest, backend="sdpa"
                ),
                q,
                k,
                v,
            ),
        ),
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernels_against_eager(benchmark, shape):
    results = {}
    for name, (ours, eager) in cases(shape).items():
        ms = {"ours": [], "eager": []}
        for r in range(2):  # interleaved, each side twice
            for label, fn in (("ours", ours), ("eager", eager)) if r % 2 == 0 else (("eager", eager), ("ours", ours)):
                ms[label].append(_time(fn))
        best = {label: min(v) for label, v in ms.items()}
        results[name] = best
        benchmark.extra_info[f"{name}_ms"] = best["ours"]
        benchmark.extra_info[f"{name}_eager_ms"] = best["eager"]
        benchmark.extra_info[f"{name}_speedup"] = best["eager"] / best["ours"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{shape} ({torch.cuda.get_device_name()}, bf16, {TOKENS} tokens, fwd+bwd):")
    for name, best in results.items():
        ratio = best["eager"] / best["ours"]
        print(
            f"  {name:18s} ours {best['ours']:8.3f} ms  eager {best['eager']:8.3f} ms"
            f"  x{ratio:.2f}  faster: {ratio > 1}"
        )
