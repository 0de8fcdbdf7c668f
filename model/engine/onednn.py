"""The engine's GEMMs on CPU through oneDNN's inner product, with the op that follows fused in.

torch's fp32 `F.linear` on CPU calls MKL's sgemm. For the shapes of a rollout (a decode step's
few rows against every weight, a prefill's few thousand) oneDNN's inner product, which torch
ships beside it (`torch.ops.mkldnn._linear_pointwise`, the op inductor lowers CPU linears to),
runs the same products faster on the CPUs we measured (bench/RESULTS.md), and applies an
epilogue to the fp32 result in the same pass:

    linear(x, w, b)           x @ w.T (+ b)
    linear_silu(x, w)         silu(x @ w.T)          (SwiGLU's gate)
    linear_mul(x, w, other)   (x @ w.T) * other      (SwiGLU's up times the gate)
    linear_add(x, w, other)   (x @ w.T (+ b)) + other (a projection and its residual add)

Each sum is accumulated in fp32, but in oneDNN's order, not MKL's: results differ from
`F.linear`'s in the last bits, so the engine's log-probs are not the training forward's bit for
bit (they never are across a GPU engine and trainer either; the trainer logs the gap). The op has
no autograd formula: `usable` admits only fp32 CPU tensors with autograd off, the engine's case.
A torch without oneDNN (non-x86 builds may lack it) runs the plain ops instead.
"""

from __future__ import annotations

import torch


def _available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - registered only in builds with oneDNN
    except (AttributeError, RuntimeError):
        return False
    return True


AVAILABLE = _available()


def usable(x: torch.Tensor) -> bool:
    """Whether `x`'s GEMMs may go through oneDNN: fp32 on the CPU, autograd off, oneDNN built in."""
    return AVAILABLE and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N])."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ weight.T): oneDNN's "swish" epilogue, x * sigmoid(x)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "swish", [], "")


def linear_mul(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T) * other, other [..., N] shaped like the product."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "mul")


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(x @ weight.T (+ bias)) + other, other [..., N] shaped like the product."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")
