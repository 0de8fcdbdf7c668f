"""The fork server that runs inside the sandbox (read by the launcher, run with python -I -S -c).

The launcher builds the namespaces and the filesystem view once, drops privileges and
starts this interpreter as pid 1 of its pid namespace. Each request forks a child that
runs one program, so no execution pays for interpreter start-up. Being pid 1 matters:
programs cannot kill it (the kernel drops signals from inside the namespace that init does
not handle), orphans of a run come back to it, and kill(-1) reaches every process a run
left behind, daemons included, before the next run starts.

Protocol on fd 3 (SOCK_SEQPACKET): request = struct "=III" (magic, timeout_ms, memory_mb)
with four descriptors (source, stdin, stdout, stderr); replies: b"S" + pid when the run has
started, then b"W" + wait status when it and everything it spawned are gone.
"""

import ast  # noqa: F401 - preloaded: every code check (rewards/check_harness.py) uses it
import ctypes
import json  # noqa: F401 - preloaded, as ast
import os
import resource
import shutil
import signal
import socket
import struct
import sys

MAGIC = 0x31584253
REQUEST = struct.Struct("=III")
MEMORY_EXIT = 113
WORK_BASE = os.environ.pop("SANDBOX_WORK_BASE")  # runs need not see it
FILE_SIZE = 16 << 20
MAX_PROCS = 32
MAX_OPEN_FILES = 256


def run_program(source: bytes, timeout_ms: int, memory_mb: int) -> int:
    """In the forked child: set limits, run the program as __main__, return its exit code."""
    import builtins
    import types

    os.setsid()  # own session and process group
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for limit, value in (
        (resource.RLIMIT_CPU, timeout_ms // 1000 + 2),
        (resource.RLIMIT_AS, memory_mb << 20),
        (resource.RLIMIT_FSIZE, FILE_SIZE),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
        (resource.RLIMIT_NPROC, MAX_PROCS),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    with open("main.py", "wb") as f:  # so tracebacks can show source lines
        f.write(source)
    builtins.exit = builtins.quit = sys.exit  # site is not imported (-S), so define them
    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    sys.argv = ["main.py"]
    code = 0
    try:
        exec(compile(source, "main.py", "exec"), main.__dict__)
    except SystemExit as e:  # as the interpreter does at exit
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except MemoryError:
        import traceback

        traceback.print_exc()
        code = MEMORY_EXIT
    except BaseException:
        kind, value, tb = sys.exc_info()
        sys.excepthook(kind, value, tb.tb_next)  # hide this file's frame
        code = 1
    # What Py_Finalize would do: wait for non-daemon threads, run atexit, flush streams.
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code & 0xFF


def remove_tree(path: str) -> None:
    """rmtree that first undoes a run's chmod-ing of its own directories (we are the same uid)."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):  # (no follow_symlinks=False: it needs /proc)
                os.chmod(child, 0o700)
    shutil.rmtree(path)


def kill_leftovers(run_pid: int) -> None:
    """Kill and reap every process the run left; afterwards nothing of it exists."""
    as_init = os.getpid() == 1
    while True:
        try:
            os.kill(-1, signal.SIGKILL) if as_init else os.killpg(run_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if as_init:
                return  # no children at all: every process of the run is gone
        if not as_init:
            return  # best effort without a pid namespace (the launcher reports it)


def serve(control: socket.socket) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(control, REQUEST.size, 4)
        if not message:
            return  # the launcher is gone
        magic, timeout_ms, memory_mb = REQUEST.unpack(message)
        if magic != MAGIC or len(fds) != 4:
            raise SystemExit(f"zygote: bad request (magic {magic:#x}, {len(fds)} descriptors)")
        source_fd, stdin_fd, stdout_fd, stderr_fd = fds
        work_dir = os.path.join(WORK_BASE, "run")
        os.mkdir(work_dir, 0o700)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                with os.fdopen(source_fd, "rb") as f:
                    source = f.read()
                for target, fd in ((0, stdin_fd), (1, stdout_fd), (2, stderr_fd)):
                    os.dup2(fd, target)
                    os.close(fd)
                os.chdir(work_dir)
                code = run_program(source, timeout_ms, memory_mb)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        control.send(b"S" + struct.pack("=i", pid))
        while True:  # reap (orphans reparent to us) until the run itself ended
            done, status = os.waitpid(-1, 0)
            if done == pid:
                break
        kill_leftovers(pid)
        control.send(b"W" + struct.pack("=i", status))
        # Everything under the base goes, not only the run directory: the run could write
        # anywhere in it (same uid). If this raises, the zygote exits and the launcher
        # starts a fresh one, on a fresh tmpfs.
        for name in os.listdir(WORK_BASE):
            remove_tree(os.path.join(WORK_BASE, name))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 ignores what it does not handle
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: runs (same uid) cannot ptrace us
    control = socket.socket(fileno=3)
    control.send(b"R")
    serve(control)


main()
