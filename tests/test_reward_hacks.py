"""Hostile programs against the code reward: every known way to be paid without solving the problem.

Each hack is a whole-program answer (as a chat model writes it) that is wrong on the problem's
tests and tries to get paid anyway. Under the two-process check every one earns 0. Where a hack
does fool a check that runs the tests in the candidate's own process (the `single_process`
fallback), the test shows that too, so the suite proves each hack is a real one.
"""

import textwrap

import pytest

from score.rl import code_rewards, load_humaneval

# The problems the hacks are aimed at, with a wrong answer of the right type for each.
TARGETS = {
    "HumanEval/0": "False",  # has_close_elements -> bool
    "HumanEval/1": "['()']",  # separate_paren_groups -> list of str
    "HumanEval/2": "0.25",  # truncate_number -> float, compared with == and abs(...) < 1e-6
    "HumanEval/23": "7",  # strlen -> int
    "HumanEval/27": "'no'",  # flip_case -> str
    "HumanEval/32": "0.0",  # find_zero -> float, checked with math.fabs(poly(coeffs, x)) < 1e-4
}

ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __le__(self, other): return True
    def __gt__(self, other): return True
    def __ge__(self, other): return True
    def __bool__(self): return True
    def __hash__(self): return 0
    def __sub__(self, other): return self
    def __rsub__(self, other): return self
    def __abs__(self): return 0.0
    def __len__(self): return 0
    def __iter__(self): return iter(())

def {name}(*args, **kwargs):
    return Anything()
"""

SUBCLASS = """
class Equal({base}):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = {base}.__hash__

def {name}(*args, **kwargs):
    return Equal()
"""

# Finds a 32-hex pass marker anywhere in the process (frames, gc-tracked containers, the program
# text), writes it as stdout's last line and leaves with exit status 0.
MARKER_THIEF = r"""
import gc, os, re, sys

def steal_marker():
    hexes, seen = [], set()
    def look(value):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            preferred = re.findall(r"write\('([0-9a-f]{32})'", value)
            hexes.extend(preferred or re.findall(r"\b[0-9a-f]{32}\b", value))
    frame = sys._getframe()
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for value in list(scope.values()):
                look(value)
        frame = frame.f_back
    for obj in gc.get_objects():
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
        for value in list(items):
            look(value)
    for fd in range(64):
        try:
            look(os.read(fd, 1 << 20))
        except OSError:
            pass
    return hexes
"""

STEAL_AND_EXIT = (
    MARKER_THIEF
    + """
def {name}(*args, **kwargs):
    found = steal_marker()
    if found:
        os.write(1, ("\\n" + found[0] + "\\n").encode())
    os._exit(0)
"""
)

# Lets the tests fail, then rewrites the ending: an atexit handler or an excepthook that prints a
# stolen marker and exits 0 after the assertion error.
ATEXIT_REWRITE = (
    MARKER_THIEF
    + """
import atexit

def rewrite_exit():
    found = steal_marker()
    if found:
        os.write(1, ("\\n" + found[0] + "\\n").encode())
    os._exit(0)

atexit.register(rewrite_exit)

def {name}(*args, **kwargs):
    return {wrong}
"""
)

EXCEPTHOOK_REWRITE = (
    MARKER_THIEF
    + """
def swallow(kind, value, tb):
    found = steal_marker()
    if found:
        os.write(1, ("\\n" + found[0] + "\\n").encode())
    os._exit(0)

sys.excepthook = swallow

def {name}(*args, **kwargs):
    return {wrong}
"""
)

# A trace hook, set as the program loads, that jumps over every assert line the tests run.
TRACE_SKIPS_ASSERTS = """
import linecache, sys

def skip_asserts(frame, event, arg):
    if event == "line" and is_assert(frame.f_code.co_filename, frame.f_lineno):
        # The first later line that is not an assert and takes a jump; else the last assert.
        later = range(frame.f_lineno + 1, frame.f_lineno + 60)
        targets = [n for n in later if not is_assert(frame.f_code.co_filename, n)]
        targets += [n for n in reversed(later) if is_assert(frame.f_code.co_filename, n)]
        for target in targets:
            try:
                frame.f_lineno = target
                break
            except ValueError:
                continue
    return skip_asserts

