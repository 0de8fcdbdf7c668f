"""One run, one folder: while a process holds a folder, a second process on it (any command that writes
a folder) gets one line naming the folder and the holder, before it writes anything; a killed holder
leaves no lock behind. Two real processes each time."""

import json
import os
import signal
import subprocess
import sys

import pytest

from score.rl.cli import main
from score.rl.run_lock import LOCK_FILE, FolderInUse, holder_of, lock_folder
from tests.helpers.crash import DEADLINE_S, kill_9, run, start, wait_stopped
from tests.helpers.tiny_run import write_problems, write_run_config


def files_of(folder):
    """Every file under a folder with its size and modification time: what a refused process must not touch."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_second_score_train_on_a_running_folder_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    config = write_run_config(tmp_path)
    out = tmp_path / "run"
    train = ["train", "--config", str(config), "--out", str(out)]
    first = start(train, tmp_path, stop_at=str(out / "run.json"))  # holds the folder, about to write run.json
    wait_stopped(first, "run.json")
    before = files_of(out)
    code, err = run([*train, "--resume"], tmp_path)  # a fresh run is refused the same way (test below)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert f"--out {out} is in use by pid {first.pid}" in line and "score train" in line
    assert files_of(out) == before  # nothing written, not even run.json
    kill_9(first)
    assert main([*train, "--resume"]) == 0  # the operating system let go with the killed holder
    assert "starts again from step 0" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_two_score_sft_on_one_folder_log_every_step_once(tmp_path):
    config = write_run_config(
        tmp_path, sft__max_problems=4, sft__epochs=1, sft__kind="pair_sft", sft__include_correct=True
    )
    out = tmp_path / "sft"
    sft = ["sft", "--config", str(config), "--out", str(out)]
    first = start(sft, tmp_path, stop_at=str(out / "run.json"), parity_reward=True)
    wait_stopped(first, "run.json")
    code, err = run(sft, tmp_path)
    assert code == 2 and f"--out {out} is in use by pid {first.pid}" in err and err.count("\n") == 1
    os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=DEADLINE_S)
    assert first.returncode == 0, first_err
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and steps


@pytest.fixture
def held(tmp_path):
    """A folder held by another process (a bare lock_folder that then sleeps); killed at the end."""
    folder = tmp_path / "held"
    code = (
        "import sys, time\nfrom score.rl.run_lock import lock_folder\n"
        f"lock_folder({str(folder)!r}, command='a test holder')\nprint('held', flush=True)\ntime.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield folder, holder
    if holder.poll() is None:
        holder.kill()
    holder.wait(timeout=DEADLINE_S)
    holder.stdout.close()


def test_every_command_that_writes_a_folder_refuses_a_held_one_before_writing(tmp_path, held, capsys):
    folder, holder = held
    config = write_run_config(tmp_path)
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", "F32")
    train_file, test_file = tmp_path / "math_train.jsonl", tmp_path / "math_test.jsonl"
    rows = [{"problem": f"p{i}?", "solution": f"\\boxed{{{i}}}"} for i in range(3)]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    commands = {
        "train": ["train", "--config", str(config), "--out", str(folder)],
        "sft": ["sft", "--config", str(config), "--out", str(folder)],
        "eval": ["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config)],
        "demo": ["demo", "--quick", "--out", str(folder)],
        "convert": ["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(folder)],
        "data": ["data", "math", "--train", str(train_file), "--test", str(test_file), "--math500", str(test_file)],
    }
    commands["eval"] += ["--out", str(folder)]
    commands["data"] += ["--out", str(folder)]
    before = files_of(folder)
    for name, args in commands.items():
        assert main(args) == 2, name
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"{folder} is in use by pid {holder.pid} (a test holder" in line, (name, line)
        assert files_of(folder) == before, name
    holder.kill()
    holder.wait(timeout=DEADLINE_S)
    with lock_folder(folder) as lock:  # a killed holder leaves nothing locked
        assert holder_of(lock.folder)["pid"] == os.getpid()


def test_a_lock_is_reentrant_within_a_process_and_waits_for_a_holder_to_let_go(tmp_path, held):
    folder, holder = held
    with pytest.raises(FolderInUse, match=f"in use by pid {holder.pid}"):
        lock_folder(folder, wait_s=0.2)
    mine = tmp_path / "mine"
    with lock_folder(mine) as outer, lock_folder(mine):  # a process never refuses itself
        assert outer.folder == mine
    holder.kill()
    with lock_folder(folder, wait_s=DEADLINE_S):
        assert (folder / LOCK_FILE).is_file()
