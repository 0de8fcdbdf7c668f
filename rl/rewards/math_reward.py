"""Binary MATH reward: extract the final answer, compare it with the reference using math-verify.

Extraction follows the paper's answer format: the text after the last "The final answer is" (up to
"I hope it is correct" or the end of that line, outer `$...$` and a trailing period removed), else
the content of the last `\\boxed{...}`. The extracted answer and the reference are parsed by
`math_verify.parse` and compared by `math_verify.verify` (fractions, decimals, units, sets,
intervals, LaTeX vs plain text are its job).

Timeouts. math-verify bounds its sympy work with `signal.alarm`, which only works on the main
thread of the main interpreter; a trainer that grades while the GPU runs the reference forward
calls from a worker thread. So math-verify's own timeouts are always off here and the limit is ours:
- `MathGrader(workers>=1)` grades in worker processes (safe from any thread). Each worker runs the
  grading in its own main thread under a `setitimer` deadline (soft limit, the worker survives);
  the parent also kills a worker that overruns the deadline by `kill_grace_s` (hard limit, for
  work a signal cannot interrupt) and starts a new one.
- `MathGrader(workers=0)` grades in this process with the same `setitimer` deadline: main thread only.
Workers are plain subprocesses speaking JSON lines; they load this file by path, so starting one
costs a Python start plus the math-verify import, not an import of torch through `score.rl`.

Every outcome is counted by status: correct, incorrect, no_answer, parse_failure (the extracted
answer did not parse), reference_parse_failure, timeout, error. Anything but "correct" gives 0;
nothing raises out of grading.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..data import last_boxed

STATUSES = ("correct", "incorrect", "no_answer", "parse_failure", "reference_parse_failure", "timeout", "error")

_FINAL_ANSWER = re.compile(r"final answer is", re.IGNORECASE)
_HOPE = re.compile(r"I hope it is correct", re.IGNORECASE)
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # an unescaped `$` (`\$` is a dollar sign)


@dataclass(frozen=True)
class Grade:
    """One graded completion: `reward` is 1.0 only when `status == "correct"`."""

    reward: float
    status: str
    answer: str | None  # the extracted final answer (None when there is none)


def extract_final_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring), or None when it states none."""
    if not isinstance(text, str):
        raise ValueError(f"extract_final_answer expects a str, got {type(text).__name__}")
    matches = list(_FINAL_ANSWER.finditer(text))
    if matches:
        rest = text[matches[-1].end() :]
        hope = _HOPE.search(rest)
        candidate = rest[: hope.start()] if hope else rest.split("\n", 1)[0]
        candidate = _strip_answer(candidate)
        if candidate:
            boxed = last_boxed(candidate)
            return boxed.strip() if boxed is not None and boxed.strip() else candidate
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return None


def _strip_answer(s: str) -> str:
    s = s.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _as_latex(answer: str) -> str:
    # math-verify extracts from delimited LaTeX; a bare answer gets the delimiters it would have had.
    return answer if _MATH_DELIMITER.search(answer) else f"${answer}$"


class _GradingTimeout(BaseException):
    """Raised by our own alarm. A BaseException so math-verify's `except Exception` cannot swallow it."""


class _DropTimeoutDisabled(logging.Filter):
    # math-verify warns once per process that its timeouts are off; that is deliberate here.
    def filter(self, record):
        return "Timeout is disabled" not in record.getMessage()


_TIMEOUT_WARNING_FILTER = _DropTimeoutDisabled()


def _quiet_math_verify_logs() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if _TIMEOUT_WARNING_FILTER not in logger.filters:
            logger.addFilter(_TIMEOUT_WARNING_FILTER)


def _grade_unbounded(completion: str, reference: str) -> Grade:
    from math_verify import parse, verify

    answer = extract_final_answer(completion)
    if answer is None:
        return Grade(0.0, "no_answer", None)
    gold = parse(_as_latex(reference), parsing_timeout=None)
    if not gold:
        return Grade(0.0, "reference_parse_failure", answer)
    pred = parse(_as_latex(answer), parsing_timeout=None)
    if not pred:
        return Grade(0.0, "parse_failure", answer)
    ok = verify(gold, pred, timeout_seconds=None)
    return Grade(1.0 if ok else 0.0, "correct" if ok else "incorrect", answer)