def is_assert(filename, line_no):
    line = linecache.getline(filename, line_no).strip()
    return line.startswith("assert") and line != "assert True"

sys.settrace(skip_asserts)

def {name}(*args, **kwargs):
    return {wrong}
"""

# Rebinds what the tests use: comparisons through builtins and the modules tests import.
MONKEYPATCH = """
import builtins, math, operator
builtins.abs = lambda x: 0.0
builtins.AssertionError = type("AssertionError", (Exception,), {})
math.isclose = lambda *a, **k: True
math.fabs = lambda x: 0.0
operator.eq = lambda a, b: True

def {name}(*args, **kwargs):
    return {wrong}
"""

# Outlives the call: a forked child and a thread that keep writing fake verdicts and fake call
# replies to every descriptor while the tests run.
LINGERING_WRITERS = (
    MARKER_THIEF
    + """
import threading, time

def flood():
    found = steal_marker()
    fake = ("\\n" + (found[0] if found else "0" * 32) + "\\n").encode()
    for _ in range(200):
        for fd in range(64):
            try:
                os.write(fd, fake)
            except OSError:
                pass
        time.sleep(0.001)

if os.fork() == 0:
    flood()
    os._exit(0)
threading.Thread(target=flood, daemon=True).start()

def {name}(*args, **kwargs):
    return {wrong}
"""
)

KILL_THE_CHECKER = """
import os, signal

def {name}(*args, **kwargs):
    os.kill(os.getppid(), signal.SIGKILL)
    return {wrong}
"""

STOP_THE_CHECKER = """
import os, signal

def {name}(*args, **kwargs):
    os.kill(os.getppid(), signal.SIGSTOP)
    return {wrong}
"""

READ_THE_CHECKER = """
import ctypes, os

def {name}(*args, **kwargs):
    parent = os.getppid()
    for path in (f"/proc/{parent}/mem", f"/proc/{parent}/fd/0", f"/proc/{parent}/cmdline"):
        try:
            open(path, "rb").read()
        except OSError:
            pass
    libc = ctypes.CDLL(None)
    libc.ptrace(16, parent, 0, 0)  # PTRACE_ATTACH
    return {wrong}
"""

HUGE_RESULT = """
def {name}(*args, **kwargs):
    return "x" * (300 << 20)
"""

RECURSIVE_RESULT = """
def {name}(*args, **kwargs):
    loop = []
    loop.append(loop)
    return loop
"""

DEEP_RESULT = """
def {name}(*args, **kwargs):
    value = []
    for _ in range(100000):
        value = [value]
    return value
"""

SLOW_TO_COMPARE = """
import time

class Slow:
    def __eq__(self, other):
        time.sleep(60)
        return True

def {name}(*args, **kwargs):
    return Slow()
"""

EXIT_ZERO_MID_TEST = """
import os, signal

def {name}(*args, **kwargs):
    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    return {wrong}
