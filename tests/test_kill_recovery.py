"""Every command survives `kill -9` at any moment: a real `score` process is killed with SIGKILL at an
exact write (stopped there first: tests/helpers/stop_at.py) or as soon as it has logged a step, and
the command a user would then type ends the job, leaving no temporary behind. Trained weights after
the recovery equal an uninterrupted run's bit for bit (the runs are rewarded by ParityReward, which an
untrained model earns, so that training moves the weights)."""

import json

import psutil
import pytest
import torch
from safetensors.torch import load_file

from score.rl import sft as sft_module
from score.rl import trainer as trainer_module
from score.rl.cli import main
from score.rl.run_lock import holder_of
from tests.helpers.crash import kill_9, lines, start, temporaries, wait_stopped, wait_until
from tests.helpers.tiny_run import ParityReward, write_problems, write_run_config

SFT_KEYS = dict(sft__max_problems=4, sft__epochs=1, sft__kind="pair_sft", sft__include_correct=True)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def parity_rewards(mp) -> None:
    """What stop_at.py --parity-reward does in the killed process, here for the recoveries."""
    for module in (trainer_module, sft_module):
        mp.setattr(module, "make_reward", lambda cfg: ParityReward())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final weights of the tiny `score train` and `score sft` runs, never killed."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_run_config(root, **SFT_KEYS)
    with pytest.MonkeyPatch.context() as mp:
        parity_rewards(mp)
        assert main(["train", "--config", str(config), "--out", str(root / "run")]) == 0
        assert main(["sft", "--config", str(config), "--out", str(root / "sft")]) == 0
    base = weights(root / "base")
    trained = {"train": weights(root / "run" / "final"), "sft": weights(root / "sft" / "final")}
    assert not any(same_weights(w, base) for w in trained.values())  # the comparisons below mean something
    return trained


@pytest.fixture
def parity(monkeypatch):
    parity_rewards(monkeypatch)


def kill_at(args, cwd, moment: str, out):
    """Start `score ARGS`, kill -9 it at `moment` (a path glob: just before that write lands; or
    'first step': stopped once its first step is logged, before the next one)."""
    if moment == "first step":
        proc = start(args, cwd, stop_after_step=True, parity_reward=True)
    else:
        proc = start(args, cwd, stop_at=moment, parity_reward=True)
    wait_stopped(proc, moment)
    if moment == "first step":
        assert lines(out / "metrics.jsonl") == 1
    kill_9(proc)


@pytest.mark.parametrize(
    "moment,recovery",
    [
        ("*/run/run.json", []),  # holding the folder, before any step: a plain rerun
        ("first step", ["--resume"]),
        ("*/run/checkpoints/step_00000002", ["--resume"]),  # inside the first checkpoint's write
        ("*/run/final", ["--resume"]),  # inside the final model's write
    ],
)
def test_score_train_killed_recovers_to_the_uninterrupted_weights(tmp_path, uninterrupted, parity, moment, recovery):
    config = write_run_config(tmp_path)
    out = tmp_path / "run"
    train = ["train", "--config", str(config), "--out", str(out)]
    kill_at(train, tmp_path, moment, out)
    assert main([*train, *recovery]) == 0
    assert steps(out) == [1, 2, 3, 4]
    assert temporaries(out) == []
    assert same_weights(weights(out / "final"), uninterrupted["train"])


@pytest.mark.parametrize("moment", ["first step", "*/sft/final"])
def test_score_sft_killed_resumes_from_round_zero_to_the_uninterrupted_weights(
    tmp_path, uninterrupted, parity, capsys, moment
):
    config = write_run_config(tmp_path, **SFT_KEYS)
    out = tmp_path / "sft"
    sft = ["sft", "--config", str(config), "--out", str(out)]
    kill_at(sft, tmp_path, moment, out)
    assert main(sft) == 2  # a plain rerun is refused, and says what to type
    assert "use --resume (a killed score sft starts again from round 0)" in capsys.readouterr().err
    assert main([*sft, "--resume"]) == 0
    assert "starts again from round 0" in capsys.readouterr().out
    assert steps(out) == list(range(1, len(steps(out)) + 1))
    assert temporaries(out) == []
    assert same_weights(weights(out / "final"), uninterrupted["sft"])
    assert main([*sft, "--resume"]) == 0  # a finished run: nothing to do
    assert "holds a finished run; nothing to do" in capsys.readouterr().out


def test_score_eval_killed_inside_its_records_write_reruns(tmp_path):
    config = write_run_config(tmp_path)
    data = write_problems(tmp_path / "eval.jsonl", 3, "eval")
    out = tmp_path / "ev"
    ev = ["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config), "--out", str(out)]
    kill_at(ev, tmp_path, "*/ev/eval.jsonl", out)
    assert main(ev) == 0
    assert json.loads((out / "eval_metrics.json").read_text())["n"] == 3 and temporaries(out) == []


def test_score_convert_killed_inside_its_folder_write_reruns(tmp_path):
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", "Q8_0")
    convert = ["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]
    kill_at(convert, tmp_path, "*/.tmp-hf-*/config.json", tmp_path / "hf")  # after the weights
    assert [p.name for p in tmp_path.glob(".tmp-hf-*")]  # the killed conversion's folder, beside hf/
    assert main(convert) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and temporaries(tmp_path) == []


def test_score_data_math_killed_between_its_two_files_reruns(tmp_path):
    rows = [{"problem": f"problem {i}?", "solution": f"\\boxed{{{i}}}"} for i in range(4)]
    for name, part in (("train", rows[:2]), ("test", rows[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    math500 = tmp_path / "m500.jsonl"
    math500.write_text(json.dumps(rows[3]) + "\n")
    data = ["data", "math", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl")]
    data += ["--math500", str(math500), "--out", str(tmp_path / "d")]
    kill_at(data, tmp_path, "*/d/math500.jsonl", tmp_path / "d")
    assert main(data) == 0
    assert lines(tmp_path / "d" / "math_train.jsonl") == 3 and temporaries(tmp_path / "d") == []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_score_demo_killed_takes_its_workers_with_it_and_reruns(tmp_path):
    out = tmp_path / "demo"
    demo = ["demo", "--quick", "--seeds", "2", "--workers", "2", "--quiet", "--out", str(out)]
    kill_at(demo, tmp_path, str(out / "demo.json"), out)  # demo.json's temporary is left
    second = start(demo, tmp_path)  # the same demo again, killed while both RL workers run
    workers = {}

    def both_running():
        for run in out.glob("runs/*"):
            pid = holder_of(run).get("pid")
            if pid and alive(pid):
                workers[run.name] = pid
        return len(workers) == 2

    wait_until(both_running, "two RL workers at work", second)
    assert second.pid not in workers.values()
    kill_9(second)
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), "the workers to die with the demo")
    assert main(demo) == 0
    assert json.loads((out / "results.json").read_text())["seeds"] == 2 and temporaries(out) == []
