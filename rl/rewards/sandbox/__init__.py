"""Sandboxed execution of untrusted Python programs (model-written code for rewards).

A native launcher (launcher.c, built by CMake on `pip install`) builds user/pid/mount/net/
ipc/uts namespaces with a minimal read-only filesystem, no network and a cleared
environment, and starts a fork server (zygote.py) in them as pid 1; each program is a fork
of that warm interpreter with rlimits, its own session, a wall-clock kill and capped output.
See launcher.c for the full list and what is not done. Python side: `execute` / `run_batch`
on a pool of pre-started launchers (pool.py); `ExecResult` and errors in launcher.py.
"""

from .launcher import ExecResult, SandboxError, SandboxUnavailableError
from .pool import SandboxPool, default_pool, default_workers, execute, run_batch

__all__ = [
    "ExecResult",
    "SandboxError",
    "SandboxPool",
    "SandboxUnavailableError",
    "default_pool",
    "default_workers",
    "execute",
    "run_batch",
]
