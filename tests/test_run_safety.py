"""A run never dead-ends: each bad input the careless or hostile user tried is one line naming its
cause (exit 2) before any work, each crash state resumes, and nothing wrong ends with exit 0."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from score.model.files import commit_folder, temp_folder
from score.rl.checkpoints import latest_checkpoint, list_checkpoints
from score.rl.cli import main
from score.rl.config import to_toml
from tests.helpers.tiny_run import edit_json, make_base, tiny_config, write_problems


def setup_run(tmp_path, **overrides):
    """(config file, a copy of the tiny base model) for `score train` on the tiny task."""
    base = tmp_path / "model"
    if not base.exists():
        make_base(tmp_path)
        shutil.copytree(tmp_path / "base", base)
    cfg = tiny_config(tmp_path, **overrides)
    cfg.model.path = str(base)
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    return config, base


def train(config, out, *extra):
    return main(["train", "--config", str(config), "--out", str(out), *extra])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


# ---- 1. dead ends --------------------------------------------------------------------------


def test_killed_before_the_first_checkpoint_resumes_from_scratch(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "1", "--set", "run.checkpoint_every=0") == 0
    shutil.rmtree(out / "checkpoints")  # as if killed after logging step 1, before any checkpoint
    shutil.rmtree(out / "final")
    assert train(config, out, "--resume") == 0
    assert "the run starts again from step 0" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_resave_killed_between_its_renames_keeps_the_only_complete_copy(tmp_path, monkeypatch):
    import score.model.files as files

    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2", "--set", "run.checkpoint_every=2") == 0
    step = latest_checkpoint(out, "plain")
    new = temp_folder(step)
    shutil.copytree(step, new, dirs_exist_ok=True)
    # a file system that cannot exchange, and a kill right after the old copy was set aside
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    real_replace, calls = os.replace, []

    def killed_replace(a, b):
        calls.append(b)
        real_replace(a, b)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(files.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        commit_folder(new, step)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert not step.exists()  # the only complete copy is set aside ...
    assert list_checkpoints(out, "plain") == [step]  # ... and put back when the run looks for it
    assert train(config, out, "--resume", "--set", "run.keep_last=1") == 0


def test_a_resave_exchanges_the_folders_in_one_step(tmp_path, monkeypatch):
    import score.model.files as files

    target = tmp_path / "step"
    target.mkdir()
    (target / "v").write_text("old")
    new = temp_folder(target)
    (new / "v").write_text("new")
    seen = []  # after every rename and before the delete: is some complete copy named `target`?
    real_rmtree, real_replace = shutil.rmtree, os.replace
    monkeypatch.setattr(files.shutil, "rmtree", lambda p, **kw: (seen.append(target.exists()), real_rmtree(p, **kw)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (real_replace(a, b), seen.append(target.exists())))
    commit_folder(new, target)
    monkeypatch.undo()
    assert (target / "v").read_text() == "new"
    assert seen and all(seen), seen  # target was never missing


# ---- 2. exit 0 with wrong results ----------------------------------------------------------


def test_weights_with_nan_are_an_error_for_train_and_eval(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    weights = load_file(str(base / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert train(config, tmp_path / "run") == 2
    assert "holds NaN or Inf" in error_line(capsys)
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    args = ["eval", "--model", str(base), "--data", str(data), "--config", str(config), "--out", str(tmp_path / "e")]
    assert main(args) == 2
    assert "holds NaN or Inf" in error_line(capsys)


def test_a_run_whose_every_step_is_skipped_exits_non_zero(tmp_path, capsys, monkeypatch):
    import dataclasses

    import score.rl.trainer as trainer

    config, _ = setup_run(tmp_path)
    real_loss = trainer.micro_batch_loss

    def nan_loss(*args, **kwargs):  # every step's loss is non-finite
        out, logp, entropy = real_loss(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")), logp, entropy

    monkeypatch.setattr(trainer, "micro_batch_loss", nan_loss)
    assert train(config, tmp_path / "run") == 1
    assert "every one of the 4 steps was skipped" in error_line(capsys)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"eos_token_id": "1"}, "eos_token_id must be an integer token id"),
        ({"max_position_embeddings": None}, "missing required key max_position_embeddings"),
        ({"num_key_value_heads": "2"}, "num_key_value_heads must be an integer"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
        ({"bos_token_id": 100000}, "bos_token_id 100000 is outside the vocabulary"),
    ],
)
def test_bad_config_json_fields_are_named(tmp_path, capsys, change, message):
    config, base = setup_run(tmp_path)
    edit_json(base / "config.json", **change)
    assert train(config, tmp_path / "run") == 2
    line = error_line(capsys)
    assert message in line and "config.json" in line


def test_a_tokenizer_without_its_config_is_an_error(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    assert train(config, tmp_path / "run") == 2
    assert "BOS/EOS/PAD tokens are unknown" in error_line(capsys)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_an_error(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    edit_json(base / "config.json", vocab_size=vocab - 10)
    assert train(config, tmp_path / "run") == 2
    assert f"tokenizer.json has {vocab} tokens but config.json's vocab_size is {vocab - 10}" in error_line(capsys)


# ---- 3. death mid-run ----------------------------------------------------------------------


def test_over_long_problems_are_all_named_before_the_first_step(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    train_file = tmp_path / "train.jsonl"
    lines = train_file.read_text().splitlines()
    long = json.loads(lines[3]) | {"id": "too-long", "problem": "last digit of " + "+".join(["7"] * 200)}
    lines[3] = json.dumps(long)
    lines[6] = json.dumps(long | {"id": "too-long-2"})
    train_file.write_text("\n".join(lines) + "\n")
    assert train(config, tmp_path / "run") == 2
    line = error_line(capsys)
    assert "2 of 16 problems cannot hold" in line
    assert "too-long (" in line and "train.jsonl line 4" in line and "too-long-2" in line and "line 7" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran
    assert train(config, tmp_path / "run2", "--set", "data.skip_too_long=true") == 0
    skipped = json.loads((tmp_path / "run2" / "skipped_problems.json").read_text())
    assert skipped == {"count": 2, "ids": ["too-long", "too-long-2"]}
    # score sft reads its inputs through the same setup: the same refusal, the same record of skips
    sft = ["sft", "--config", str(config), "--set", "sft.iterations=1", "--set", "sft.max_problems=0"]
    assert main([*sft, "--out", str(tmp_path / "sft")]) == 2
    assert "2 of 16 problems cannot hold" in error_line(capsys)
    # (the random model earns no reward, so its round keeps no trace: the skips are recorded before that)
    main([*sft, "--out", str(tmp_path / "sft2"), "--set", "data.skip_too_long=true"])
    assert "no round of star kept a trace" in error_line(capsys)
    assert json.loads((tmp_path / "sft2" / "skipped_problems.json").read_text()) == skipped


def test_budgets_beyond_the_models_positions_are_an_error(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    assert train(config, tmp_path / "run", "--set", "rollout.max_tokens_attempt1=100000") == 2
    assert "leave no room for a prompt in the model's max_position_embeddings = 256" in error_line(capsys)


# ---- 4. raw tracebacks ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x00\x01", b"garbage that is not a header"])
def test_a_corrupt_safetensors_file_is_named(tmp_path, capsys, content):
    config, base = setup_run(tmp_path)
    (base / "model.safetensors").write_bytes(content)
    assert train(config, tmp_path / "run") == 2
    assert "model.safetensors: not a readable safetensors file" in error_line(capsys)


def test_a_corrupt_safetensors_inside_the_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2", "--set", "run.checkpoint_every=1", "--set", "run.keep_last=3") == 0
    newest = latest_checkpoint(out, "plain")
    (newest / "model" / "model.safetensors").write_bytes(b"broken")
    capsys.readouterr()
    assert train(config, out, "--resume", "--set", "run.checkpoint_every=1", "--set", "run.keep_last=3") == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} cannot be read" in err and "falling back to step_00000001" in err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_garbled_tokenizer_json_is_named(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    (base / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert train(config, tmp_path / "run") == 2
    assert "tokenizer.json: not a valid tokenizer.json" in error_line(capsys)


def test_out_under_a_regular_file_or_read_only_is_one_line(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    commands = [
        ["train", "--config", str(config), "--out", str(blocker / "run")],
        ["eval", "--model", str(base), "--data", str(data), "--config", str(config), "--out", str(blocker / "e")],
        ["sft", "--config", str(config), "--out", str(blocker / "s")],
        ["demo", "--quick", "--out", str(blocker / "d")],
    ]
    for args in commands:
        assert main(args) == 2
        assert "cannot write there" in error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert train(config, locked / "run") == 2
        assert "cannot write there" in error_line(capsys)


def test_disk_full_during_a_write_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import score.rl.trainer as trainer

    config, _ = setup_run(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(trainer.Trainer, "save", full)
    assert train(config, tmp_path / "run") == 2
    assert "No space left on device" in error_line(capsys)


# ---- 5. resume accepts a different run -----------------------------------------------------


def test_resume_refuses_a_changed_config_unless_told(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2") == 0
    assert train(config, out, "--resume", "--set", "optim.lr=0.5") == 2
    line = error_line(capsys)
    assert "holds a different run" in line and "optim.lr: 0.01 -> 0.5" in line and "--allow-config-change" in line
    assert train(config, out, "--resume", "--set", "score.stage1_steps=1", "--set", "score.stage2_steps=3") == 2
    assert "score.stage1_steps: 2 -> 1" in error_line(capsys)
    assert train(config, out, "--resume", "--set", "optim.lr=0.5", "--allow-config-change") == 0
    assert "continuing with optim.lr: 0.01 -> 0.5" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["config"]["optim.lr"] == 0.5


def test_resume_refuses_another_base_model(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2") == 0
    edit_json(base / "config.json", rms_norm_eps=1e-5)  # same path, other model
    assert train(config, out, "--resume") == 2
    assert "model/config.json" in error_line(capsys)


def test_resume_refuses_other_weights_of_the_same_shape(tmp_path, capsys):
    config, base = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2") == 0
    weights = load_file(str(base / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # same names, shapes, dtypes and byte size: another model
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert train(config, out, "--resume") == 2
    assert "model/model.safetensors sha256" in error_line(capsys)


def test_a_run_folder_without_run_json_resumes_only_when_told(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2") == 0
    (out / "run.json").unlink()
    assert train(config, out, "--resume", "--set", "optim.lr=0.5") == 2
    line = error_line(capsys)
    assert "holds a run but no run.json" in line and "--allow-config-change" in line
    assert train(config, out, "--resume", "--set", "optim.lr=0.5", "--allow-config-change") == 0
    assert json.loads((out / "run.json").read_text())["config"]["optim.lr"] == 0.5


def test_identical_model_and_data_at_another_path_are_the_same_run(tmp_path):
    config, base = setup_run(tmp_path)
    out = tmp_path / "run"
    assert train(config, out, "--max-steps", "2") == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(base, moved / "model")
    shutil.copy(tmp_path / "train.jsonl", moved / "problems.jsonl")
    paths = [
        f"model.path={json.dumps(str(moved / 'model'))}",
        f"data.train={json.dumps(str(moved / 'problems.jsonl'))}",
    ]
    assert train(config, out, "--resume", "--set", paths[0], "--set", paths[1]) == 0
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_digests_are_computed_once_and_reused_while_size_and_mtime_hold(tmp_path, monkeypatch):
    import hashlib

    from score.model.files import write_json
    from score.rl.run_record import RUN_RECORD, run_record
    from tests.helpers.tiny_run import tiny_config

    cfg = tiny_config(tmp_path)
    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: (hashed.append(f.name), real(f, name))[1])
    first = run_record(cfg, tmp_path)
    assert len(hashed) == len(first["files"]) >= 5  # config.json, weights, tokenizer files, the data
    write_json(tmp_path / RUN_RECORD, first)
    hashed.clear()
    assert run_record(cfg, tmp_path)["identity"] == first["identity"] and hashed == []
    weights = tmp_path / "base" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert run_record(cfg, tmp_path)["identity"] == first["identity"] and hashed == [str(weights.resolve())]


def test_a_resume_whose_every_checkpoint_is_unreadable_starts_again_from_step_zero(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    out = tmp_path / "run"
    every = ["--set", "run.checkpoint_every=1", "--set", "run.keep_last=3"]
    assert train(config, out, "--max-steps", "2", *every) == 0
    broken = list_checkpoints(out, "plain")
    for step in broken:
        (step / "optimizer.safetensors").write_bytes(b"cut")
    capsys.readouterr()
    assert train(config, out, "--resume", *every) == 0
    said = capsys.readouterr()
    assert f"none of the {len(broken)} checkpoints under {out / 'checkpoints'} can be read" in said.out
    assert "the run starts again from step 0" in said.out and "set aside as step_00000002.unreadable" in said.err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out, "plain")] == ["step_00000002", "step_00000003", "step_00000004"]


# ---- 7. checks that come too late ----------------------------------------------------------


def test_a_bad_eval_file_is_read_before_training(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    bad = tmp_path / "bad_eval.jsonl"
    bad.write_text('{"id": "e1", "problem": "x", "answer": "1"}\nnot json\n')
    assert train(config, tmp_path / "run", "--set", f"data.eval={json.dumps(str(bad))}") == 2
    assert "bad_eval.jsonl line 2: invalid JSON" in error_line(capsys)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_demo_never_overwrites_another_demo_or_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "1", "--workers", "1"]) == 0
    before = (out / "base" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--seed", "5", "--seeds", "1"]) == 2
    assert "holds the demo of" in error_line(capsys)
    assert (out / "base" / "model.safetensors").read_bytes() == before
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "1", "--workers", "1"]) == 0  # the same again
    capsys.readouterr()
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(foreign)]) == 2
    assert "holds no demo" in error_line(capsys)


# ---- 8. vague messages ---------------------------------------------------------------------


def test_non_utf8_bytes_name_file_and_line(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    text = config.read_bytes().split(b"\n")
    text[2] = b"# caf\xff"
    config.write_bytes(b"\n".join(text))
    assert train(config, tmp_path / "run") == 2
    assert "run.toml:3: not UTF-8 text (byte 0xff)" in error_line(capsys)
    config, _ = setup_run(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_bytes(data.read_bytes() + b'{"id": "x", "problem": "\xff", "answer": "1"}\n')
    assert train(config, tmp_path / "run2") == 2
    column = len(b'{"id": "x", "problem": "') + 1
    assert f"train.jsonl line 17: not UTF-8 text (byte 0xff at column {column})" in error_line(capsys)


def test_seeds_out_of_range_are_named(tmp_path, capsys):
    config, _ = setup_run(tmp_path)
    assert train(config, tmp_path / "run", "--set", f"run.seed={2**64}") == 2
    assert "run.seed must be in [0, 2**31)" in error_line(capsys)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--seed", str(2**64)]) == 2
    assert "--seed must be in" in error_line(capsys)