def grade_in_main_thread(completion: str, reference: str, timeout_s: float) -> Grade:
    """Grade in this process under a SIGALRM deadline; only valid on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "in-process grading uses SIGALRM and must run on the main thread; "
            "use MathGrader(workers>=1) from other threads"
        )
    _quiet_math_verify_logs()

    def on_alarm(signum, frame):
        raise _GradingTimeout()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return _grade_unbounded(completion, reference)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _GradingTimeout:
        return Grade(0.0, "timeout", extract_final_answer(completion))
    except Exception:  # a math-verify/sympy bug costs one reward, never the step
        logging.getLogger(__name__).debug("grading error", exc_info=True)
        return Grade(0.0, "error", None)
    finally:
        signal.signal(signal.SIGALRM, old_handler)


def _check_inputs(completions: Sequence[str], references: Sequence[str]) -> None:
    if len(completions) != len(references):
        raise ValueError(f"completions and references differ in length: {len(completions)} vs {len(references)}")
    for name, seq in (("completions", completions), ("references", references)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}")


class _Worker:
    """One grading subprocess with at most one item in flight."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_BOOTSTRAP],  # -P: the working folder is not on sys.path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
        )
        self.reader = self.process.stdout
        self.index: int | None = None  # item in flight
        self.deadline = 0.0

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the worker has imported math-verify, so start-up never eats an item's deadline."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.reader, selectors.EVENT_READ)
            line = self.reader.readline() if selector.select(timeout=timeout_s) else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError(
                f"math grading worker failed to start (exit code {self.process.returncode}); see its stderr above"
            )

    def send(self, index: int, completion: str, reference: str, timeout_s: float, kill_grace_s: float) -> None:
        line = json.dumps({"c": completion, "r": reference, "t": timeout_s}) + "\n"
        self.process.stdin.write(line.encode("utf-8"))
        self.process.stdin.flush()
        self.index = index
        self.deadline = time.monotonic() + timeout_s + kill_grace_s

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _kill_all(workers: list) -> None:
    for w in workers:
        w.kill()


