"""Tile sizes of the fused log-prob kernels, by measurement: which block shape wins at which width.

    python bench/sweep_fused_logprob_tiles.py              (CUDA, bf16, N = 8,192, Llama-3-8B's head)
    python bench/sweep_fused_logprob_tiles.py --all-shapes (also Qwen2.5-0.5B's and 1.5B's heads)

The fused path runs two Triton GEMM kernels (the forward with its online softmax, the backward's
recompute of each logits tile into d z) and two cuBLAS GEMMs. Its table holds one block shape per
dtype (kernels/fused_linear_logprob.py); at D = 4,096 that entry reaches ~490 TFLOP/s where
cuBLAS reaches 736. This times each candidate block shape of both Triton kernels on the same
inputs, checks its results against the table's entry, and prints per candidate the forward and
backward kernel times, forward + backward TFLOP/s (8·N·D·V) and the ratio to the naive path's
time (`log_softmax(hidden @ weight.T)` and its backward, cuBLAS) measured in the same run; the
winner per width is what goes into the table, which the AOT test then compiles for sm_80 and
sm_90. A candidate that fails to compile or run on the card is reported as failed and the sweep
goes on; `tests/test_fused_logprob_tiles.py` runs every candidate under the interpreter on CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from bench.gpu_workloads import HEAD_TOKENS, HEADS

flp = importlib.import_module("score.kernels.fused_linear_logprob")

SHAPES = HEADS  # model -> (hidden, vocab) of its LM head (bench/gpu_workloads.py)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is the table's bf16 entry
CANDIDATES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 2),
    (64, 256, 64, 4, 3),
]


def blocks(candidate) -> dict:
    bm, bn, bk, warps, stages = candidate
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def run_candidate(candidate, hidden, weight, targets, g_logp, g_ent):
    """(logp, entropy, grad_hidden, grad_weight) of the fused path with this candidate's launches."""
    fwd, bwd = flp.launches_with_blocks(hidden.dtype, blocks(candidate))
    logp, entropy, lse = flp._forward_triton(hidden, weight, targets, 1.0, cfg=fwd)
    grad_hidden, grad_weight = flp._backward_triton(
        hidden, weight, targets, lse, entropy, g_logp, g_ent, 1.0, True, True, cfg=bwd
    )
    return logp, entropy, grad_hidden, grad_weight


def _time_ms(fn, reps: int) -> float:
    """The fastest of `reps` runs of `fn` on the GPU (after one warm run), in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def _naive_ms(hidden, weight, targets, g_logp, reps: int) -> float:
    """The naive path's forward + backward (cuBLAS logits, log_softmax, gather): the time to beat."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def naive():
        h.grad = w.grad = None
        logp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)
        logp.backward(g_logp)

    return _time_ms(naive, reps)


def sweep(shape: str, n: int, reps: int) -> dict:
    d, v = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, generator=gen, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(v, d, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen, device="cuda")
    g_logp = torch.randn(n, generator=gen, device="cuda")
    g_ent = torch.randn(n, generator=gen, device="cuda")

    naive_ms = _naive_ms(hidden, weight, targets, g_logp, reps)
    reference = run_candidate(CANDIDATES[0], hidden, weight, targets, g_logp, g_ent)
    rows = []
    for candidate in CANDIDATES:
        try:
            rows.append(_time_candidate(candidate, hidden, weight, targets, g_logp, g_ent, reference, naive_ms, reps))
        except Exception as exc:  # one candidate that fails to compile or run must not end the sweep
            rows.append(dict(candidate=candidate, error=f"{type(exc).__name__}: {exc}"[:300]))
    timed = [r for r in rows if "error" not in r]
    best = min(timed, key=lambda r: r["fwd_ms"] + r["bwd_ms"])["candidate"] if timed else None
    return dict(shape=shape, n=n, d=d, v=v, naive_ms=round(naive_ms, 3), rows=rows, best=best)


def _time_candidate(candidate, hidden, weight, targets, g_logp, g_ent, reference, naive_ms: float, reps: int) -> dict:
    """One candidate's row: its results checked against the table entry's, then its kernels timed."""
    (n, d), v = hidden.shape, weight.shape[0]
    got = run_candidate(candidate, hidden, weight, targets, g_logp, g_ent)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, reference, strict=True):
        err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
        if err > 2e-2:
            raise AssertionError(f"{name} differs from the table entry's by {err:.3g} (relative to its max)")
    fwd, bwd = flp.launches_with_blocks(hidden.dtype, blocks(candidate))
    _, entropy, lse = flp._forward_triton(hidden, weight, targets, 1.0, cfg=fwd)
    fwd_ms = _time_ms(lambda: flp._forward_triton(hidden, weight, targets, 1.0, cfg=fwd), reps)
    bwd_ms = _time_ms(
        lambda: flp._backward_triton(hidden, weight, targets, lse, entropy, g_logp, g_ent, 1.0, True, True, cfg=bwd),
        reps,
    )
    total = fwd_ms + bwd_ms
    return dict(
        candidate=candidate,
        fwd_ms=round(fwd_ms, 3),
        bwd_ms=round(bwd_ms, 3),
        tflops=round(8 * n * d * v / (total / 1e3) / 1e12, 1),
        time_vs_naive=round(total / naive_ms, 3),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-shapes", action="store_true", help="all three LM-head widths, not only D = 4,096")
    parser.add_argument("--tokens", type=int, default=HEAD_TOKENS)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_fused_logprob_tiles.py: needs a CUDA GPU (the tiles are chosen by GPU time)", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for shape in SHAPES if args.all_shapes else ["Llama-3.1-8B"]:
        result = sweep(shape, args.tokens, args.reps)
        print(f"\n{shape}: N={result['n']} D={result['d']} V={result['v']}, naive {result['naive_ms']} ms")
        print(f"{'BM,BN,BK,warps,stages':>24} {'fwd ms':>8} {'bwd ms':>8} {'TFLOP/s':>8} {'vs naive':>8}")
        for r in result["rows"]:
            cand = ",".join(map(str, r["candidate"]))
            if "error" in r:
                print(f"{cand:>24} failed: {r['error']}")
            else:
                print(f"{cand:>24} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['tflops']:8.1f} {r['time_vs_naive']:8.3f}")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
