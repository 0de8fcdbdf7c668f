"""Meeting users where they are, offline: models by Hub id from a local Hub cache, data from Parquet
and `datasets`, Weights & Biases in offline mode, and progress that reads well in a log file."""

import io
import json
import shutil

import pytest

from score.model.hub import resolve_model_path
from score.rl.cli import main
from score.rl.config import config_from_dict, to_toml
from score.rl.data import load_jsonl, parse_hf_source
from score.rl.factories import load_problems
from score.rl.progress import LineProgress
from tests.helpers.tiny_run import make_base, tiny_config, write_problems

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding `org/tiny` at COMMIT (refs/main), offline."""
    import huggingface_hub.constants as constants

    _, _, base = make_base(tmp_path / "made")
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(base, repo / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots" / COMMIT


# ---- models by Hub id ----------------------------------------------------------------------


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache, tmp_path):
    assert resolve_model_path("org/tiny") == str(hub_cache)
    assert resolve_model_path(f"org/tiny@{COMMIT}") == str(hub_cache)
    assert resolve_model_path(str(hub_cache)) == str(hub_cache)  # a folder is itself
    offline = "'org/other': no folder .*; as a Hub id, HF_HUB_OFFLINE is set and it is not in the Hub cache"
    with pytest.raises(ValueError, match=offline):
        resolve_model_path("org/other")
    with pytest.raises(ValueError, match="no folder .*, and not a Hub id"):
        resolve_model_path(str(tmp_path / "missing" / "deeper" / "x"))


def test_train_and_eval_take_a_hub_id_and_record_the_snapshot(hub_cache, tmp_path, capsys):
    cfg = tiny_config(tmp_path, score__stage1_steps=1, score__stage2_steps=1)
    cfg.model.path = "org/tiny@" + COMMIT
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"] == {"requested": "org/tiny@" + COMMIT, "path": str(hub_cache)}
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    args = ["eval", "--model", "org/tiny", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "e")]
    assert main([*args, "--quiet"]) == 0
    assert json.loads((tmp_path / "e" / "eval_metrics.json").read_text())["n"] == 3


# ---- datasets ------------------------------------------------------------------------------


def data_config(**data):
    return config_from_dict({"data": {"question_key": "problem", "answer_key": "answer", "id_key": "id", **data}})


def test_parquet_files_and_folders_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_problems(tmp_path / "p.jsonl", 6)
    rows = [json.loads(line) for line in open(jsonl)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), folder / "b.parquet")
    expected = load_jsonl(jsonl, question_key="problem", answer_key="answer", id_key="id")
    cfg = data_config()
    assert load_problems(cfg, str(tmp_path / "all.parquet")) == expected
    assert load_problems(cfg, str(folder)) == expected
    pq.write_table(pa.Table.from_pylist([{"id": "x", "problem": "q"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet row 0: .*answer"):
        load_problems(cfg, str(tmp_path / "bad.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="fake.parquet: not a readable Parquet file"):
        load_problems(cfg, str(tmp_path / "fake.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "c.parquet")
    with pytest.raises(ValueError, match="c.parquet row 0: duplicate problem id"):
        load_problems(cfg, str(folder))


def test_a_saved_datasets_dataset_loads_offline_by_split(tmp_path):
    import datasets

    rows = [json.loads(line) for line in open(write_problems(tmp_path / "p.jsonl", 5))]
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(saved))
    cfg = data_config()
    train = load_problems(cfg, f"hf:{saved}")
    test = load_problems(cfg, f"hf:{saved}@test")
    assert [p.id for p in train] == [r["id"] for r in rows[:3]] and [p.id for p in test] == [r["id"] for r in rows[3:]]
    assert test[0].where == f"{saved}[test] row 0"
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_problems(cfg, f"hf:{saved}@validation")
    assert parse_hf_source("hf:hendrycks/competition_math:all@test") == ("hendrycks/competition_math", "all", "test")
    assert parse_hf_source("hf:org/name") == ("org/name", None, "train")


# ---- Weights & Biases ----------------------------------------------------------------------


def test_wandb_offline_gets_every_metric_the_config_and_the_eval(tmp_path, monkeypatch):
    from tests.helpers.wandb_records import history_config_summary, offline_run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path)
    cfg.data.eval = str(write_problems(tmp_path / "eval.jsonl", 3, "eval"))
    cfg.run.wandb, cfg.run.wandb_project = True, "tests"
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    run_file = offline_run_file(out)
    history, config_values, summary = history_config_summary(run_file)
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [int(h["_step"]) for h in history] == [r["step"] for r in logged]
    for row, record in zip(history, logged, strict=True):
        for key in ("loss", "reward_1", "reward_2", "kl_1", "stage"):
            assert json.loads(row[key]) == pytest.approx(record[key])
    assert json.loads(config_values["optim"])["lr"] == cfg.optim.lr
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert json.loads(summary["eval/acc_t2"]) == pytest.approx(metrics["acc_t2"])
    assert (out / "wandb_id").read_text().strip() in run_file.name


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_config(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--set", "run.wandb=true"]) == 2
    assert "pip install 'score-rl[wandb]'" in capsys.readouterr().err


# ---- logs that read well -------------------------------------------------------------------


def test_progress_in_a_log_is_a_few_lines_with_the_key_numbers():
    stream = io.StringIO()
    bar = LineProgress(1000, "SCoRe", "step", stream=stream)
    for step in range(1000):
        bar.set_postfix(stage=1 + step // 500, r1="0.25")
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "SCoRe: 0/1000 steps"
    assert 10 <= len(lines) <= 12  # one per 10 %, no redraws
    assert lines[-1].startswith("SCoRe: 1000/1000 steps") and "stage 2, r1 0.25" in lines[-1]


def test_score_train_in_a_log_file_writes_lines_not_bar_redraws(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg.run.progress = True
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "SCoRe: 0/4 steps" in err and "SCoRe: 4/4 steps" in err
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "SCoRe:" not in capsys.readouterr().err


# ---- the MATH recipe -----------------------------------------------------------------------


def math_rows(prefix, n):
    return [
        {"problem": f"{prefix} problem {i}?", "solution": f"so \\boxed{{{i}}}", "level": "Level 1"} for i in range(n)
    ]


def test_score_data_math_writes_the_papers_splits(tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test = math_rows("train", 5), math_rows("test", 6)
    # MATH500 is a subset of the test set; its text may differ in whitespace
    math500 = [dict(test[i], problem="  " + test[i]["problem"].replace(" ", "  "), answer=str(i)) for i in (1, 3, 4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    pq.write_table(pa.Table.from_pylist(test), tmp_path / "test.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(math500)}).save_to_disk(str(tmp_path / "m500"))
    args = ["data", "math", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.parquet")]
    assert main([*args, "--math500", f"hf:{tmp_path / 'm500'}", "--out", str(tmp_path / "data")]) == 0
    assert "MATH500: 3 of 3 found in the test set; training: 5 train + 3 test = 8 problems" in capsys.readouterr().out
    written = [json.loads(line) for line in open(tmp_path / "data" / "math_train.jsonl")]
    assert [r["problem"] for r in written] == [r["problem"] for r in train] + [test[i]["problem"] for i in (0, 2, 5)]
    held = [json.loads(line) for line in open(tmp_path / "data" / "math500.jsonl")]
    assert [r["answer"] for r in held] == ["1", "3", "4"]
    # the written files are what configs/math_qwen2.5_1.5b.toml reads
    cfg = config_from_dict({"data": {"question_key": "problem", "solution_key": "solution"}})
    assert len(load_problems(cfg, str(tmp_path / "data" / "math_train.jsonl"))) == 8

    stray = math500 + [dict(test[0], problem="not in MATH at all")]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(stray)}).save_to_disk(str(tmp_path / "m500b"))
    assert main([*args, "--math500", f"hf:{tmp_path / 'm500b'}", "--out", str(tmp_path / "d2")]) == 2
    assert "1 of 4 MATH500 problems are not in" in capsys.readouterr().err
