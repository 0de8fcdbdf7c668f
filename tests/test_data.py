"""JSONL problem loading: field mapping, \\boxed{} answers, and errors that name file and line."""

import builtins
import json

import pytest

from score.rl.data import Problem, last_boxed, load_hf_dataset, load_jsonl, problems_from_records


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b^{2}}}} end", "\\sqrt{\\frac{a}{b^{2}}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{x+1}", "x+1"),
        ("$\\boxed 7$.", "7"),
        ("no box here", None),
        ("\\boxed{unclosed {", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_math_style_and_explicit_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {
                "problem": "What is 1/2 + 1/2?",
                "solution": "We get $\\boxed{\\dfrac{2}{2}}$, i.e. \\boxed{1}.",
                "level": "Level 1",
            },
            "",
            {"problem": "Nested?", "solution": "Hence \\boxed{\\frac{\\sqrt{3}}{2}}."},
        ],
    )
    problems = load_jsonl(path)
    assert problems == [
        Problem(
            "math.jsonl:1",
            "What is 1/2 + 1/2?",
            "1",
            {"solution": "We get $\\boxed{\\dfrac{2}{2}}$, i.e. \\boxed{1}.", "level": "Level 1"},
        ),
        Problem(
            "math.jsonl:3", "Nested?", "\\frac{\\sqrt{3}}{2}", {"solution": "Hence \\boxed{\\frac{\\sqrt{3}}{2}}."}
        ),
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", [{"uid": 7, "q": "2+2?", "a": 4}, {"uid": "x", "q": "3+3?", "a": "6"}])
    problems = load_jsonl(path, question_key="q", answer_key="a", id_key="uid")
    assert [(p.id, p.question, p.answer) for p in problems] == [("7", "2+2?", "4"), ("x", "3+3?", "6")]


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (['{"problem": "a", "solution": "\\\\boxed{1}"}', '{"problem": "b", '], {}, "bad.jsonl line 2: invalid JSON"),
        (
            [{"problem": "a", "solution": "no answer"}],
            {},
            "bad.jsonl line 1: solution field 'solution' has no complete \\boxed",
        ),
        ([{"question": "a", "solution": "\\boxed{1}"}], {}, "bad.jsonl line 1: missing field 'problem' (question_key)"),
        ([{"problem": "a"}], {"answer_key": "answer"}, "bad.jsonl line 1: missing answer field 'answer'"),
        ([{"problem": "a", "answer": None}], {"answer_key": "answer"}, "must be a string or number, got NoneType"),
        ([{"problem": 3, "answer": "1"}], {"answer_key": "answer"}, "field 'problem' must be a string, got int"),
        (["[1, 2]"], {}, "bad.jsonl line 1: expected a JSON object, got list"),
        (
            [{"id": 1, "problem": "a", "answer": 1}, {"id": 1, "problem": "b", "answer": 2}],
            {"answer_key": "answer", "id_key": "id"},
            "bad.jsonl line 2: duplicate problem id '1' (first on line 1)",
        ),
        ([""], {}, "no problems"),
    ],
)
def test_errors_name_file_and_line(tmp_path, rows, kwargs, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        load_jsonl(path, **kwargs)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_records_mapping_names_row():
    rows = [{"problem": "a", "solution": "\\boxed{2}"}, {"problem": "b", "solution": "none"}]
    with pytest.raises(ValueError, match=r"ds\[test\] row 1: solution field"):
        problems_from_records(rows, "ds[test]")
    assert problems_from_records(rows[:1], "ds")[0] == Problem("ds:0", "a", "2", {"solution": "\\boxed{2}"})


def test_hf_loader_without_datasets_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"pip install 'score-rl\[data\]'"):
        load_hf_dataset("some/math")


def test_hf_loader_maps_rows_through_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "1+1?", "final": 2, "uid": "a"}, {"question": "2+2?", "final": "4", "uid": "b"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_hf_dataset(
        "org/set", split="test", config="main", question_key="question", answer_key="final", id_key="uid"
    )
    assert calls == [("org/set", "main", "test")]
    assert [(p.id, p.question, p.answer) for p in problems] == [("a", "1+1?", "2"), ("b", "2+2?", "4")]
