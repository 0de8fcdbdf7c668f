"""Real processes for the lock and crash tests: `score` commands started as subprocesses, caught at an
exact write (tests/helpers/stop_at.py stops them with SIGSTOP) or when a file shows their progress,
and then killed with SIGKILL, as `kill -9` would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

STOP_AT = Path(__file__).with_name("stop_at.py")
DEADLINE_S = 300.0  # a loaded 2-core machine starts torch in seconds; minutes means something is wrong


def start(
    args: list[str],
    cwd: Path,
    *,
    stop_at: str | None = None,
    stop_after_step: bool = False,
    trace: Path | None = None,
    parity_reward: bool = False,
) -> subprocess.Popen:
    """`score ARGS` as a new process (stderr captured), optionally stopping at a write or after its
    first logged step, or tracing the writes (stop_at.py)."""
    options = (["--stop-at", stop_at] if stop_at else []) + (["--trace", str(trace)] if trace else [])
    options += ["--stop-after-step"] if stop_after_step else []
    options += ["--parity-reward"] if parity_reward else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(STOP_AT), *options, "--", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args: list[str], cwd: Path) -> tuple[int, str]:
    """`score ARGS` as a new process, to its end: (exit status, stderr)."""
    proc = start(args, cwd)
    _, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, err


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, timeout_s: float = DEADLINE_S) -> None:
    """Poll `condition()` until true; fail naming `what` (and the process's stderr if it ended)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_stopped(proc: subprocess.Popen, what: str) -> None:
    """Wait until the process has stopped itself (SIGSTOP at its stop_at write)."""
    p = psutil.Process(proc.pid)
    wait_until(lambda: p.status() == psutil.STATUS_STOPPED, f"the stop at {what}", proc)


def kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL, as `kill -9`, and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()


def lines(path: Path) -> int:
    """Complete lines in a file (0 when it does not exist)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def temporaries(root: Path) -> list[Path]:
    """Every temporary of an atomic write (`.tmp-*`) under `root`."""
    return sorted(p for p in root.rglob(".tmp-*"))
