"""Cost of grading MATH answers safely off the main thread.

    pytest bench/bench_math_grading.py --benchmark-only -q

math-verify's own timeouts use SIGALRM, so the way a user would call it (parse + verify with the
default timeouts) only works on the main thread. `MathGrader(workers>=1)` grades in worker processes
(JSON lines over pipes) and is callable from any thread. This suite grades the same 240 completions
(fractions, decimals, LaTeX and plain forms, sets, intervals, expressions, wrong and missing answers):
- `peer_main_thread`: `math_verify.verify(parse(gold), parse(pred))`, default signal timeouts, main thread;
- `inprocess_main_thread`: `MathGrader(workers=0)` (our extraction + our setitimer limit), main thread;
- `workers1_thread` / `workers2_thread`: a warm `MathGrader(workers=N)` called from a worker thread;
- `worker_startup`: starting one worker until it has imported math-verify;
- `per_item_overhead`: 1,000 answerless items (no math-verify work): the cost of the path itself.
Each row's extra_info holds ms per completion. Results: bench/RESULTS.md.
"""

import threading

import pytest

from score.rl.rewards.math_reward import MathGrader, _Worker, extract_final_answer

ANSWER_FORMS = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\frac{2}{6}", "\\frac13"),
    ("5\\text{ cm}", "5"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("10\\%", "10"),
    ("\\$1,000", "1000"),
    ("7", "8"),
    ("\\frac{\\pi}{3}", "60"),
]
COMPLETIONS, REFERENCES = [], []
for i in range(20):
    for pred, gold in ANSWER_FORMS:
        COMPLETIONS.append(f"Step {i}: we simplify.\nFinal Answer: The final answer is ${pred}$. I hope it is correct.")
        REFERENCES.append(gold)
COMPLETIONS[::17] = ["I could not finish the problem."] * len(COMPLETIONS[::17])
N = len(COMPLETIONS)


def peer_grade():
    from math_verify import parse, verify

    out = []
    for completion, reference in zip(COMPLETIONS, REFERENCES, strict=True):
        answer = extract_final_answer(completion)
        if answer is None:
            out.append(0.0)
            continue
        out.append(float(verify(parse(f"${reference}$"), parse(f"${answer}$"))))
    return out


def in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()))
    thread.start()
    thread.join()
    return box["result"]


@pytest.fixture(scope="module")
def expected():
    return peer_grade()


def _median_s(benchmark):
    """Median seconds per call, or None under --benchmark-disable (the calls still run and are checked)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def _record(benchmark, result, expected):
    assert result == expected
    if _median_s(benchmark) is not None:
        benchmark.extra_info["ms_per_completion"] = 1e3 * _median_s(benchmark) / N


def test_peer_main_thread(benchmark, expected):
    result = benchmark.pedantic(peer_grade, rounds=3, warmup_rounds=1)
    _record(benchmark, result, expected)


def test_inprocess_main_thread(benchmark, expected):
    grader = MathGrader(workers=0)
    result = benchmark.pedantic(lambda: grader.grade(COMPLETIONS, REFERENCES), rounds=3, warmup_rounds=1)
    _record(benchmark, result, expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_thread(benchmark, expected, workers):
    with MathGrader(workers=workers) as grader:
        result = benchmark.pedantic(
            lambda: in_thread(lambda: grader.grade(COMPLETIONS, REFERENCES)), rounds=3, warmup_rounds=1
        )
    _record(benchmark, result, expected)


def test_worker_startup(benchmark):
    def start():
        worker = _Worker()
        worker.wait_ready()
        worker.close()

    benchmark.pedantic(start, rounds=3, warmup_rounds=0)
    if _median_s(benchmark) is not None:
        benchmark.extra_info["seconds"] = _median_s(benchmark)


NO_ANSWER = ["I could not finish the problem."] * 1000


@pytest.mark.parametrize("workers", [0, 1])
def test_per_item_overhead(benchmark, workers):
    """Items without an answer never reach math-verify: this isolates the per-item cost of the path
    (in-process alarm set-up vs a JSON round trip to a worker)."""
    with MathGrader(workers=workers) as grader:

        def call():
            return grader.grade(NO_ANSWER, ["1"] * len(NO_ANSWER))

        result = benchmark.pedantic((lambda: in_thread(call)) if workers else call, rounds=3, warmup_rounds=1)
    assert result == [0.0] * len(NO_ANSWER)
    if _median_s(benchmark) is not None:
        benchmark.extra_info["us_per_item"] = 1e6 * _median_s(benchmark) / len(NO_ANSWER)
