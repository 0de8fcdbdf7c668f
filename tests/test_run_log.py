"""Metrics JSONL logging (flattening, resume truncation, torn lines), TensorBoard gating, PNG plots."""

import builtins
import json
import math

import numpy as np
import pytest
import torch

from score.rl.plots import plot_run
from score.rl.run_log import MetricsLogger, read_metrics


def test_log_writes_one_flushed_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(
        0,
        {
            "loss": torch.tensor(0.5),
            "acc_t1": np.float32(0.25),
            "n": np.int64(3),
            "stage": 1,
            "skipped": np.bool_(False),
            "note": None,
            "eval": {"acc_t2": 0.75},
        },
    )
    logger.log(1, {"loss": float("nan")})
    # Readable before close: every line is flushed as it is logged.
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    first = {k: v for k, v in records[0].items() if k != "time"}
    assert first == {
        "step": 0,
        "loss": 0.5,
        "acc_t1": 0.25,
        "n": 3,
        "stage": 1,
        "skipped": False,
        "note": None,
        "eval/acc_t2": 0.75,
    }
    assert math.isnan(records[1]["loss"])
    logger.close()


@pytest.mark.parametrize(
    "step, metrics, message",
    [
        (-1, {}, "step must be an int >= 0"),
        (0, {"x": [1, 2]}, "metric 'x' must be a number, string, bool or None, got list"),
        (0, {"step": 1}, "reserved"),
        (0, {3: 1.0}, "metric names must be non-empty strings"),
    ],
)
def test_bad_records(tmp_path, step, metrics, message):
    with MetricsLogger(tmp_path) as logger, pytest.raises(ValueError, match=message):
        logger.log(step, metrics)


def test_resume_drops_steps_after_the_checkpoint_and_torn_lines(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(5):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    with MetricsLogger(tmp_path, resume_step=2) as logger:
        logger.log(3, {"loss": 30.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: invalid JSON"):
        read_metrics(tmp_path / "bad.jsonl")


def test_tensorboard_without_the_package_says_so(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


def test_plot_run_writes_pngs(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(6):
            logger.log(
                step,
                {
                    "train/acc_t1": 0.3 + 0.01 * step,
                    "train/acc_t2": 0.35 + 0.02 * step,
                    "train/delta": 0.05 + 0.01 * step,
                    "reward_1": 0.3,
                    "reward_2": 0.4,
                    "kl_1": 0.01 * step,
                    "kl_2": 0.02 * step,
                },
            )
        logger.log(
            6,
            {"eval/acc_t1": 0.4, "eval/acc_t2": 0.5, "eval/delta": 0.1, "eval/delta_i2c": 0.15, "eval/delta_c2i": 0.05},
        )
    paths = plot_run(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "reward_kl.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "reward_kl.png"]


def test_plot_run_names_what_it_found(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 0, "time": 1.0, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"found \['loss'\]"):
        plot_run(tmp_path / "m.jsonl", tmp_path)
    (tmp_path / "only_kl.jsonl").write_text(json.dumps({"step": 0, "kl_1": 1.0}) + "\n")
    assert [p.name for p in plot_run(tmp_path / "only_kl.jsonl", tmp_path)] == ["reward_kl.png"]
