"""The sandbox against hostile programs, plus benign ones.

Every hostile program must end non-"ok" or harmlessly, within timeout + 1 s, leave no
process (nothing under the launcher) and no file behind, and leave this process unaffected.
"""

import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import psutil
import pytest

from score.rl import ExecResult, SandboxPool, SandboxUnavailableError, execute, run_batch
from score.rl.rewards.sandbox import default_pool

TIMEOUT_S = 1.0
MEMORY_MB = 256


def run(source, **kw):
    kw.setdefault("timeout_s", TIMEOUT_S)
    kw.setdefault("memory_mb", MEMORY_MB)
    result = execute(source, **kw)
    assert result.wall_s < kw["timeout_s"] + 1.0, result
    return result


@pytest.fixture(autouse=True)
def no_stragglers():
    """After each test, each launcher's only descendant is its idle fork server: nothing of a run remains."""
    yield
    for launcher in default_pool()._all:
        process = psutil.Process(launcher._proc.pid)
        zygotes = process.children()
        assert len(zygotes) <= 1 and process.children(recursive=True) == zygotes, (
            f"processes left behind: {process.children(recursive=True)}"
        )


# ---- benign programs -------------------------------------------------------------------


def test_correct_output():
    r = run("print(sum(range(10)))")
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("ok", 0, "45\n", "")
    assert isinstance(r, ExecResult) and r.missing_protections == ()


def test_exception_is_error_with_traceback():
    r = run("def f():\n    raise ValueError('boom')\nf()")
    assert r.status == "error" and r.returncode == 1
    assert "ValueError: boom" in r.stderr and "main.py" in r.stderr


def test_exit_codes_and_exit_builtin():
    assert run("import sys; sys.exit(3)").returncode == 3
    assert run("exit(0)").status == "ok"  # exit() exists even though site is not imported


def test_stdin_passed_through():
    r = run("import sys; data = sys.stdin.read(); print(len(data), data[:5])", stdin="hello" * 100_000)
    assert r.status == "ok" and r.stdout == "500000 hello\n"


