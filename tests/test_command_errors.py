"""The newer commands (eval's studies, sft, convert, data, W&B) meet bad input with one line naming the
key, file, line or problem id, exit 2, before any work: no traceback, nothing silently accepted."""

import json
import os
import stat

import pytest

from score.rl.cli import main
from tests.helpers.tiny_run import write_problems, write_run_config


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.fixture
def tiny(tmp_path):
    """(config, eval data, the `score eval` arguments before --out) of the tiny model."""
    config = write_run_config(tmp_path)
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    return config, data, ["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config)]


def long_problem(data, problem_id="long-one"):
    """Append a problem whose prompt fills the tiny model's 256 positions; returns its line number."""
    text = data.read_text()
    row = {"id": problem_id, "problem": "last digit of " + "+".join(["7"] * 120), "answer": "0"}
    data.write_text(text + json.dumps(row) + "\n")
    return text.count("\n") + 1


# ---- 5. tracebacks -----------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [3, 24, 200, 2000])
def test_a_gguf_cut_inside_its_header_is_one_line(tmp_path, capsys, cut):
    pytest.importorskip("gguf")
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", "F32")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:cut])
    assert main(["convert", "gguf", str(tmp_path / "cut.gguf"), "--out", str(tmp_path / "hf")]) == 2
    assert f"{tmp_path / 'cut.gguf'}: not a readable GGUF file" in error_line(capsys)
    assert not (tmp_path / "hf").exists()


def disk_full(monkeypatch):
    """safetensors' writer fails as it does on a full disk (its own error type, the OS error in its text)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_a_full_disk_during_convert_and_during_a_checkpoint_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", "F32")
    config = write_run_config(tmp_path)
    disk_full(monkeypatch)
    assert main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 2
    assert "No space left on device" in error_line(capsys)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "No space left on device: " in error_line(capsys)  # names the file it was writing
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary left


def test_wandb_without_a_login_is_refused_before_any_folder_naming_offline_mode(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no-wandb-config"))
    monkeypatch.chdir(tmp_path)
    config = write_run_config(tmp_path, run__wandb=True)
    for command in ("train", "sft"):
        assert main([command, "--config", str(config), "--out", str(tmp_path / command)]) == 2
        line = error_line(capsys)
        assert "run.wandb = true: no W&B login" in line and "WANDB_MODE=offline" in line
        assert not (tmp_path / command).exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password x" + "0" * 39 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from score.rl.preflight import wandb_can_log

    assert wandb_can_log()


def test_scaling_with_code_rewards_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    import score.model

    _, _, common = tiny
    monkeypatch.setattr(score.model, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main([*common, "--set", "reward.kind=code", "--scaling", "1,2", "--out", str(tmp_path / "e")]) == 2
    assert "reward.kind = 'code'" in error_line(capsys)
    assert not (tmp_path / "e").exists()


# ---- 6. length checks that name nothing ---------------------------------------------------------


def test_eval_studies_name_the_problem_its_line_and_the_keys_before_loading(tiny, tmp_path, capsys):
    _, data, common = tiny
    line = long_problem(data)
    out = ["--out", str(tmp_path / "e")]
    short_critique = ["--self-refine", "--set", "self_refine.max_tokens_critique=4"]
    for study in (["--scaling", "1,2"], ["--attempts", "3"], short_critique):
        assert main([*common, *study, *out]) == 2, study
        message = error_line(capsys)
        assert f"long-one ({data} line {line}" in message and "rollout.max_tokens_attempt1" in message, message
    assert main([*common, "--self-refine", *out]) == 2  # the default critique budget: no room for any prompt
    message = error_line(capsys)
    for key in ("self_refine.max_tokens_critique = 256", "self_refine.critique_instruction", "self_refine.refine_"):
        assert key in message and "leave no room for a prompt" in message
    assert not (tmp_path / "e").exists()


def test_given_first_attempts_that_fill_the_context_are_named(tiny, tmp_path, capsys):
    _, data, common = tiny
    given = tmp_path / "given.jsonl"
    first = json.loads(data.read_text().splitlines()[1])
    given.write_text(json.dumps({"id": first["id"], "attempt1": "7 " * 300}) + "\n")
    assert main([*common, "--first-attempts", str(given), "--out", str(tmp_path / "e")]) == 2
    message = error_line(capsys)
    assert f"--first-attempts {given}" in message and f"{first['id']} ({data} line 2" in message
    assert "prompt and given attempt 1" in message


def test_an_eval_budget_past_the_positions_names_run_eval_max_tokens_not_skip_too_long(tmp_path, capsys):
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    config = write_run_config(tmp_path, data__eval=str(data), run__eval_max_tokens=200)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    message = error_line(capsys)
    assert f"data.eval {data}" in message and "run.eval_max_tokens = 200" in message
    assert "skip_too_long" not in message


# ---- 7. silently wrong ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--scaling", ""], "--scaling takes comma-separated sample budgets"),
        (["--scaling", "2", "--temperature", "inf"], "--temperature must be a finite number > 0"),
        (["--temperature", "0.5"], "--temperature sets the sampling of --scaling"),
        (["--seed", "3"], "--seed sets the sampling of --scaling"),
    ],
)
def test_eval_flags_that_would_be_ignored_or_wrong_are_refused(tiny, tmp_path, capsys, flags, message):
    _, _, common = tiny
    assert main([*common, *flags, "--out", str(tmp_path / "e")]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "e").exists()


def write_math(path, rows):
    path.write_text("".join(json.dumps({"problem": p, "solution": f"\\boxed{{{i}}}"}) + "\n" for i, p in rows))
    return str(path)


def test_data_math_refuses_a_repeated_math500_row_and_empty_inputs_and_counts_right(tmp_path, capsys):
    train = write_math(tmp_path / "train.jsonl", [(0, "a?"), (1, "b?")])
    test = write_math(tmp_path / "test.jsonl", [(2, "c?"), (3, "d?"), (3, "d?"), (4, "e?")])
    repeated = write_math(tmp_path / "m500.jsonl", [(3, "d?"), (3, "d?")])
    args = ["data", "math", "--train", train, "--test", test, "--out", str(tmp_path / "d")]
    assert main([*args, "--math500", repeated]) == 2
    assert f"{repeated} line 2: the same problem as {repeated} line 1" in error_line(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "math", "--train", str(empty), "--test", test, "--math500", repeated, "--out", "x"]) == 2
    assert f"--train {empty}: no problems" in error_line(capsys)
    assert not (tmp_path / "d").exists() and not (tmp_path / "x").exists()
    math500 = write_math(tmp_path / "m500.jsonl", [(3, "d?")])
    assert main([*args, "--math500", math500]) == 0  # both copies of d? leave the training set
    assert "training: 2 train + 2 test = 4 problems" in capsys.readouterr().out


def test_data_math_without_pyarrow_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    args = ["--train", str(tmp_path / "t.parquet"), "--test", "t", "--math500", "m", "--out", str(tmp_path / "d")]
    assert main(["data", "math", *args]) == 2
    assert "reading Parquet needs pyarrow (pip install 'score-rl[data]')" in error_line(capsys)


def test_a_mistyped_relative_model_folder_is_named_as_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    assert main(["eval", "--model", "demo/base", "--data", str(data), "--out", "e"]) == 2
    assert f"no folder {tmp_path / 'demo' / 'base'}" in error_line(capsys)


# ---- 8. smaller ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    from score.model import save_pretrained
    from score.rl.checkpoints import save_checkpoint
    from tests.helpers.tiny_run import make_base

    model, tokenizer, _ = make_base(tmp_path)
    old = os.umask(umask)
    try:
        save_pretrained(model, tmp_path / "final")
        tokenizer.save_pretrained(tmp_path / "final")
        step = save_checkpoint(tmp_path / "run", 1, model, None, {})
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "final").iterdir(), *step.rglob("*")] if p.is_file()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~umask)}
    assert oct(stat.S_IMODE(step.stat().st_mode)) == oct(0o777 & ~umask)


def test_a_set_error_names_the_set_item_not_the_files_line(tmp_path, capsys):
    config = write_run_config(tmp_path)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--set", "optim.lr=-1"]) == 2
    assert error_line(capsys).startswith("score train: error: --set optim.lr=-1: optim.lr must be > 0")
