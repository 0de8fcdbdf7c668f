"""The shipped GPU configs, run on the CPU: `score train`, `score sft` and `score eval` with
configs/math_qwen2.5_1.5b.toml and configs/code_mbpp_humaneval.toml as written, only the model
swapped for tiny random Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k-norm, GQA) checkpoints and the
sizes shrunk (token budgets, batch sizes, steps, one layer, short prompts), with
`model.kernels = "triton"` (Triton's interpreter) and `model.autocast = "bf16"` (torch's CPU
autocast): what a GPU runs, dtype for dtype, on every kernel path. The same through two FSDP2 ranks
(gloo).

The interpreter runs a Python call per program, so this tier takes minutes and is not part of
`pytest -q`: `pytest -m gpu_path` runs it (`.ci/run` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from score.model import load_tokenizer
from score.rl import sft as sft_module
from score.rl.cli import main
from tests.helpers.model_fixtures import CORPUS, make_chat_tokenizer, make_hf_checkpoint
from tests.helpers.tiny_run import ParityReward

pytestmark = pytest.mark.gpu_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MATH_CONFIG = ["--config", str(CONFIGS / "math_qwen2.5_1.5b.toml")]
# family -> (model_fixtures variant, chat template style)
FAMILIES = {"llama": ("llama", "llama3"), "qwen2": ("qwen2_gqa_bias_tied", "qwen"), "qwen3": ("qwen3_tied", "qwen")}
MATH = [("What is 2+3?", "5"), ("What is 7-4?", "3"), ("What is 3*3?", "9"), ("What is 8/2?", "4")]
# what the chat templates and the code prompts add around a question
TEMPLATE_TEXTS = [
    "system\nYou are a helpful assistant.\nuser\nProblem:\nassistant\n",
    "system\n\nCutting Knowledge Date: December 2023\nToday Date: 2026\n\nuser\n\nProblem:\nassistant\n\n",
    "Fix any error.",
]
MBPP = [
    {"task_id": 1, "text": "Write a function add(a, b) that returns a + b.", "test_list": ["assert add(1, 2) == 3"]},
    {"task_id": 2, "text": "Write a function neg(a) that returns -a.", "test_list": ["assert neg(2) == -2"]},
]


def tiny_checkpoint(path: Path, family: str) -> Path:
    """A one-layer random-weight HF checkpoint stored in bf16 (as Qwen2.5 ships), with a chat tokenizer
    whose merges cover the chat template's text and the prompts: sequences of tens of tokens."""
    variant, style = FAMILIES[family]
    tokenizer = dict(
        corpus=[*CORPUS, *TEMPLATE_TEXTS, *(q for q, _ in MATH), *(p["text"] for p in MBPP)], vocab_size=800
    )
    make_chat_tokenizer(path, style, **tokenizer)
    vocab = load_tokenizer(path).vocab_size  # the model samples no id the tokenizer cannot decode
    make_hf_checkpoint(
        path, variant, vocab_size=vocab, num_hidden_layers=1, max_position_embeddings=4096, save_dtype=torch.bfloat16
    )
    make_chat_tokenizer(path, style, **tokenizer)  # its generation_config.json (EOS ids) over transformers'
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shrunk(model: Path, train: Path, evals: Path, **extra) -> list[str]:
    """--set overrides that keep a shipped config as written but for the model, the data, the sizes
    and the GPU path's two switches."""
    keys = {
        "model.path": f'"{model}"',
        "model.device": '"cpu"',
        "model.kernels": '"triton"',
        "model.autocast": '"bf16"',
        "data.train": f'"{train}"',
        "data.eval": f'"{evals}"',
        "rollout.samples_per_prompt": 2,
        "rollout.max_tokens_attempt1": 6,
        "rollout.max_tokens_attempt2": 6,
        "rollout.max_num_seqs": 8,
        # the interpreter runs a program per token and head block: short prompts keep it to minutes
        "prompt.system_prompt": '""',
        "prompt.correction_instruction": '"Fix any error."',
        "score.stage1_steps": 1,
        "score.stage2_steps": 1,
        "optim.prompts_per_step": 1,
        "optim.prompts_per_micro_batch": 1,
        "reward.workers": 1,
        "run.eval_max_tokens": 6,
        "run.eval_max_problems": 1,
        "run.checkpoint_every": 1,
        "run.progress": "false",
        "run.plots": "false",
        **extra,
    }
    return [arg for key, value in keys.items() for arg in ("--set", f"{key}={value}")]


