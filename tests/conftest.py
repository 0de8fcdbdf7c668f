"""Test-wide setup.

On a machine without CUDA the Triton kernels run under the interpreter. The variable must be
set before the first `triton.jit` decoration is imported, which is why it lives here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.fixture
def closes():
    """Registers anything with a `close()` (trainers, reward pools) and closes it at teardown, also
    when the test fails, so no worker process outlives its test: `trainer = closes(Trainer(...))`."""
    opened = []

    def register(thing):
        opened.append(thing)
        return thing

    yield register
    for thing in reversed(opened):
        thing.close()
