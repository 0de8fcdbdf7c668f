"""One running copy of the native launcher (launcher.c) and the request/response exchange.

A `Launcher` is a long-lived child process that executes programs one at a time through
the fork server it keeps inside its namespaces; the parent pays for forking itself and for
interpreter start-up once, not per program. It is not thread-safe by itself: `SandboxPool`
hands each one to a single thread at a time.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from . import protocol

LAUNCHER_PATH = Path(__file__).with_name("score-sandbox")
ZYGOTE_PATH = Path(__file__).with_name("zygote.py")

# System library trees the interpreter needs (read-only inside the sandbox); the
# interpreter's own prefix is added when it lives elsewhere (pyenv, conda, venv base).
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/ld.so.cache")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): launcher missing, died, or setup failed."""


class SandboxUnavailableError(SandboxError):
    """Strict mode refused to run because the kernel withholds a protection."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed run.

    status: "ok" (exit 0), "error" (non-zero exit, e.g. an exception), "timeout" (wall or CPU
    limit), "memory" (MemoryError under the address-space limit), "killed" (ended by a signal,
    e.g. a segfault), "output_limit" (stdout or stderr passed its cap; the run was killed).
    returncode: exit code, or minus the signal number (as subprocess reports it).
    missing_protections: namespaces the kernel refused (empty when fully isolated).
    """

    status: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    missing_protections: tuple = ()


def runtime_paths(python: str) -> list:
    paths = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    covered = [os.path.realpath(p) for p in paths if os.path.isdir(p)]

    def is_covered(path):
        return any(path == c or path.startswith(c + os.sep) for c in covered)

    prefix = os.path.realpath(sys.base_prefix)
    if not is_covered(prefix):
        paths.append(prefix)
        covered.append(prefix)
    if not is_covered(python):  # e.g. a venv made with --copies
        paths.append(os.path.dirname(python))
    return paths


def base_python() -> str:
    """The real interpreter binary (a venv's python is a link to it, and the venv is not mounted)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


_warned_missing = False


def _warn_missing_once(missing: tuple) -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            f"score sandbox runs WITHOUT these kernel protections: {', '.join(missing)} "
            "(strict=False was passed; programs are less isolated than documented)",
            RuntimeWarning,
            stacklevel=4,
        )


class Launcher:
    """A started launcher process. `strict=True` refuses to start unless every namespace is granted."""

    def __init__(self, *, strict: bool = True, without: tuple = ()):
        if not LAUNCHER_PATH.is_file() or not os.access(LAUNCHER_PATH, os.X_OK):
            raise SandboxError(
                f"sandbox launcher binary not found at {LAUNCHER_PATH}: it is built by CMake during "
                '`pip install -e ".[test]"` (needs cmake and a C compiler); reinstall the package'
            )
        python = base_python()
        cmd = [str(LAUNCHER_PATH), "--python", python, "--zygote", str(ZYGOTE_PATH)]
        for path in runtime_paths(python):
            cmd += ["--ro", path]
        if without:
            cmd += ["--without", ",".join(without)]
        if not strict:
            cmd.append("--allow-missing")
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, close_fds=True
        )
        magic, present, wanted = protocol.HELLO.unpack(self._read_exact(protocol.HELLO.size))
        if magic != protocol.MAGIC:
            self.close()
            raise SandboxError(f"sandbox launcher speaks another protocol (magic {magic:#x})")
        self.missing_protections = protocol.protection_names(wanted & ~present)
        if self.missing_protections:
            if strict:
                self.close()
                raise SandboxUnavailableError(
                    f"the kernel refuses these sandbox namespaces: {', '.join(self.missing_protections)}; "
                    "refusing to run untrusted code without them (strict mode). Allow unprivileged user "
                    "namespaces (e.g. sysctl kernel.unprivileged_userns_clone=1 / "
                    "kernel.apparmor_restrict_unprivileged_userns=0) or pass strict=False to accept "
                    "weaker isolation"
                )
            _warn_missing_once(self.missing_protections)

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self._proc.stdout.read(left)
            if not chunk:
                raise SandboxError(f"sandbox launcher exited unexpectedly: {self._launcher_error()}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _launcher_error(self) -> str:
        try:
            self._proc.wait(timeout=5)
            err = self._proc.stderr.read().decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            err = ""
        return f"exit status {self._proc.returncode}" + (f": {err}" if err else "")

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, source: bytes, stdin: bytes, timeout_ms: int, memory_mb: int, max_output_bytes: int) -> ExecResult:
        header = protocol.REQUEST.pack(protocol.MAGIC, timeout_ms, memory_mb, max_output_bytes, len(source), len(stdin))
        try:
            self._proc.stdin.write(header + source + stdin)
        except BrokenPipeError:
            raise SandboxError(f"sandbox launcher exited unexpectedly: {self._launcher_error()}") from None
        magic, outcome, code, flags, wall_ns, n_out, n_err = protocol.RESPONSE.unpack(
            self._read_exact(protocol.RESPONSE.size)
        )
        stdout = self._read_exact(n_out).decode(errors="replace")
        stderr = self._read_exact(n_err).decode(errors="replace")
        if magic != protocol.MAGIC:
            raise SandboxError(f"corrupt response from the sandbox launcher (magic {magic:#x})")
        if flags & protocol.FLAG_SETUP_FAILED:
            raise SandboxError(stderr or "sandbox setup failed")
        signaled = outcome == protocol.OUTCOME_SIGNALED
        if flags & protocol.FLAG_OUTPUT_LIMIT:
            status = "output_limit"
        elif flags & protocol.FLAG_TIMED_OUT or (signaled and code == signal.SIGXCPU):
            status = "timeout"
        elif signaled:
            status = "killed"
        elif code == 0:
            status = "ok"
        elif code == protocol.MEMORY_EXIT:
            status = "memory"
        else:
            status = "error"
        return ExecResult(
            status=status,
            returncode=-code if signaled else code,
            stdout=stdout,
            stderr=stderr,
            wall_s=wall_ns / 1e9,
            missing_protections=self.missing_protections,
        )

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # EOF: the launcher exits between requests
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if not stream.closed:
                stream.close()
