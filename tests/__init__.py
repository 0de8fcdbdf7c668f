"""The test suite (a package, so tests and benchmarks import its helpers as `tests.helpers`)."""
