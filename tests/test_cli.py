"""The `score` CLI: train (describe, overrides, max-steps, resume), eval outputs, and input errors."""

import json

from score.rl.cli import main
from score.rl.config import to_toml
from tests.helpers.tiny_run import tiny_config, write_problems


def write_config(tmp_path, **overrides):
    cfg = tiny_config(tmp_path, **overrides)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    return path


def test_describe_lists_every_section(capsys):
    assert main(["train", "--describe"]) == 0
    out = capsys.readouterr().out
    for section in ("[model]", "[data]", "[prompt]", "[reward]", "[rollout]", "[score]", "[optim]", "[run]"):
        assert section in out


def test_train_max_steps_then_resume(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    assert (
        main(
            ["train", "--config", str(config), "--out", str(out), "--max-steps", "1", "--set", "run.checkpoint_every=1"]
        )
        == 0
    )
    assert len(open(out / "metrics.jsonl").readlines()) == 1
    assert (out / "final" / "config.json").exists()
    assert main(["train", "--config", str(config), "--out", str(out), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2  # a finished run needs --resume
    assert "--resume" in capsys.readouterr().err


def test_eval_writes_per_problem_records_and_table(tmp_path, capsys):
    config = write_config(tmp_path)
    data = write_problems(tmp_path / "eval.jsonl", 5, split="eval")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "base"),
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                str(config),
                "--max-problems",
                "3",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert len(records) == 3
    for r in records:
        assert {"id", "attempt1", "attempt2", "r1", "r2"} <= set(r)
    metrics = json.load(open(out / "eval_metrics.json"))
    assert metrics["n"] == 3 and abs(metrics["delta"] - (metrics["delta_i2c"] - metrics["delta_c2i"])) < 1e-12
    assert "Acc@t1" in capsys.readouterr().out


def test_bad_config_and_bad_data_exit_2_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 1e-3\nwarmup = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "optim.warmup" in err

    config = write_config(tmp_path)
    data = tmp_path / "broken.jsonl"
    data.write_text('{"id": "a", "problem": "1+2+3", "answer": "6"}\nnot json\n')
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "base"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "e"),
                "--config",
                str(config),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(data) in err and "line 2" in err
