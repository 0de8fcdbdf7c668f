"""A unit-test check split over two processes, run as one sandboxed program (stdlib only).

The host sends this file's source followed by `run_check(<candidate program>)` as the program,
and the check itself (the problem's test code, the pass marker) on stdin. `run_check` forks
first, while this process holds nothing but the candidate's own program:

- the **candidate** process (the child) closes stdin, points stdout at stderr, keeps only its
  two call pipes, runs the model's program and then answers calls: each request is a function
  name with plain-data arguments, each reply the result as plain data or the name and text of
  the exception it raised. It never sees the tests, the expected values or the verdict.
- the **harness** process (the parent) then reads the check from stdin, runs the problem's
  prelude and tests with every name the tests call on the candidate bound to a proxy, and owns
  stdout: the marker is written there after the last test passed, and nowhere else.

Calls and replies travel as JSON with every container tagged (`["L", 1, 2]` is [1, 2]), so they
can hold None, bool, int, float (inf and nan included), complex, str, bytes, tuple, list, dict and
set of exact types alone; a reply holding anything else, a subclass, a cycle, or bytes that do not
parse fails that call. Whatever object the candidate builds, the tests compare only data.
Deadlines and memory limits are the sandbox's and cover both processes (the candidate inherits
the run's rlimits; the sandbox kills both).
"""

import ast
import builtins
import json
import os
import struct
import sys

MAX_FRAME_BYTES = 64 << 20
MAX_DEPTH = 100
FRAME_HEADER = struct.Struct("=Q")


class CandidateError(BaseException):
    """A call to the candidate failed: it raised a non-builtin exception, died, or answered
    something that is not plain data. A BaseException, so a test's `except Exception` cannot
    take a dead or garbled candidate for one that raised what the test expects."""


class NotPlainData(BaseException):
    pass


def to_wire(value, depth=0, seen=None):
    """`value` as JSON-ready data with every container tagged; NotPlainData unless it is made of
    exact plain types only (no subclasses, no cycles, at most MAX_DEPTH deep)."""
    kind = type(value)
    if kind in (type(None), bool, int, float, str):
        return value
    if kind is complex:
        return ["C", value.real, value.imag]
    if kind is bytes:
        return ["B", value.hex()]
    if kind not in (tuple, list, dict, set):
        raise NotPlainData(f"a value of type {kind.__name__} is not plain data")
    if depth >= MAX_DEPTH:
        raise NotPlainData(f"plain data nested deeper than {MAX_DEPTH}")
    seen = set() if seen is None else seen
    if id(value) in seen:
        raise NotPlainData("a container that holds itself is not plain data")
    seen.add(id(value))
    if kind is dict:
        wire = ["D"] + [[to_wire(k, depth + 1, seen), to_wire(v, depth + 1, seen)] for k, v in value.items()]
    else:
        wire = [TAGS[kind]] + [to_wire(item, depth + 1, seen) for item in value]
    seen.discard(id(value))
    return wire


TAGS = {tuple: "T", list: "L", set: "S"}
CONTAINERS = {"T": tuple, "L": list, "S": set}


def from_wire(wire):
    """The plain value `wire` (as json.loads gives it) stands for; NotPlainData if it stands for none."""
    if type(wire) is not list:
        return wire  # None, bool, int, float, str: what JSON itself carries
    if not wire or type(wire[0]) is not str:
        raise NotPlainData("an untagged container")
    tag, items = wire[0], wire[1:]
    try:
        if tag in CONTAINERS:
            return CONTAINERS[tag](from_wire(item) for item in items)
        if tag == "D":
            return {from_wire(k): from_wire(v) for k, v in items}
        if tag == "C":
            real, imag = items
            return complex(float(real), float(imag))
        if tag == "B":
            (text,) = items
            return bytes.fromhex(text)
    except (TypeError, ValueError) as e:
        raise NotPlainData(f"a malformed {tag!r} value ({e})") from None
    raise NotPlainData(f"unknown tag {tag!r}")


def encode(value) -> bytes:
    return json.dumps(to_wire(value)).encode("utf-8")


def decode(data: bytes):
    """The plain value in a frame; NotPlainData when the frame holds anything else."""
    try:
        return from_wire(json.loads(data))
    except (ValueError, RecursionError, MemoryError) as e:
        raise NotPlainData(f"not plain data ({type(e).__name__})") from None


