"""`kill -9`, counted: every writing command (train, sft, eval, demo, convert, data) on the tiny task
is run as a real process and killed with SIGKILL at many moments, then recovered with the command a
user would type, and each recovery is checked against an uninterrupted run.

Moments: just before every whole-file or whole-folder write lands (every rename a traced run makes,
up to `--points` of them, evenly spread: tests/helpers/stop_at.py stops the process there), and at
fractions of the uninterrupted run's wall time. Recovery: the same command again; when it answers
that the folder holds a run and names `--resume`, the same command with `--resume` (what the message
says to type). A kill is survived when the recovery exits 0, leaves no temporary (`.tmp-*`) and no
process of the killed run alive, and its result equals the uninterrupted run's: the trained weights
bit for bit (train, sft), the evaluation's metrics (eval), the converted weights (convert), the
written files (data), the table's numbers (demo).

    python bench/kills.py [--points N] [COMMAND ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after site-packages: see pyproject's pytest options

import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from score.rl import sft as sft_module  # noqa: E402
from score.rl import trainer as trainer_module  # noqa: E402
from score.rl.cli import main  # noqa: E402
from tests.helpers.crash import kill_9, start, temporaries, wait_stopped, wait_until  # noqa: E402
from tests.helpers.tiny_run import ParityReward, make_base, write_problems, write_run_config  # noqa: E402

COMMANDS = ("train", "sft", "eval", "demo", "convert", "data")
FRACTIONS = (0.2, 0.4, 0.6, 0.8)


def prepare(root: Path) -> None:
    """The inputs every command reads: the tiny base model, configs, problems, a GGUF file, MATH rows."""
    make_base(root)
    write_run_config(root, sft__max_problems=4, sft__epochs=1, sft__kind="pair_sft", sft__include_correct=True)
    write_problems(root / "eval.jsonl", 6, "eval")
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(root / "m.gguf", "Q8_0")
    rows = [{"problem": f"problem {i}?", "solution": f"so \\boxed{{{i}}}"} for i in range(40)]
    for name, part in (("math_train", rows[:20]), ("math_test", rows[20:]), ("math500", rows[30:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def command(name: str, root: Path) -> tuple[list[str], Path]:
    """(argv, output folder) of a command on the inputs in `root`."""
    out = root / f"out-{name}"
    argv = {
        "train": ["train", "--config", str(root / "run.toml")],
        "sft": ["sft", "--config", str(root / "run.toml")],
        "eval": [
            "eval",
            "--model",
            str(root / "base"),
            "--data",
            str(root / "eval.jsonl"),
            "--config",
            str(root / "run.toml"),
        ],
        "demo": ["demo", "--quick", "--seeds", "2", "--workers", "2", "--quiet"],
        "convert": ["convert", "gguf", str(root / "m.gguf")],
        "data": ["data", "math", "--train", str(root / "math_train.jsonl"), "--test", str(root / "math_test.jsonl")],
    }[name]
    if name == "data":
        argv += ["--math500", str(root / "math500.jsonl")]
    return [*argv, "--out", str(out)], out


def result(name: str, out: Path):
    """What an uninterrupted run and a recovered one must agree on."""
    if name in ("train", "sft"):
        weights = load_file(str(out / "final" / "model.safetensors"))
        steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
        return {"steps": steps, **{k: v.clone() for k, v in weights.items()}}
    if name == "eval":
        metrics = json.loads((out / "eval_metrics.json").read_text())
        return {k: v for k, v in metrics.items() if k != "stderr"}
    if name == "convert":
        return load_file(str(out / "model.safetensors"))
    if name == "data":
        return {f: (out / f).read_bytes() for f in ("math_train.jsonl", "math500.jsonl")}
    results = json.loads((out / "results.json").read_text())
    return {m: v["mean"] for m, v in results["methods"].items()}


def same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def recover(argv: list[str]) -> tuple[int, str, str]:
    """The user's recovery: the command again, then with --resume if the refusal says to; (exit
    status, what was typed, what the last one said on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
        if code == 2 and "--resume" in err.getvalue() and "--resume" not in argv:
            argv = [*argv, "--resume"]
            err.seek(0)
            err.truncate()
            code = main(argv)
    return code, " ".join(a for a in argv if a == "--resume") or "the same command", err.getvalue().strip()


