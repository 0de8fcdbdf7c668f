"""Two-attempt metrics on constructed records, edit distance against the textbook DP, the paper-style table."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from score.rl.metrics import edit_distance_ratio, format_table, levenshtein, two_attempt_metrics


def reference_levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("kitten", "sitting", 3),
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("flaw", "lawn", 2),
        ("héllo", "hello", 1),
        ("same", "same", 0),
    ],
)
def test_levenshtein_known(a, b, d):
    assert levenshtein(a, b) == d


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab c\n√é", max_size=90), st.text(alphabet="ab c\n√é", max_size=90))
def test_levenshtein_matches_dp(a, b):
    assert levenshtein(a, b) == reference_levenshtein(a, b)


def test_edit_distance_ratio():
    assert edit_distance_ratio("", "") == 0.0
    assert edit_distance_ratio("abc", "abc") == 0.0
    assert edit_distance_ratio("abc", "xyz") == 3 / 6
    assert edit_distance_ratio("abcd", "") == 1.0


def test_two_attempt_metrics_on_constructed_records():
    # 10 problems: 3 c->c, 1 c->i, 2 i->c, 4 i->i.
    r1 = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    r2 = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    answers1 = ["1", "2", "3", "4", "5", "6", "7", None, "9", "10"]
    answers2 = ["1", " 2 ", "3", "x", "15", "16", "7", None, None, "11"]
    texts1 = ["abc"] * 9 + [""]
    texts2 = ["abc"] * 8 + ["xyz", ""]
    m = two_attempt_metrics(r1, r2, answers1, answers2, texts1, texts2)
    assert m["n"] == 10
    assert m["acc_t1"] == 0.4 and m["acc_t2"] == 0.5
    assert m["delta_i2c"] == 0.2 and m["delta_c2i"] == 0.1
    assert m["delta"] == m["delta_i2c"] - m["delta_c2i"] == pytest.approx(0.1, abs=0)
    assert m["changed_frac"] == 5 / 10  # problems 4, 5, 6, 9 (answer lost), 10
    assert m["edit_ratio"] == pytest.approx((3 / 6) / 10, rel=1e-15)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_delta_identity_is_exact(pairs):
    r1 = [float(a) for a, _ in pairs]
    r2 = [float(b) for _, b in pairs]
    m = two_attempt_metrics(r1, r2)
    assert m["delta"] == m["delta_i2c"] - m["delta_c2i"]
    assert abs(m["delta"] - (m["acc_t2"] - m["acc_t1"])) < 1e-12
    assert m["changed_frac"] is None and m["edit_ratio"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (([1, 0.5], [1, 1]), r"r1\[1\] must be a binary reward 0 or 1, got 0.5"),
        (([1, 0], [1]), "r1 and r2 differ in length: 2 vs 1"),
        (([], []), "at least one problem"),
        (([1], [1], ["a"], None), "give both answers1 and answers2"),
        (([1], [1], ["a"], ["a", "b"]), "answers2 has 2 entries, expected 1"),
    ],
)
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        two_attempt_metrics(*args)


def test_format_table_like_the_paper():
    base = dict(acc_t1=0.526, acc_t2=0.414, delta=-0.112, delta_i2c=0.046, delta_c2i=0.158, n=500)
    score = dict(acc_t1=0.600, acc_t2=0.644, delta=0.044, delta_i2c=0.058, delta_c2i=0.014, n=500)
    table = format_table({"Base model": base, "SCoRe": score}, title="MATH500")
    lines = table.splitlines()
    assert lines[0] == "MATH500"
    assert [c.strip() for c in lines[1].strip("|").split("|")] == [
        "Method",
        "Acc@t1",
        "Acc@t2",
        "Δ(t1,t2)",
        "Δi→c",
        "Δc→i",
        "n",
    ]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == [
        "Base model",
        "52.6",
        "41.4",
        "-11.2",
        "4.6",
        "15.8",
        "500",
    ]
    assert [c.strip() for c in lines[4].strip("|").split("|")] == ["SCoRe", "60.0", "64.4", "+4.4", "5.8", "1.4", "500"]
    with pytest.raises(ValueError, match=r"row 'x' lacks metrics \['delta_c2i'\]"):
        format_table({"x": {k: v for k, v in base.items() if k != "delta_c2i"}})