def send(fd: int, payload: bytes) -> None:
    view = memoryview(FRAME_HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int):
    """One frame's bytes, or None at end of stream."""
    header = read_exactly(fd, FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise CandidateError(f"the candidate sent a {size}-byte reply (limit {MAX_FRAME_BYTES})")
    return read_exactly(fd, size)


def read_exactly(fd: int, size: int):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the candidate process ----------------------------------------------------------------


def serve_candidate(candidate_source: str, requests: int, replies: int) -> None:
    """Run the model's program, then answer calls until the harness closes the request pipe."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    low, high = sorted((requests, replies))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 16)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(candidate_source, "candidate.py", "exec"), namespace)
        send(replies, b"ready")
    except BaseException as e:  # the program did not load: every call will fail
        send(replies, json.dumps(["load", type(e).__name__, str(e)[:2000]]).encode())
        return
    while (request := receive(requests)) is not None:
        name, args, kwargs = decode(request)
        try:
            if name not in namespace:
                raise NameError(f"name {name!r} is not defined")
            reply = b"R" + encode(namespace[name](*args, **kwargs))
        except BaseException as e:
            reply = b"E" + json.dumps([builtin_kind(e), str(e)[:2000]]).encode()
        send(replies, reply)


def builtin_kind(error: BaseException) -> str:
    """The name of the nearest builtin class of `error` (ValueError for `class Bad(ValueError)`),
    so a test that expects a builtin exception sees one when the candidate raises a subclass."""
    return next(c.__name__ for c in type(error).__mro__ if c.__module__ == "builtins")


# ---- the harness process ------------------------------------------------------------------


class Channel:
    def __init__(self, requests: int, replies: int):
        self.requests, self.replies = requests, replies
        self.ready = None

    def wait_ready(self) -> None:
        if self.ready is None:
            frame = receive(self.replies)
            if frame == b"ready":
                self.ready = ""
            elif frame is None:
                self.ready = "the candidate process ended before its program finished loading"
            else:
                try:
                    _, kind, text = json.loads(frame)
                    self.ready = f"the candidate's program failed to load: {kind}: {text}"
                except ValueError:
                    self.ready = "the candidate answered garbage while loading"
        if self.ready:
            raise CandidateError(self.ready)

    def call(self, name: str, args: tuple, kwargs: dict):
        try:
            request = encode((name, args, kwargs))
        except NotPlainData as e:
            raise NotPlainData(
                f"score-harness: an argument to {name}() cannot cross to the candidate process ({e}); "
                "grade this problem with harness = 'single_process'"
            ) from None
        self.wait_ready()
        try:
            send(self.requests, request)
            frame = receive(self.replies)
        except OSError as e:
            raise CandidateError(f"the call pipe to the candidate broke during {name}(): {e}") from None
        if frame is None:
            raise CandidateError(f"the candidate process ended during a call to {name}()")
        if frame[:1] == b"R":
            try:
                return decode(frame[1:])
            except NotPlainData as e:
                raise CandidateError(f"{name}() returned something that is not plain data: {e}") from None
        if frame[:1] == b"E":
            try:
                kind, text = json.loads(frame[1:])
                kind, text = str(kind), str(text)
            except (ValueError, TypeError):
                raise CandidateError(f"{name}() answered garbage") from None
            error = getattr(builtins, kind, None)
            if isinstance(error, type) and issubclass(error, Exception) and error.__module__ == "builtins":
                raise error(text)
            raise CandidateError(f"{name}() raised {kind}: {text}")
        raise CandidateError(f"{name}() answered garbage")


class CandidateFunction:
    """What the tests see as the function under test: each call runs in the candidate process."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<candidate {self.__name__}>"


def free_names(source: str, defined) -> list:
    """Names `source` reads that neither it nor `defined` nor builtins provide: what the tests
    expect the candidate's program to define."""
    tree = ast.parse(source)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    loaded = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    return sorted({n for n in loaded if n not in bound and n not in defined and not hasattr(builtins, n)})


def run_harness(check: dict, channel: Channel) -> None:
    """The problem's prelude and tests with the candidate's functions proxied; the marker last."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(check["prelude"], "problem.py", "exec"), namespace)
    names = set(check["candidate_names"]) | set(free_names(check["tests"], namespace))
    for name in sorted(names):
        namespace[name] = CandidateFunction(channel, name)
    exec(compile(check["tests"], "tests.py", "exec"), namespace)
    sys.stdout.write(check["marker"] + "\n")
    sys.stdout.flush()


def run_check(candidate_source: str) -> None:
    """Fork the candidate, then read the check from stdin and run it (see the module docstring)."""
    requests_read, requests_write = os.pipe()
    replies_read, replies_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(requests_write)
            os.close(replies_read)
            serve_candidate(candidate_source, requests_read, replies_write)
            code = 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never return into the harness's code
    os.close(requests_read)
    os.close(replies_write)
    check = json.loads(read_all(0))
    channel = Channel(requests_write, replies_read)
    run_harness(check, channel)
    os.close(requests_write)
