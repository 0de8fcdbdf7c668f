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


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreter` run the Triton kernels on CPU tensors, which only Triton's
    interpreter does; where CUDA is present it is off, and they skip, naming the test that checks the
    same kernels compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    for item in items:
        marker = item.get_closest_marker("interpreter")
        if marker is not None:
            twin = marker.kwargs.get("twin", "tests/test_kernels_cuda.py")
            reason = f"runs Triton kernels on CPU tensors (Triton's interpreter is off here); {twin} runs them compiled"
            item.add_marker(pytest.mark.skip(reason=reason))


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
