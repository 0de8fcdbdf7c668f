"""One SCoRe training step, ours vs the naive peer, timed by phase, same model/batch/run (CPU).

    pytest bench/bench_train_step.py --benchmark-only -q -s        # or: python bench/bench_train_step.py

Peer: what public SCoRe reproductions do — HF transformers `generate()` for both
attempts, then `model(ids).logits` -> `log_softmax` -> `gather` for reference and policy. Ours: the
engine (paged KV, attempt 2 reuses attempt 1's cache), packed forwards, fused log-probs of attempt
tokens only. Each variant runs in a fresh interpreter (bench/train_step_worker.py) so peak RSS is
its own. Model: Llama-style, hidden 256, 4 layers, vocab 32768 (the lm head is where logits
cost memory); batch: 8 prompts x k=4, prompt 64 tokens, attempts 48 + 48 tokens, instruction 24.
Targets (issue 5): >= 2x faster per step, <= 0.5x peak memory.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(prompts=8, k=4, prompt_len=64, t1=48, t2=48, instr_len=24)
MODEL = dict(
    vocab_size=32768,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
if os.environ.get("SCORE_BENCH_SMOKE") == "1":  # pytest bench/ --benchmark-disable (bench/conftest.py)
    SHAPE = dict(prompts=2, k=2, prompt_len=16, t1=8, t2=8, instr_len=8)
    MODEL.update(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def build_model(path: Path) -> Path:
    from score.model import ModelConfig, Transformer, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig(**MODEL)), path)  # no eos: every attempt has its full length
    return path


def run_worker(variant: str, model_dir: Path, shape: dict = SHAPE) -> dict:
    args = [sys.executable, str(HERE / "train_step_worker.py"), variant, str(model_dir)]
    args += [str(shape[k]) for k in ("prompts", "k", "prompt_len", "t1", "t2", "instr_len")]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        ours, naive = run_worker("ours", model_dir), run_worker("naive", model_dir)
    return {
        "ours": ours,
        "naive": naive,
        "speedup": naive["seconds"]["total"] / ours["seconds"]["total"],
        "memory_ratio": ours["peak_rss_above_start"] / naive["peak_rss_above_start"],
    }


def report(result: dict) -> str:
    phases = list(result["ours"]["seconds"])
    lines = ["| phase | ours (s) | naive (s) | naive / ours |", "|---|---|---|---|"]
    for p in phases:
        a, b = result["ours"]["seconds"][p], result["naive"]["seconds"][p]
        lines.append(f"| {p} | {a:.3f} | {b:.3f} | {b / a:.2f}x |" if a > 0 else f"| {p} | {a:.3f} | {b:.3f} | - |")
    mo, mn = result["ours"]["peak_rss_above_start"] / 2**20, result["naive"]["peak_rss_above_start"] / 2**20
    lines.append(f"| peak RSS above start (MiB) | {mo:.0f} | {mn:.0f} | ours/naive = {mo / mn:.2f} |")
    return "\n".join(lines)


@pytest.mark.benchmark(group="train_step")
def test_train_step_vs_naive(benchmark):
    pytest.importorskip("transformers")
    result = benchmark.pedantic(compare, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "speedup": result["speedup"],
            "memory_ratio": result["memory_ratio"],
            "ours": result["ours"],
            "naive": result["naive"],
        }
    )
    print("\n" + report(result))


if __name__ == "__main__":
    res = compare()
    print(report(res))
    print(json.dumps({"speedup": res["speedup"], "memory_ratio": res["memory_ratio"]}))
