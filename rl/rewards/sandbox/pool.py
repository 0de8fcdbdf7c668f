"""A pool of pre-started launchers: `execute` for one program, `run_batch` for many.

Each worker thread owns one launcher at a time; the threads only wait on pipes (the GIL is
released), so a pool of N launchers runs N programs at once. The module-level `execute` and
`run_batch` share one strict pool sized to the machine, started on first use.
"""

import atexit
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from .launcher import ExecResult, Launcher

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
MAX_TIMEOUT_S = 3600.0
MIN_MEMORY_MB = 64  # the interpreter alone maps ~30 MiB of address space


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def _as_bytes(name, value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"{name} must be str or bytes, got {type(value).__name__}")


def _check_limits(timeout_s, memory_mb, max_output_bytes):
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S)
    ):
        raise ValueError(f"timeout_s must be a number in (0, {MAX_TIMEOUT_S}], got {timeout_s!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not MIN_MEMORY_MB <= memory_mb <= 1 << 20:
        raise ValueError(f"memory_mb must be an int in [{MIN_MEMORY_MB}, {1 << 20}], got {memory_mb!r}")
    if (
        isinstance(max_output_bytes, bool)
        or not isinstance(max_output_bytes, int)
        or not 0 < max_output_bytes <= 1 << 30
    ):
        raise ValueError(f"max_output_bytes must be an int in (0, {1 << 30}], got {max_output_bytes!r}")


class SandboxPool:
    """`workers` launchers (default: the CPUs this process may use).

    strict=True (default) raises SandboxUnavailableError at start if the kernel refuses any
    namespace; strict=False runs with what is granted, warns once and lists the missing
    protections in every ExecResult. `without` pretends namespaces are missing (tests).
    """

    def __init__(self, workers: int = None, *, strict: bool = True, without: tuple = ()):
        workers = default_workers() if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.workers = workers
        self._strict, self._without = strict, tuple(without)
        self._idle = queue.SimpleQueue()
        self._all = []
        self._lock = threading.Lock()
        try:
            for _ in range(workers):
                self._idle.put(self._start())  # fails here, loudly, when strict mode refuses
        except BaseException:
            for launcher in self._all:
                launcher.close()
            raise
        self.missing_protections = self._all[0].missing_protections
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")
        self._closed = False

    def _start(self) -> Launcher:
        launcher = Launcher(strict=self._strict, without=self._without)
        with self._lock:
            self._all.append(launcher)
        return launcher

    def execute(
        self,
        source,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = DEFAULT_MEMORY_MB,
        stdin=None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Run one Python program; see `execute` at module level."""
        if self._closed:
            raise ValueError("this SandboxPool is closed")
        _check_limits(timeout_s, memory_mb, max_output_bytes)
        source_bytes = _as_bytes("source", source)
        stdin_bytes = b"" if stdin is None else _as_bytes("stdin", stdin)
        if len(source_bytes) >= 1 << 31 or len(stdin_bytes) >= 1 << 31:
            raise ValueError("source and stdin must each be under 2 GiB")
        launcher = self._idle.get()
        try:
            if not launcher.alive:  # died earlier (e.g. killed from outside): replace it
                launcher = self._start()
            return launcher.run(source_bytes, stdin_bytes, int(timeout_s * 1000), memory_mb, max_output_bytes)
        finally:
            self._idle.put(launcher)

    def run_batch(
        self,
        sources,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = DEFAULT_MEMORY_MB,
        stdins=None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> list:
        """Run many programs on all workers; results come back in input order."""
        sources = list(sources)
        stdins = [None] * len(sources) if stdins is None else list(stdins)
        if len(stdins) != len(sources):
            raise ValueError(f"stdins has {len(stdins)} entries for {len(sources)} sources")
        _check_limits(timeout_s, memory_mb, max_output_bytes)

        def one(args):
            source, stdin = args
            return self.execute(
                source, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, max_output_bytes=max_output_bytes
            )

        return list(self._threads.map(one, zip(sources, stdins, strict=True)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=True)
        with self._lock:
            for launcher in self._all:
                launcher.close()
            self._all.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_default_pool = None
_default_lock = threading.Lock()


_default_pool_pid = None


def default_pool() -> SandboxPool:
    """The shared strict pool behind `execute` and `run_batch` (started on first use).

    A forked child (e.g. a data-loader worker) starts its own: the parent's launchers
    answer the parent's pipes only."""
    global _default_pool, _default_pool_pid
    with _default_lock:
        if _default_pool is None or _default_pool_pid != os.getpid():
            _default_pool, _default_pool_pid = SandboxPool(), os.getpid()
            atexit.register(_default_pool.close)
        return _default_pool


def execute(
    source,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    stdin=None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> ExecResult:
    """Run the Python program `source` (str or bytes) in the sandbox and return its ExecResult.

    timeout_s: wall-clock limit (the CPU-time limit is one second above it); memory_mb:
    address-space limit per process; stdin: str/bytes fed to the program (None: empty);
    max_output_bytes: cap on each of stdout and stderr (passing it kills the run,
    status "output_limit"). Raises SandboxUnavailableError where the kernel withholds a
    namespace (strict mode), SandboxError when the sandbox itself fails.
    """
    return default_pool().execute(
        source, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, max_output_bytes=max_output_bytes
    )


def run_batch(
    sources,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    stdins=None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> list:
    """`execute` for many programs at once on the shared pool; results in input order."""
    return default_pool().run_batch(
        sources, timeout_s=timeout_s, memory_mb=memory_mb, stdins=stdins, max_output_bytes=max_output_bytes
    )
