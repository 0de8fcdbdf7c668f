"""MATH reward: answer extraction, math-verify equivalence cases, counted failures, off-main-thread grading."""

import os
import signal
import threading

import pytest

from score.rl.rewards.math_reward import (
    STATUSES,
    Grade,
    MathGrader,
    extract_final_answer,
    grade_in_main_thread,
    math_reward,
)


def paper_format(answer):
    return f"Let me think.\nFinal Answer: The final answer is ${answer}$. I hope it is correct."


@pytest.mark.parametrize(
    "text, expected",
    [
        (paper_format("\\frac{1}{2}"), "\\frac{1}{2}"),
        ("Final Answer: The final answer is 3.5. I hope it is correct.", "3.5"),
        ("Final Answer: The final answer is 42", "42"),  # cut by length before "I hope"
        ("The final answer is $\\boxed{7}$. I hope it is correct.", "7"),
        ("First \\boxed{1}. Final Answer: The final answer is $2$. I hope it is correct.", "2"),
        ("The final answer is 1. Wait. Final Answer: The final answer is $9$. I hope it is correct.", "9"),
        ("so the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),
        ("Final Answer: The final answer is . I hope it is correct. \\boxed{4}", "4"),
        ("I have no idea.", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "completion, reference, reward",
    [
        (paper_format("\\frac{1}{2}"), "0.5", 1.0),  # \frac vs decimal
        (paper_format("0.5"), "\\frac{1}{2}", 1.0),
        (paper_format("1/2"), "\\dfrac{1}{2}", 1.0),  # plain vs latex
        (paper_format("\\frac{2}{4}"), "\\frac12", 1.0),  # unreduced fraction
        (paper_format("\\frac{1}{3}"), "0.5", 0.0),
        (paper_format("5\\text{ cm}"), "5", 1.0),  # units as \text
        (paper_format("5"), "5\\text{ inches}", 1.0),
        (paper_format("\\$1,000"), "1000", 1.0),
        (paper_format("10\\%"), "10", 1.0),
        (paper_format("x=3"), "3", 1.0),
        (paper_format("\\frac{\\sqrt{2}}{2}"), "\\sqrt{2}/2", 1.0),
        (paper_format("(-\\infty, 3]"), "(-\\infty,3]", 1.0),
        (paper_format("\\{2, 1\\}"), "\\{1,2\\}", 1.0),
        ("thus \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),  # nested \boxed fallback
        ("thus \\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt3}{2}", 0.0),
        (paper_format("4"), "3", 0.0),
        ("no answer at all", "3", 0.0),
    ],
)
def test_math_reward_equivalences(completion, reference, reward):
    assert math_reward(completion, reference) == reward


def test_statuses_are_counted_and_nothing_raises():
    grader = MathGrader(workers=0, timeout_s=1.0)
    completions = [
        paper_format("3"),
        paper_format("4"),
        "nothing",
        paper_format("3"),
        paper_format("2^{2^{2^{2^{2^{2}}}}}"),
    ]
    references = ["3", "3", "3", "", "3"]
    grades = grader.grade_detailed(completions, references)
    assert [g.status for g in grades] == ["correct", "incorrect", "no_answer", "reference_parse_failure", "timeout"]
    assert [g.reward for g in grades] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert grades[0] == Grade(1.0, "correct", "3")
    assert set(grader.counts) == set(STATUSES)
    assert grader.counts["timeout"] == 1 and grader.counts["correct"] == 1 and sum(grader.counts.values()) == 5


def test_in_process_grading_refuses_other_threads():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_catch(lambda: grade_in_main_thread("x", "1", 1.0))))
    thread.start()
    thread.join()
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def test_worker_grading_off_main_thread_matches_in_process():
    completions = [paper_format(a) for a in ("\\frac{2}{6}", "0.25", "7", "x^2+1", "\\sqrt{8}")] + ["none"]
    references = ["\\frac13", "\\frac{1}{4}", "8", "1+x^2", "2\\sqrt{2}", "1"]
    expected = MathGrader(workers=0).grade_detailed(completions, references)
    assert [g.reward for g in expected] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    out = {}
    with MathGrader(workers=2, timeout_s=5.0) as grader:
        thread = threading.Thread(target=lambda: out.update(grades=grader.grade_detailed(completions, references)))
        thread.start()
        thread.join()
        assert out["grades"] == expected
        assert grader.counts["correct"] == 4 and grader.counts["no_answer"] == 1
        thread = threading.Thread(target=lambda: out.update(single=math_reward(completions[0], references[0])))
        thread.start()
        thread.join()
        assert out["single"] == 1.0


def test_workers_import_the_installed_package_whatever_the_working_folder(tmp_path, monkeypatch):
    # A folder named `score` where the parent runs must not stand in for the package in a worker.
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "__init__.py").write_text("raise ImportError('the working folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    with MathGrader(workers=1, timeout_s=5.0) as grader:
        assert grader.grade([paper_format("\\frac{1}{2}"), paper_format("3")], ["0.5", "4"]) == [1.0, 0.0]


def test_hung_worker_is_killed_counted_and_replaced():
    with MathGrader(workers=1, timeout_s=0.3, kill_grace_s=0.3) as grader:
        assert grader.grade([paper_format("1")], ["1"]) == [1.0]
        # A stopped worker cannot answer or be interrupted by its own alarm: only the hard kill frees it.
        os.kill(grader._pool[0].process.pid, signal.SIGSTOP)
        grades = grader.grade_detailed([paper_format("1"), paper_format("2")], ["1", "2"])
        assert [g.status for g in grades] == ["timeout", "correct"]
        assert grader.worker_restarts == 1 and grader.counts["timeout"] == 1


def test_bad_inputs_are_value_errors():
    grader = MathGrader(workers=0)
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        grader.grade(["a", "b"], ["1"])
    with pytest.raises(ValueError, match=r"references\[0\] must be a str, got int"):
        grader.grade(["a"], [1])
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        MathGrader(workers=-1)


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{3} at first, but the answer is \\boxed{4}",  # only the last \boxed{} counts
        "\\boxed{3 \\text{ or } 4}",
        "\\boxed{3 or 4}",
        "\\boxed{x = 3 \\text{ or } x = 4}",
        "\\boxed{3, 4}",
        "\\boxed{\\{3, 4\\}}",
        "\\boxed{(3, 4)}",
        "\\boxed{\\pm 3}",
        "\\boxed{[2, 4]}",
        "\\boxed{(2, 4)}",
        "\\boxed{2 < x < 4}",
        "\\boxed{x > 2}",
        "\\boxed{x \\geq 3}",
    ],
)
def test_hedged_answers_around_the_reference_earn_nothing(completion):
    # One answer per completion: several candidates, a set, an interval or an inequality that
    # contains the reference is not the reference.
    assert math_reward(completion, "3") == 0.0


def test_the_last_boxed_answer_is_the_one_graded():
    assert math_reward("\\boxed{4} at first, but the answer is \\boxed{3}", "3") == 1.0


def test_an_equivalence_check_that_runs_long_times_out_without_stalling_the_batch():
    slow = "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"
    with MathGrader(workers=1, timeout_s=0.5, kill_grace_s=0.5) as grader:
        grades = grader.grade_detailed([slow, "\\boxed{3}", slow, "\\boxed{4}"], ["3", "3", "3", "4"])
    assert [g.status for g in grades] == ["timeout", "correct", "timeout", "correct"]
    assert [g.reward for g in grades] == [0.0, 1.0, 0.0, 1.0]
