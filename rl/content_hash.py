"""Content digests of the files a run reads, computed once: a file's sha256 is kept with its size and
modification time, and reused while both are unchanged, so a multi-gigabyte model is hashed when a
run starts and costs a `stat` on every resume.

`DigestCache(known)` starts from entries `{real path: {"bytes", "mtime_ns", "sha256"}}` stored earlier
(the run folder's run.json holds those of the files its run read) and collects in `used` the entries
of the files it was asked about, for the caller to store.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class DigestCache:
    def __init__(self, known: dict | None = None):
        self.known = dict(known or {})
        self.used: dict[str, dict] = {}

    def file(self, path: str | Path) -> str:
        """sha256 of one file (from the cache while its size and mtime are unchanged)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        entry = self.known.get(real)
        if not (
            isinstance(entry, dict) and entry.get("bytes") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
        ):
            with open(real, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            entry = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.used[real] = entry
        return entry["sha256"]

    def source(self, path: str | Path) -> str:
        """sha256 of a file, or of a folder's files (their paths relative to it and their digests, in
        sorted order; dot names skipped), so the same content at another path gives the same digest."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
            digest.update(f"{file.relative_to(path).as_posix()}\0{self.file(file)}\n".encode())
        return digest.hexdigest()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