def test_batch_keeps_order():
    results = run_batch([f"print({i} * {i})" for i in range(12)], timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(12)]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        execute("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        execute("pass", memory_mb=1)
    with pytest.raises(ValueError, match="source"):
        execute(42)


# ---- hostile programs ------------------------------------------------------------------


def test_infinite_loop():
    assert run("while True: pass").status == "timeout"


def test_loop_ignoring_sigterm():
    r = run("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass")
    assert r.status == "timeout" and r.returncode == -9


def test_fork_bomb():
    r = run("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass")
    assert r.status != "ok"


def test_memory_bomb():
    r = run("x = []\nwhile True: x.append(bytearray(50 << 20))")
    assert r.status == "memory" and "MemoryError" in r.stderr


def test_disk_fill():
    r = run("f = open('fill', 'wb')\nwhile True: f.write(b'x' * (1 << 20))")
    assert r.status == "error" and ("File too large" in r.stderr or "No space" in r.stderr)


def test_loopback_connection_reaches_nothing():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    r = run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\ns.sendall(b'hi')")
    assert r.status == "error" and ("unreachable" in r.stderr or "refused" in r.stderr), r.stderr
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()


def test_environment_secret_is_not_visible():
    os.environ["SCORE_SANDBOX_TEST_SECRET"] = "hunter2"
    try:
        with SandboxPool(1) as pool:  # launcher started while the secret is in our environment
            r = pool.execute("import os\nprint(dict(os.environ))", timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    finally:
        del os.environ["SCORE_SANDBOX_TEST_SECRET"]
    assert r.status == "ok" and "hunter2" not in r.stdout and "SCORE_SANDBOX" not in r.stdout


def test_parent_temp_files_are_not_visible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run(f"print(open({str(secret)!r}).read())")
    assert r.status == "error" and "hunter2" not in r.stdout and "FileNotFoundError" in r.stderr


def test_writes_outside_the_work_dir_fail(tmp_path):
    targets = [str(tmp_path / "escaped"), "/tmp/score_sandbox_escaped", "/etc/score_sandbox_escaped", "/escaped"]
    program = (
        "ok = 0\n"
        + "".join(f"try:\n    open({t!r}, 'w').write('x'); ok += 1\nexcept OSError: pass\n" for t in targets)
        + "print(ok)"
    )
    r = run(program)
    assert r.status == "ok" and r.stdout == "0\n"
    assert not any(os.path.exists(t) for t in targets)


def test_killing_parent_and_pid1_is_harmless():
    program = (
        "import os, signal\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n"
        "    for pid in (os.getppid(), 1):\n"
        "        try: os.kill(pid, sig)\n"
        "        except OSError: pass\n"
        "print('alive')"
    )
    assert run(program).stdout == "alive\n"
    assert run("print('still works')").stdout == "still works\n"


def test_fork_server_cannot_be_traced():
    # A run that could ptrace its fork server could fake every later result.
    r = run("import ctypes\nprint(ctypes.CDLL(None).ptrace(16, 1, 0, 0))")  # PTRACE_ATTACH pid 1
    assert r.status == "ok" and r.stdout == "-1\n"


def test_nothing_of_a_run_reaches_the_next():
    leave = (
        "import os\nopen('leak', 'w').write('x')\nos.mkdir('locked')\nos.chmod('locked', 0)\n"
        "open('../beside', 'w').write('x')\nos.symlink('/usr', '../link')\nimport sys; sys.leaked = 1"
    )
    look = "import os, sys\nprint(os.listdir('.'), os.listdir('..'), hasattr(sys, 'leaked'))"
    with SandboxPool(1) as pool:  # one launcher, so both runs share its fork server
        assert pool.execute(leave, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB).status == "ok"
        assert pool.execute(look, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB).stdout == "['main.py'] ['run'] False\n"


def test_stdout_flood():
    r = run("while True: print('y' * 10000)", max_output_bytes=1 << 16)
    assert r.status == "output_limit" and len(r.stdout) <= 1 << 16


def test_closed_stdout():
    r = run("import os\nos.close(1)\nos.close(2)\nimport time\ntime.sleep(0.1)")
    assert r.status in ("ok", "error") and r.stdout == ""


def test_reading_stdin_forever():
    assert run("import sys\nwhile True: sys.stdin.read()").status == "timeout"


def test_daemonized_grandchild_is_killed():
    marker = "31337.25"  # a unique sleep argument to find the process on the host
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(1.5)\n"  # long enough to see the daemon from here on a busy machine
    )

    def daemons():
        return [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]

    results, seen = [], False
    runner = threading.Thread(target=lambda: results.append(run(program, timeout_s=3.0)))
    runner.start()
    while runner.is_alive() and not seen:
        seen = bool(daemons())
    runner.join()
    assert seen, "the daemon never started, so this test proved nothing"
    assert results[0].status == "ok" and not daemons()


def test_thread_exhaustion():
    r = run("import threading, time\nwhile True: threading.Thread(target=time.sleep, args=(30,), daemon=True).start()")
    assert r.status == "error" and "can't start new thread" in r.stderr


def test_ctypes_segfault():
    r = run("import ctypes\nctypes.string_at(0)")
    assert r.status == "killed" and r.returncode == -11


def test_parent_death_kills_launcher_and_program():
    script = (
        "from score.rl.rewards.sandbox import SandboxPool\n"
        "pool = SandboxPool(1)\n"
        "print(pool._all[0]._proc.pid, flush=True)\n"
        "pool.execute('import time; time.sleep(60)', timeout_s=60, memory_mb=256)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    launcher = psutil.Process(int(parent.stdout.readline()))
    for _ in range(1000):  # wait (up to 10 s on a busy machine) until the program runs: zygote + its child
        family = [launcher] + launcher.children(recursive=True)
        if len(family) >= 3:
            break
        time.sleep(0.01)
    assert len(family) >= 3, family
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(family, timeout=3)
    assert alive == []


# ---- missing protections ---------------------------------------------------------------


def test_strict_mode_refuses_a_missing_namespace(closes):
    with pytest.raises(SandboxUnavailableError, match="net"):
        closes(SandboxPool(1, without=("net",)))


def test_permissive_mode_reports_missing_namespace_and_warns_once():
    import score.rl.rewards.sandbox.launcher as launcher_module

    launcher_module._warned_missing = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with SandboxPool(2, strict=False, without=("net",)) as pool:
            r = pool.execute("print('ran')", timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    assert r.status == "ok" and r.missing_protections == ("net",)
    assert len([w for w in caught if "WITHOUT" in str(w.message)]) == 1


def test_test_process_is_unaffected():
    before = threading.active_count()
    run("import os; os.killpg(0, 9)")
    assert psutil.Process().status() != psutil.STATUS_ZOMBIE and threading.active_count() == before
