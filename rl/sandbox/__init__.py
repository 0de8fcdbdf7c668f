"""Sandboxed execution of untrusted Python programs (model-written code for rewards).

A native launcher (launcher.c, built by CMake on `pip install`) runs each program in fresh
user/pid/mount/net/ipc/uts namespaces with a minimal read-only filesystem, no network, a
cleared environment, rlimits and a wall-clock kill; see launcher.c for the full list and
what is not done. Python side: `execute` / `run_batch` on a pool of pre-started launchers.
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