class MathGrader:
    """Batch grading with counted failures; thread-safe, and safe off the main thread when workers >= 1.

    `counts` accumulates statuses over the grader's life (a Counter over STATUSES). `grade` returns
    rewards; `grade_detailed` returns `Grade`s (reward, status, extracted answer).
    """

    def __init__(self, workers: int = 1, *, timeout_s: float = 5.0, kill_grace_s: float = 2.0):
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not kill_grace_s > 0:
            raise ValueError(f"kill_grace_s must be > 0, got {kill_grace_s!r}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.counts: Counter = Counter({s: 0 for s in STATUSES})
        self.worker_restarts = 0
        self._pool: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self._closed = False
        self._live: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._live)

    def grade(self, completions: Sequence[str], references: Sequence[str]) -> list[float]:
        return [g.reward for g in self.grade_detailed(completions, references)]

    def grade_detailed(self, completions: Sequence[str], references: Sequence[str]) -> list[Grade]:
        _check_inputs(completions, references)
        with self._lock:
            if self._closed:
                raise RuntimeError("MathGrader is closed")
            if self.workers == 0:
                grades = [
                    grade_in_main_thread(c, r, self.timeout_s) for c, r in zip(completions, references, strict=True)
                ]
            else:
                grades = self._grade_in_workers(completions, references)
            self.counts.update(g.status for g in grades)
            return grades

    def _spawn(self, slots) -> None:
        started = []
        for slot in slots:
            worker = _Worker()
            self._pool[slot] = worker
            self._live.append(worker)
            started.append(worker)
        for worker in started:  # the workers start in parallel; wait for all of them
            worker.wait_ready()

    def _worker(self, slot: int) -> _Worker:
        if self._pool[slot] is None:
            self._spawn([slot])
        return self._pool[slot]

    def _retire(self, slot: int) -> None:
        worker = self._pool[slot]
        worker.kill()
        self._live.remove(worker)
        self._pool[slot] = None
        self.worker_restarts += 1

    def _grade_in_workers(self, completions, references) -> list[Grade]:
        results: list[Grade | None] = [None] * len(completions)
        pending = iter(range(len(completions)))
        selector = selectors.DefaultSelector()
        busy = 0

        def dispatch(slot: int) -> bool:
            index = next(pending, None)
            if index is None:
                return False
            worker = self._worker(slot)
            try:
                worker.send(index, completions[index], references[index], self.timeout_s, self.kill_grace_s)
            except OSError:  # the worker died between items: replace it and retry once
                self._retire(slot)
                worker = self._worker(slot)
                worker.send(index, completions[index], references[index], self.timeout_s, self.kill_grace_s)
            selector.register(worker.reader, selectors.EVENT_READ, slot)
            return True

        self._spawn([slot for slot, w in enumerate(self._pool) if w is None])
        for slot in range(self.workers):
            busy += dispatch(slot)
        while busy:
            now = time.monotonic()
            wait_s = max(0.0, min(w.deadline for w in self._pool if w is not None and w.index is not None) - now)
            events = selector.select(timeout=wait_s)
            finished = [key.data for key, _ in events]
            if not events:  # hard timeout: kill whoever is past its deadline
                now = time.monotonic()
                for slot, w in enumerate(self._pool):
                    if w is not None and w.index is not None and w.deadline <= now:
                        selector.unregister(w.reader)
                        results[w.index] = Grade(0.0, "timeout", extract_final_answer(completions[w.index]))
                        self._retire(slot)
                        busy -= 1
                        busy += dispatch(slot)
                continue
            for slot in finished:
                w = self._pool[slot]
                selector.unregister(w.reader)
                line = w.reader.readline()
                index, w.index = w.index, None
                try:
                    reply = json.loads(line)
                    results[index] = Grade(float(reply["reward"]), reply["status"], reply["answer"])
                except (ValueError, KeyError, TypeError):  # the worker crashed (EOF) or wrote garbage
                    results[index] = Grade(0.0, "error", None)
                    self._retire(slot)
                busy -= 1
                busy += dispatch(slot)
        selector.close()
        return results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for slot, worker in enumerate(self._pool):
                if worker is not None:
                    worker.close()
                    self._live.remove(worker)
                    self._pool[slot] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_default_graders: dict[float, MathGrader] = {}
_default_graders_lock = threading.Lock()


def math_reward(completion: str, reference: str, *, timeout_s: float = 5.0) -> float:
    """1.0 if the completion's final answer equals `reference` (math-verify), else 0.0; never raises on bad math.

    On the main thread this grades in-process; on any other thread it uses a shared one-worker
    MathGrader per timeout (started on first use). Use a MathGrader directly for batches and counts.
    """
    _check_inputs([completion], [reference])
    if threading.current_thread() is threading.main_thread():
        return grade_in_main_thread(completion, reference, timeout_s).reward
    with _default_graders_lock:
        grader = _default_graders.get(float(timeout_s))
        if grader is None:
            grader = _default_graders[float(timeout_s)] = MathGrader(workers=1, timeout_s=timeout_s)
    return grader.grade([completion], [reference])[0]


# The worker imports this module from the installed package (no torch on that path) and serves JSON lines.
_WORKER_BOOTSTRAP = "from score.rl.rewards.math_reward import _worker_main; _worker_main()"


def _worker_main() -> None:
    # Protocol replies go to the real stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import math_verify  # noqa: F401  (pay the import before the first item's deadline starts)

    protocol.write("ready\n")

    for line in sys.stdin:
        request = json.loads(line)
        grade = grade_in_main_thread(request["c"], request["r"], request["t"])
        protocol.write(json.dumps({"reward": grade.reward, "status": grade.status, "answer": grade.answer}) + "\n")
