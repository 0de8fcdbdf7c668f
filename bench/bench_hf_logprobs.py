"""score.kernels.hf.token_logprobs against log_softmax of the full logits, on a transformers model.

    pytest bench/bench_hf_logprobs.py --benchmark-only -s

The job of a PPO/GRPO trainer built on transformers: per-token log-probs of given targets, forward
and backward. Peer, in the same run: `log_softmax(model(ids).logits.float(), -1).gather(targets)`,
which materialises [tokens, vocab] logits (and their log-softmax and gradients). Model: a random
Qwen2-architecture model with Qwen2.5-0.5B's head (hidden 896, vocab 151,936, tied), 2 layers on CPU
(fp32, 4 x 512 tokens), all 24 on GPU (bf16, 8 x 1,024 tokens). Each variant runs in a fresh process
(bench/hf_logprobs_worker.py); reported: the memory one step adds on top of the model, its inputs and
its gradients (peak RSS on CPU, max_memory_allocated on GPU), the time of one step, and the ratios
token_logprobs / log_softmax. Results: bench/RESULTS.md.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_logprobs_worker.py")
VOCAB, HIDDEN = 151936, 896
LAYERS, BATCH, SEQ, DTYPE = (24, 8, 1024, "bf16") if CUDA else (2, 4, 512, "fp32")
SMOKE = os.environ.get("SCORE_BENCH_SMOKE") == "1"
if SMOKE:  # pytest bench/ --benchmark-disable (bench/conftest.py)
    VOCAB, LAYERS, BATCH, SEQ = 4099, 1, 1, 32
VARIANTS = ("token_logprobs", "log_softmax")


def run_worker(variant: str) -> dict:
    args = [WORKER, variant, *map(str, (VOCAB, HIDDEN, LAYERS, BATCH, SEQ)), "cuda" if CUDA else "cpu", DTYPE]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_token_logprobs_vs_log_softmax_of_full_logits(benchmark):
    runs = {}

    def measure():
        for variant in VARIANTS:
            runs[variant] = run_worker(variant)

    benchmark.group = f"token log-probs, transformers model, V={VOCAB} D={HIDDEN} {BATCH}x{SEQ} tokens {DTYPE}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    ours, peer = runs["token_logprobs"], runs["log_softmax"]
    info = {
        "memory_kind": ours["memory_kind"],
        "token_logprobs_step_peak_GiB": ours["step_peak_bytes"] / 2**30,
        "log_softmax_step_peak_GiB": peer["step_peak_bytes"] / 2**30,
        "step_peak_ratio": ours["step_peak_bytes"] / peer["step_peak_bytes"],
        "total_peak_ratio": ours["peak_bytes"] / peer["peak_bytes"],
        "token_logprobs_seconds": ours["seconds"],
        "log_softmax_seconds": peer["seconds"],
        "time_ratio": ours["seconds"] / peer["seconds"],
    }
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    if not SMOKE:  # at smoke sizes the logits are a few MiB, within the RSS's noise
        assert ours["step_peak_bytes"] < peer["step_peak_bytes"]
