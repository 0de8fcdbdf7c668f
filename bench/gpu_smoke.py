"""A user's first minute on a GPU: `score train` for one step and `score eval` of a tiny model, with
every precision and kernel key at its default (bf16 autocast over fp32 master weights, the Triton
kernels, bf16 rollouts with CUDA graphs on CUDA).

    python bench/gpu_smoke.py --out DIR        # the first check of `bash bench/gpu_checks.sh`

On a machine without CUDA it runs the same commands on the CPU path (what `gpu_checks.sh --dry-run`
does). The model is the demo's tiny decoder with random weights, the data the demo's task: nothing
is downloaded, and the reward needs no package the GPU image may lack.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from score.model import save_pretrained
from score.rl.demo import task as demo_task
from score.rl.demo.base_model import build_model, build_tokenizer
from score.rl.demo.settings import QUICK


def write_problems(path: Path, n: int, split: str) -> Path:
    rows = ({"id": p.id, "problem": p.question, "answer": p.answer} for p in demo_task.problems(n, split, 0))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(out: Path) -> Path:
    """Every key at its default but the model, the data and the sizes of a one-minute run."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(300, 0)
    save_pretrained(build_model(tokenizer, QUICK), out / "model")
    tokenizer.save_pretrained(out / "model")
    train, evals = write_problems(out / "train.jsonl", 64, "train"), write_problems(out / "eval.jsonl", 16, "eval")
    path = out / "smoke.toml"
    path.write_text(
        f"""[model]
path = "{out / "model"}"

[data]
train = "{train}"
eval = "{evals}"
question_key = "problem"
answer_key = "answer"
id_key = "id"

[prompt]
chat = false
system_prompt = ""
correction_instruction = "There might be an error in the solution above. Please correct it."

[reward]
kind = "exact"

[rollout]
max_tokens_attempt1 = 8
max_tokens_attempt2 = 16
max_num_seqs = 64

[optim]
prompts_per_step = 16
prompts_per_micro_batch = 8

[run]
checkpoint_every = 0
plots = false
progress = false
"""
    )
    return path


def run(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "score.rl.cli", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(done.stdout[-2000:], end="")
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"gpu_smoke: `score {' '.join(command[:1])}` failed (exit {done.returncode})")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_out/smoke", help="folder for the model, data and runs")
    out = Path(parser.parse_args(argv).out)
    for earlier in ("model", "train", "eval"):  # a fresh start each time, in this script's own folders
        shutil.rmtree(out / earlier, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    train = run(["train", "--config", str(cfg), "--out", str(out / "train"), "--max-steps", "1"])
    step = json.loads((out / "train" / "metrics.jsonl").read_text().splitlines()[0])
    evaluate = run(
        ["eval", "--model", str(out / "train" / "final"), "--data", str(out / "eval.jsonl"), "--config", str(cfg)]
        + ["--out", str(out / "eval")]
    )
    print(
        f"gpu_smoke on {device}: score train 1 step {train:.1f} s (rollout {step['rollout_s']:.2f} s, train "
        f"{step['train_s']:.2f} s, loss {step['loss']:.4f}), score eval {evaluate:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
