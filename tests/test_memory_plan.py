"""The memory plan's numbers against memory measured on CPU, and the printed table.

tests/helpers/memory_probe.py runs in a fresh process with glibc told to mmap every allocation of 64 KiB
or more and to give freed memory back at once, so anonymous RSS follows the live tensors (file-backed
pages, the libraries' code, come and go as the kernel reclaims them): each component's growth is
compared with the plan (compute dtype fp32 = 4 bytes on CPU, one rank, so FSDP's gathered working
set is not part of the measurement; 2-rank sharding itself is tested in test_distributed.py).

Tolerances: weights, gradients, AdamW state and the reference within 5% (they are exact byte
counts plus allocator rounding); the activation peak of a forward+backward within 15% (the plan
models saved tensors and backward's largest transient, not every short-lived temporary).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from score.model import ModelConfig
from score.rl.parallel import memory_plan as M

PROBE = Path(__file__).resolve().parent / "helpers" / "memory_probe.py"
CONFIG = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
TOKENS = 2048


def _measure(checkpointing: bool) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(CONFIG), str(TOKENS), "1" if checkpointing else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_plan_matches_measured_cpu_memory(checkpointing):
    measured = _measure(checkpointing)
    sizes = M.TrainingSizes(micro_batch_tokens=TOKENS - 1, compute_bytes=4, activation_checkpointing=checkpointing)
    planned = M.plan(ModelConfig(**CONFIG), 1, sizes).bytes
    rows = []
    for part in ("policy", "grads", "adam", "reference"):
        rows.append((part, planned[part], measured[part], 0.05))
    peak = planned["activations"] + planned["backward_peak"]
    rows.append(("activations+backward", peak, measured["activations"], 0.15))
    for part, want, got, _ in rows:
        print(f"{part:22s} plan {want / 2**20:8.1f} MiB  measured {got / 2**20:8.1f} MiB  ({got / want - 1:+.1%})")
    for part, want, got, tol in rows:
        assert abs(got / want - 1) <= tol, f"{part}: plan {want} bytes, measured {got} (tolerance {tol:.0%})"


def test_table_covers_models_and_world_sizes():
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        assert M.main([]) == 0
    finally:
        sys.stdout = sys_stdout
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| ") and "B |" in line]
    assert len(rows) == len(M.MODELS) * len(M.WORLD_SIZES)
    counts = {name: M.param_counts(cfg).total for name, cfg in M.MODELS.items()}
    # published parameter counts of these checkpoints
    assert counts["Qwen2.5-0.5B"] == 494_032_768 and counts["Qwen2.5-7B"] == 7_615_616_512
    assert counts["Llama-3.1-8B"] == 8_030_261_248


def test_sharded_parts_scale_with_world_size():
    cfg = M.MODELS["Qwen2.5-7B"]
    one, eight = M.plan(cfg, 1), M.plan(cfg, 8)
    for part in ("policy", "grads", "adam", "reference"):
        assert one.bytes[part] == pytest.approx(8 * eight.bytes[part], rel=1e-6)
    for part in ("kv_cache", "gathered_for_rollout", "fsdp_working_set", "activations", "backward_peak"):
        assert one.bytes[part] == eight.bytes[part]
    assert not one.fits and eight.fits
    assert M.plan(cfg, 8, M.TrainingSizes(reference_offload=True)).bytes["reference"] == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="world_size"):
        M.plan(M.MODELS["Qwen2.5-0.5B"], 0)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        M.TrainingSizes(micro_batch_tokens=0)
    with pytest.raises(ValueError, match="compute_bytes"):
        M.TrainingSizes(compute_bytes=3)


def test_plan_for_a_run_config(tmp_path, capsys):
    from score.rl.config import to_toml
    from tests.helpers.tiny_run import tiny_config

    cfg = tiny_config(
        tmp_path,
        optim__prompts_per_step=8,
        optim__prompts_per_micro_batch=2,
        rollout__max_tokens_attempt1=100,
        rollout__max_tokens_attempt2=50,
    )
    one, two = (M.sizes_for_run(cfg, w, prompt_tokens=30) for w in (1, 2))
    assert one.max_model_len == 180 and one.micro_batch_tokens == 2 * 2 * 180
    assert (one.rollout_seqs, two.rollout_seqs) == (16, 8)  # each rank rolls out its share only
    # a token budget: only a group (k x 180 tokens) longer than it passes it, never a rank's share
    for budget, want in ((1000, 1000), (100, 2 * 180), (10**6, 8 * 2 * 180)):
        cfg.optim.tokens_per_micro_batch = budget
        assert M.sizes_for_run(cfg, 1, prompt_tokens=30).micro_batch_tokens == want
    cfg.optim.tokens_per_micro_batch = 0
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    assert M.main(["--config", str(config), "--nproc", "1", "2", "--prompt-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert "1 GPU(s): " in out and "2 GPU(s): " in out and "KV pool 8 seqs x 180 tokens" in out
    assert sum(line.startswith(f"| {cfg.model.path} |") for line in out.splitlines()) == 2


def test_the_engines_memory_is_held_for_the_rollout_only():
    """The trainer puts its engines to sleep before the backward pass: the KV pool and the stacked
    q/k/v copy count in the rollout phase, beside the gathered weights, not in the resident part."""
    cfg = M.MODELS["Qwen2.5-0.5B"]
    counts = M.param_counts(cfg)
    # 24 layers of q (896 x 896), k and v (128 x 896 each), all with biases
    assert counts.qkv == 24 * (896 * (896 + 2 * 128) + 896 + 2 * 128)
    one, two = M.plan(cfg, 1), M.plan(cfg, 2)
    b = one.bytes
    assert one.resident == b["policy"] + b["grads"] + b["adam"] + b["reference"]
    assert one.rollout_extra == b["gathered_for_rollout"] + b["kv_cache"] + b["qkv_copies"]
    assert one.peak == one.resident + max(one.rollout_extra, one.train_extra)
    assert b["qkv_copies"] == 2 * counts.qkv and two.bytes["qkv_copies"] == 0  # FSDP2's engines keep none
    # base-model rollouts: the reference is gathered too, and its engine has its own pool and copy
    mixed = M.plan(cfg, 1, M.TrainingSizes(reference_rollouts=True)).bytes
    for part in ("gathered_for_rollout", "kv_cache", "qkv_copies"):
        assert mixed[part] == 2 * b[part]
    # the KV that fits is what the rollout phase leaves, per engine
    rest = one.usable - one.resident - b["gathered_for_rollout"] - b["qkv_copies"]
    assert one.kv_tokens_that_fit == rest // b["kv_per_token"]
