"""pytest-benchmark as its users type it.

    pytest bench/ --benchmark-only                      every CPU benchmark, timed (GPU-only ones skip)
    pytest bench/ --benchmark-disable                   each benchmark once, small: a smoke test (CI)
    pytest bench/ --benchmark-only --benchmark-json=out.json   then --benchmark-compare=out.json

Under --benchmark-disable the suites read SCORE_BENCH_SMOKE=1 (set here, before they are imported)
and shrink their workloads to sizes that prove the code runs end to end; their figures then mean
nothing. The environment variable also reaches the worker processes some suites start.
"""

import os

SMOKE_ENV = "SCORE_BENCH_SMOKE"


def pytest_configure(config):
    if config.getoption("benchmark_disable", default=False):
        os.environ[SMOKE_ENV] = "1"