def dtypes_in(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def math_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("math_data")
    rows = [{"problem": q, "solution": f"So the answer is $\\boxed{{{a}}}$."} for q, a in MATH]
    return write_jsonl(root / "train.jsonl", rows), write_jsonl(root / "eval.jsonl", rows[:2])


@pytest.mark.parametrize("family", FAMILIES)
def test_math_config_trains_on_the_gpu_path(family, tmp_path, math_data):
    """Two SCoRe steps (Stage I, Stage II) and the end-of-run evaluation."""
    model = tiny_checkpoint(tmp_path / "model", family)
    run = tmp_path / "train"
    assert main(["train", *MATH_CONFIG, "--out", str(run), *shrunk(model, *math_data)]) == 0
    steps = metrics(run)
    assert [m["stage"] for m in steps] == [1, 2] and not any(m["skipped"] for m in steps)
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"], m["kl_1"]])).all() for m in steps)
    # checkpoints keep the fp32 masters; final/ takes the dtype the model came in
    (checkpoint,) = sorted((run / "checkpoints").iterdir())[-1:]
    assert dtypes_in(checkpoint / "model") == {"F32"}
    assert dtypes_in(run / "final") == {"BF16"}
    assert json.loads((run / "eval_metrics.json").read_text())["n"] == 1


def test_math_config_sft_round_then_eval_on_the_gpu_path(tmp_path, math_data, monkeypatch):
    # a random model never answers MATH right, and STaR trains only on right answers: a reward it can
    # earn (even-length answers), so the round has traces to train on
    monkeypatch.setattr(sft_module, "make_reward", lambda cfg: ParityReward())
    model = tiny_checkpoint(tmp_path / "model", "qwen2")
    train, evals = math_data
    sft = tmp_path / "sft"
    sets = shrunk(model, train, "", **{"sft.iterations": 1, "sft.batch_size": 2, "sft.micro_batch_size": 2})
    assert main(["sft", *MATH_CONFIG, "--out", str(sft), *sets]) == 0
    (round0,) = json.loads((sft / "sft_data.json").read_text())["rounds"]
    assert round0["sampled"] == len(MATH) * 2 and round0["steps"] > 0
    assert dtypes_in(sft / "final") == {"BF16"}
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(sft / "final"), "--data", str(evals), *MATH_CONFIG, "--out", str(out)]
    assert main([*argv, *shrunk(model, train, evals)]) == 0
    assert json.loads((out / "eval_metrics.json").read_text())["n"] == 2  # --data: every problem


def test_code_config_trains_and_evaluates_on_the_gpu_path(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", "llama")
    train = write_jsonl(tmp_path / "mbpp.jsonl", MBPP)
    config = ["--config", str(CONFIGS / "code_mbpp_humaneval.toml")]
    sets = shrunk(model, train, train)  # HumanEval's prompts are hundreds of tokens: MBPP's, one problem
    run = tmp_path / "train"
    assert main(["train", *config, "--out", str(run), *sets]) == 0
    assert [m["stage"] for m in metrics(run)] == [1, 2]
    assert json.loads((run / "eval_metrics.json").read_text())["n"] == 1
    assert dtypes_in(run / "final") == {"BF16"}


def test_math_config_on_two_fsdp2_ranks(tmp_path, math_data):
    model = tiny_checkpoint(tmp_path / "model", "qwen3")
    train, evals = math_data
    command = [sys.executable, "-m", "score.rl.cli", "train", *MATH_CONFIG]
    sets = shrunk(model, train, evals, **{"optim.prompts_per_step": 2})  # one prompt group per rank
    command += ["--nproc", "2", "--out", str(tmp_path / "run"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    assert [m["stage"] for m in metrics(run)] == [1, 2] and not any(m["skipped"] for m in metrics(run))
    assert dtypes_in(run / "final") == {"BF16"}
    assert json.loads((run / "eval_metrics.json").read_text())["n"] == 1
