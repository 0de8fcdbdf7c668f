"""Files written whole or not at all, and JSON read with errors that name the file.

Every writer goes through a temporary in the target's own folder (`.tmp-<name>-XXXXXXXX`, so the
final rename never crosses a file system), fsyncs it, renames it over the target and fsyncs the
folder, so a crash leaves the old version or the new one, never half of one. Folders (checkpoints)
follow the same policy: an existing target is exchanged with the new one in one atomic step (or,
where the file system cannot, renamed aside and put back after a kill) and removed only after the
new one is in place. A temporary left by a killed writer is never mistaken for a result: readers skip dot names,
and `remove_stale_temporaries` clears them before the next write into that folder (`sweep_temporaries`
clears a whole run folder at once, for a process that holds its lock). Results get the permissions the
user's umask gives, as `open` would (temporaries are made private, 0600 / 0700, and widened before the
rename). A safetensors write that the disk refuses raises OSError, as any other write does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"
# tempfile's random part: 8 characters of this alphabet (tempfile._RandomNameSequence).
_TEMP_SUFFIX = "[a-z0-9_]{8}"


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path, folder: bool = False) -> None:
    """Give a temporary (private by tempfile's design) the mode a plain `open`/`mkdir` would have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def read_json_object(file) -> dict:
    """The object a JSON file holds; ValueError naming the file when it is not valid JSON or not an object."""
    with open(file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def fsync_dir(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(target):
    """Yields a temporary path beside `target` for the caller to write (any writer that takes a
    path: safetensors, savefig, open); on success it becomes `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _as_umask_allows(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(target.parent)


def write_text(target, text: str) -> Path:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(target)


def write_json(target, value, **dumps_options) -> Path:
    """`value` as JSON, indented by 2 unless `dumps_options` (json.dumps's) say otherwise, written
    atomically."""
    return write_text(target, json.dumps(value, **({"indent": 2} | dumps_options)) + "\n")


def write_jsonl(target, records) -> Path:
    """One JSON object per line, written atomically."""
    return write_text(target, "".join(json.dumps(r) + "\n" for r in records))


def temp_folder(target) -> Path:
    """A new empty temporary folder beside `target` (its parent is created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-"))
    _as_umask_allows(tmp, folder=True)
    return tmp


def exchange_paths(a, b) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS or
    the file system cannot, and nothing was changed."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), os.fspath(a))


def commit_folder(tmp, target) -> Path:
    """fsync every file of `tmp`, then rename it to `target`. An existing `target` is exchanged with
    the new folder in one atomic step and then deleted, so some complete copy is named `target` at
    every moment. Where the file system cannot exchange, it is renamed aside first (a kill between
    the two renames leaves it there, and `recover_set_aside` puts it back)."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if target.exists():
        if exchange_paths(tmp, target):
            shutil.rmtree(tmp)  # now the old copy
        else:
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}old-{target.name}-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def recover_set_aside(folder) -> None:
    """Put back a complete folder that commit_folder set aside when a kill stopped it before the new
    copy landed (the old one is then the only complete copy); drop set-aside copies already replaced."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if not (child.name.startswith(f"{TEMP_PREFIX}old-") and child.is_dir()):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process (rank) got there first
            for kept in child.iterdir():
                if not (folder / kept.name).exists():
                    os.replace(kept, folder / kept.name)
        shutil.rmtree(child, ignore_errors=True)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(target):
    """Yields a temporary folder beside `target` to fill; on success it replaces `target`
    (commit_folder), on error it is removed."""
    tmp = temp_folder(target)
    try:
        yield tmp
        commit_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder) -> None:
    """Delete temporaries a killed writer left in `folder` (never a complete result: those are renamed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    recover_set_aside(folder)
    for child in folder.iterdir():
        if child.name.startswith(TEMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()


def remove_stale_temporaries_of(target) -> None:
    """Delete the temporaries a killed writer of `target` left beside it (`.tmp-<name>-XXXXXXXX`, and a
    set-aside old copy, put back first when `target` itself is gone); other names are never touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    own = re.compile(rf"{re.escape(TEMP_PREFIX)}(old-)?{re.escape(target.name)}-{_TEMP_SUFFIX}")
    for child in target.parent.iterdir():
        match = own.fullmatch(child.name)
        if match is None:
            continue
        if match.group(1) and (child / target.name).is_dir() and not target.exists():
            os.replace(child / target.name, target)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def sweep_temporaries(root, *, skip=lambda folder: False) -> None:
    """`remove_stale_temporaries` in `root` and every folder under it, except folders for which
    `skip(folder)` is true (another process's run folder). Only for the process that owns `root`:
    any temporary found is then a dead writer's."""
    root = Path(root)
    if not root.is_dir():
        return
    remove_stale_temporaries(root)
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink() and not skip(child):
            sweep_temporaries(child, skip=skip)


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, with a write the machine refuses (disk full, quota) raised as the
    OSError it is, naming the file; safetensors reports it as its own error type."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"(?:os error|code:) (\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) or errno.errorcode.get(number, "I/O error"), os.fspath(path)) from e
