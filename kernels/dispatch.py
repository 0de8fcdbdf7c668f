"""Which implementation of an op runs: the `impl="auto"|"triton"|"torch"` argument every op takes.

"auto" runs the Triton kernel on CUDA tensors and the torch reference elsewhere. "triton" on CPU
tensors works only under Triton's interpreter (`TRITON_INTERPRET=1`, what the CPU tests use);
anywhere else it would fail deep inside the launch, so it is refused up front.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET set to anything but 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, tensor: torch.Tensor, op: str) -> bool:
    """Whether `op` should run its Triton kernel on `tensor`'s device for this `impl`.

    A ValueError naming `op` for an unknown impl, or for impl="triton" where no kernel can run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not (tensor.is_cuda or interpreting()):
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got tensors on {tensor.device}"
        )
    return impl == "triton" or (impl == "auto" and tensor.is_cuda)


if interpreting():
    from . import interpreter_bf16

    interpreter_bf16.apply()
