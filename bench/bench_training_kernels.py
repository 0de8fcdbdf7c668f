"""The training kernels against the eager ops they replace, forward + backward, on one GPU.

    pytest bench/bench_training_kernels.py --benchmark-only -q -s

Per op and model shape (Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-3.1-8B: bench/gpu_workloads.py), bf16,
16 x 1,024 packed tokens: `rms_norm` with the residual add (eager: add, then HF's RMSNorm ops),
`swiglu` (eager: `F.silu(gate) * up`), `apply_rope` on q and k (eager: HF's rotate-half, twice) and
`varlen_attention` against what a user would otherwise pick: the decoder's SDPA with GQA over the
sequences scattered into a zero-padded batch (the packed sequences have lengths 64..1,024, so the
padding is real), and torch's own packed attention, `torch.nn.attention.varlen.varlen_attn`
(FlashAttention inside torch), where the installed torch has it (its causal and GQA arguments
differ between releases: key and value heads are repeated for a release without GQA). Every side
runs in this process, rounds interleaved; reported: milliseconds of each (best round), the
speed-up over each peer, and whether the kernel beats the eager ops (the issue's target at every
shape).

CUDA only: on CPU the kernels run under Triton's interpreter, which measures nothing about them
(their CPU tests are tests/test_fused_norm_swiglu.py, test_rope_kernel.py, test_varlen_attention.py).
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.nn.functional as F

from bench.gpu_workloads import KERNEL_SHAPES, KERNEL_TOKENS
from score.kernels import apply_rope, rms_norm, swiglu, varlen_attention
from score.model.attention import causal_attention
from score.model.model import RMSNorm
from score.model.model import apply_rope as rope_eager
from score.model.shapes import PUBLISHED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times the Triton kernels: needs a CUDA GPU")

SHAPES = {  # hidden, intermediate, q heads, kv heads, head dim
    name: (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    for name, c in ((name, PUBLISHED[name]) for name in KERNEL_SHAPES)
}
TOKENS, ROUNDS = KERNEL_TOKENS, 20
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


def torch_varlen():
    """torch's packed causal attention, `attend(q, k, v, cu, longest, scale)`, or None where the
    installed torch has no `torch.nn.attention.varlen`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def attend(q, k, v, cu, longest, scale):
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, enable_gqa=True, **causal)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)

    return attend


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
    attention = {
        "ours": _fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, longest), q, k, v),
        "eager": _fwd_bwd(  # SDPA with GQA over the zero-padded batch: the decoder's own fallback
            lambda a, b, c: causal_attention(a, b, c, scale=d**-0.5, cu_seqlens=cu, max_seqlen=longest, backend="sdpa"),
            q,
            k,
            v,
        ),
    }
    attend = torch_varlen()
    if attend is not None:
        try:  # a peer that errors or disagrees with our kernel is reported, not timed
            theirs = attend(q, k, v, cu, longest, d**-0.5)
            mine = varlen_attention(q, k, v, cu, longest)
            error = float((theirs.float() - mine.float()).abs().max() / mine.float().abs().max())
            if error > 2e-2:
                raise ValueError(f"differs from varlen_attention by {error:.2e} (relative)")
            attention["torch_varlen"] = _fwd_bwd(lambda a, b, c: attend(a, b, c, cu, longest, d**-0.5), q, k, v)
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"\n{shape}: torch.nn.attention.varlen not timed: {type(e).__name__}: {e}")
    return {
        "rms_norm+residual": {
            "ours": _fwd_bwd(lambda a, b: rms_norm(a, w, 1e-6, b), x, r),
            "eager": _fwd_bwd(lambda a, b: (lambda h: (norm(h), h))(b + a), x, r),
        },
        "swiglu": {"ours": _fwd_bwd(swiglu, gate, up), "eager": _fwd_bwd(lambda g, u: F.silu(g) * u, gate, up)},
        "apply_rope": {
            "ours": _fwd_bwd(lambda a, b: apply_rope(a, b, cos, sin), q, k),
            "eager": _fwd_bwd(lambda a, b: (rope_eager(a, cos, sin), rope_eager(b, cos, sin)), q, k),
        },
        "varlen_attention": attention,
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernels_against_eager(benchmark, shape):
    results = {}
    for name, sides in cases(shape).items():
        ms = {label: [] for label in sides}
        for r in range(2):  # interleaved, each side twice
            for label in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                ms[label].append(_time(sides[label]))
        best = {label: min(v) for label, v in ms.items()}
        results[name] = best
        benchmark.extra_info[f"{name}_ms"] = best["ours"]
        for peer in best.keys() - {"ours"}:
            benchmark.extra_info[f"{name}_{peer}_ms"] = best[peer]
            benchmark.extra_info[f"{name}_speedup_over_{peer}"] = best[peer] / best["ours"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{shape} ({torch.cuda.get_device_name()}, bf16, {TOKENS} tokens, fwd+bwd):")
    for name, best in results.items():
        peers = "  ".join(
            f"{peer} {best[peer]:8.3f} ms x{best[peer] / best['ours']:.2f}" for peer in best if peer != "ours"
        )
        print(f"  {name:18s} ours {best['ours']:8.3f} ms  {peers}  faster than eager: {best['eager'] > best['ours']}")