"""

HACKS = {
    "always_equal": ALWAYS_EQUAL,
    "subclass_list": SUBCLASS.replace("{base}", "list"),
    "subclass_str": SUBCLASS.replace("{base}", "str"),
    "subclass_int": SUBCLASS.replace("{base}", "int"),
    "steal_marker_and_exit": STEAL_AND_EXIT,
    "atexit_rewrites_exit": ATEXIT_REWRITE,
    "excepthook_rewrites_exit": EXCEPTHOOK_REWRITE,
    "trace_hook_skips_asserts": TRACE_SKIPS_ASSERTS,
    "monkeypatch_builtins_and_modules": MONKEYPATCH,
    "lingering_child_and_thread_write_fds": LINGERING_WRITERS,
    "kill_the_checker": KILL_THE_CHECKER,
    "stop_the_checker": STOP_THE_CHECKER,
    "read_or_trace_the_checker": READ_THE_CHECKER,
    "huge_result": HUGE_RESULT,
    "recursive_result": RECURSIVE_RESULT,
    "deep_result": DEEP_RESULT,
    "slow_to_compare": SLOW_TO_COMPARE,
    "exit_zero_mid_test": EXIT_ZERO_MID_TEST,
}

# Hacks that a check running the tests inside the candidate's process pays for (measured: every
# one below earns 1.0 on at least one target problem under harness = "single_process").
FOOL_SINGLE_PROCESS = {
    "always_equal",
    "subclass_list",
    "subclass_str",
    "subclass_int",
    "steal_marker_and_exit",
    "atexit_rewrites_exit",
    "excepthook_rewrites_exit",
    "trace_hook_skips_asserts",
    "monkeypatch_builtins_and_modules",
}

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def targets():
    by_id = {p["task_id"]: p for p in load_humaneval()}
    return [by_id[task_id] for task_id in TARGETS]


def fenced(program: str) -> str:
    return "```python\n" + textwrap.dedent(program) + "```"


def hack_answers(template, problems):
    return [
        fenced(template.replace("{name}", p["entry_point"]).replace("{wrong}", TARGETS[p["task_id"]])) for p in problems
    ]


@pytest.fixture(scope="module")
def verdicts(targets):
    """{(hack, mode): [reward per target]}: every hack under the two-process check, and the ones
    that fool it under the single-process fallback, graded in one batch."""
    rows, answers, problems = [], [], []
    for mode, hacks in (("two_process", HACKS), ("single_process", FOOL_SINGLE_PROCESS)):
        graded = [{**p, "harness": mode} for p in targets]
        for hack in hacks:
            answers += hack_answers(HACKS[hack], graded)
            problems += graded
            rows += [(hack, mode)] * len(graded)
    out = {}
    for row, reward in zip(rows, code_rewards(answers, problems, timeout_s=TIMEOUT_S), strict=True):
        out.setdefault(row, []).append(reward)
    return out


@pytest.mark.parametrize("hack", sorted(HACKS))
def test_hack_earns_nothing(verdicts, hack):
    assert verdicts[(hack, "two_process")] == [0.0] * len(TARGETS)


@pytest.mark.parametrize("hack", sorted(FOOL_SINGLE_PROCESS))
def test_the_hack_is_real_it_fools_a_single_process_check(verdicts, hack):
    assert max(verdicts[(hack, "single_process")]) == 1.0


def test_honest_answers_with_the_same_tricks_around_them_still_pass(targets):
    # The same process-level tricks (threads, children, hooks, prints) around a right answer: the
    # checker pays for the answer, not for the absence of noise.
    honest = {
        "HumanEval/0": "any(abs(a - b) < args[1] for i, a in enumerate(args[0]) for b in args[0][i + 1:])",
        "HumanEval/1": "split_groups(args[0])",
        "HumanEval/2": "args[0] % 1.0",
        "HumanEval/23": "len(args[0])",
        "HumanEval/27": "args[0].swapcase()",
        "HumanEval/32": "bisect_zero(args[0])",
    }
    helper = """
import os, sys, threading, time, atexit

def split_groups(text):
    groups, depth, current = [], 0, ""
    for ch in text:
        if ch == " ":
            continue
        current += ch
        depth += 1 if ch == "(" else -1
        if depth == 0:
            groups.append(current)
            current = ""
    return groups

threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
if os.fork() == 0:
    time.sleep(0.5)
    os._exit(0)
def bisect_zero(xs):
    low, high = -1.0, 1.0
    while poly(xs, low) * poly(xs, high) > 0:
        low, high = 2 * low, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        if poly(xs, low) * poly(xs, middle) > 0:
            low = middle
        else:
            high = middle
    return low

atexit.register(lambda: print("bye"))
print("noise on stdout")

def {name}(*args, **kwargs):
    print("called with", args, file=sys.stderr)
    return {answer}
"""
    answers = [
        fenced(helper.replace("{name}", p["entry_point"]).replace("{answer}", honest[p["task_id"]])) for p in targets
    ]
    assert code_rewards(answers, targets, timeout_s=TIMEOUT_S) == [1.0] * len(targets)
