"""One run, one folder: an exclusive lock that every command writing a folder holds for its lifetime.

The lock is `flock` on `FOLDER/.score.lock`, so the operating system releases it when the holder
exits or is killed: a kill never leaves a stale lock behind, and there is nothing to clean up. The
file itself stays (a dot name, which readers skip) and tells a second process who holds the folder
(pid and command), so its one-line error can name them before it writes anything. `claim_folder`
also clears the temporaries a killed writer left there, so none blocks or outlives the next run.

Within one process the lock is re-entrant (a folder claimed twice is counted, and freed at the last
release): flock would otherwise make a process refuse itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from score.model.files import sweep_temporaries

LOCK_FILE = ".score.lock"

_held: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of a lock file -> [fd, claims]


class FolderInUse(ValueError):
    """Another process holds the folder (a one-line error for the CLI, exit 2)."""


def holder_of(folder: str | Path) -> dict:
    """What the lock file of `folder` says about its holder ({} when nothing readable)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text(encoding="utf-8")
        holder = json.loads(text)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _give_up(key: tuple[int, int]) -> None:
    """One claim less on a held lock; the last one closes the descriptor, which drops the flock."""
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class FolderLock:
    """A claim on a folder; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, folder: Path, key: tuple[int, int]):
        self.folder, self._key = folder, key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            _give_up(self._key)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, *, command: str | None = None, what: str = "--out", wait_s: float = 0.0):
    """Create `folder` if needed and hold it exclusively; a FolderInUse naming the folder and its
    holder when another process has it (after waiting up to `wait_s` seconds for it to let go), a
    ValueError when the folder cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ValueError(f"{what} {folder}: cannot write there ({e.strerror or e})") from None
    key = _key(fd)
    if key in _held:  # this process holds it already
        os.close(fd)
        _held[key][1] += 1
        return FolderLock(folder, key)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise FolderInUse(_in_use_message(folder, what)) from None
            time.sleep(0.05)
    holder = {"pid": os.getpid(), "command": command or _command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
    except OSError as e:
        os.close(fd)
        raise ValueError(f"{what} {folder}: cannot write there ({e.strerror or e})") from None
    _held[key] = [fd, 1]
    return FolderLock(folder, key)


def claim_folder(folder: str | Path, *, what: str = "--out", command: str | None = None) -> FolderLock:
    """`lock_folder`, then clear what dead writers left in the folder: their temporaries and set-aside
    copies (score.model.files), anywhere under it except in folders another run holds (a folder with
    its own lock file). Holding the lock, this process knows no live writer is there."""
    lock = lock_folder(folder, what=what, command=command)
    try:
        sweep_temporaries(folder, skip=lambda sub: (sub / LOCK_FILE).exists())
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def command_scope():
    """Every claim made inside the block and still held at its end is given up then: a command
    holds what it claims until it returns, however it returns."""
    before = {key: entry[1] for key, entry in _held.items()}
    try:
        yield
    finally:
        for key in list(_held):
            for _ in range(_held[key][1] - before.get(key, 0)):
                _give_up(key)


def _in_use_message(folder: Path, what: str) -> str:
    holder = holder_of(folder)
    who = f"pid {holder['pid']}" if "pid" in holder else "another process"
    if holder.get("command"):
        who += f" ({holder['command']}"
        who += f", since {holder['started']})" if holder.get("started") else ")"
    return (
        f"{what} {folder} is in use by {who}: a folder holds one run at a time; wait for it to end, "
        f"stop it, or choose another {what}"
    )


def _command_line() -> str:
    """`score train --out …`, shortened: what a second process's error names as the holder."""
    args = list(sys.argv)
    if args and os.path.basename(args[0]) in ("score", "cli.py", "__main__.py"):
        args[0] = "score"
    text = " ".join(args)
    return text if len(text) <= 120 else text[:117] + "..."
