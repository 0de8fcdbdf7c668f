"""Test-wide setup.

On a machine without CUDA the Triton kernels run under the interpreter. The variable must be
set before the first `triton.jit` decoration is imported, which is why it lives here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