def descendants(proc) -> set[int]:
    """Every process the command started (the demo's workers, reward graders), alive before the kill."""
    try:
        return {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def trial(name: str, root: Path, moment: dict, expected) -> tuple[bool, str]:
    argv, out = command(name, root)
    shutil.rmtree(out, ignore_errors=True)
    for stale in root.glob(f".tmp-{out.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    parity = name in ("train", "sft")
    if "rename" in moment:
        proc = start(argv, root, stop_at=f"*@{moment['rename']}", parity_reward=parity)
        wait_stopped(proc, f"rename {moment['rename']}")
    else:
        proc = start(argv, root, parity_reward=parity)
        deadline = time.monotonic() + moment["after_s"]
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is not None:
            return True, "finished before the kill (not counted)"
    workers = descendants(proc)
    kill_9(proc)
    try:
        wait_until(lambda: not any(alive(p) for p in workers), "the killed command's workers to die", timeout_s=20)
    except AssertionError:
        for pid in workers:  # this bench's own clean-up, so the next trial starts alone
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        return False, f"{len(workers)} processes it started outlived the kill"
    code, typed, said = recover(argv)
    finished = code == 2 and "already exists" in said  # convert: the killed run had written its folder
    if code != 0 and not finished:
        return False, f"recovery ({typed}) exited {code}: {said}"
    left = temporaries(out) + sorted(root.glob(f".tmp-{out.name}-*"))
    if left:
        return False, f"temporaries left: {left[:3]}"
    if not same(result(name, out), expected):
        return False, "result differs from the uninterrupted run"
    how = "it had finished: the rerun says the folder exists" if finished else f"recovered with {typed}"
    started = f"; the {len(workers)} process{'es' if len(workers) > 1 else ''} it started died with it"
    return True, how + (started if workers else "")


def main_bench(args) -> int:
    unknown = set(args.commands) - set(COMMANDS)
    if unknown:
        raise SystemExit(f"unknown commands {sorted(unknown)}; choose from {', '.join(COMMANDS)}")
    root = Path(tempfile.mkdtemp(prefix="kills-"))
    prepare(root)
    totals = {}
    for module in (trainer_module, sft_module):  # as stop_at.py --parity-reward does in the killed runs
        module.make_reward = lambda cfg: ParityReward()
    for name in args.commands or COMMANDS:
        argv, out = command(name, root)
        trace = root / f"trace-{name}.txt"
        trace.unlink(missing_ok=True)
        started = time.monotonic()
        proc = start(argv, root, trace=trace, parity_reward=name in ("train", "sft"))
        _, err = proc.communicate()
        wall = time.monotonic() - started
        assert proc.returncode == 0, err
        expected = result(name, out)
        renames = trace.read_text().splitlines()
        step = max(1, len(renames) // args.points)
        moments = [{"rename": n} for n in range(1, len(renames) + 1, step)][: args.points]
        moments += [{"after_s": f * wall} for f in FRACTIONS]
        survived = tried = 0
        for moment in moments:
            ok, why = trial(name, root, moment, expected)
            counted = "not counted" not in why
            tried += counted
            survived += ok and counted
            where = (
                f"before rename {moment['rename']} ({Path(renames[moment['rename'] - 1]).name})"
                if "rename" in moment
                else f"at {moment['after_s']:.1f} s"
            )
            print(f"{name:8s} | kill -9 {where:48s} | {'survived' if ok else 'LOST'}: {why}", flush=True)
        totals[name] = (survived, tried, len(renames), wall)
    print("\n| command | kills | survived | writes in a run | uninterrupted wall s |\n|---|---|---|---|---|")
    for name, (survived, tried, writes, wall) in totals.items():
        print(f"| {name} | {tried} | {survived} | {writes} | {wall:.0f} |")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(s == t for s, t, _, _ in totals.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10, help="kill points at writes per command")
    parser.add_argument("commands", nargs="*", help=f"commands to kill (default all: {', '.join(COMMANDS)})")
    sys.exit(main_bench(parser.parse_args()))
