"""Benchmarks against peers (a package, so suites import their worker modules as `bench.X`)."""
