"""The precision contract of a run, the same in one process and under FSDP2.

- The trained (master) weights and AdamW's state are fp32 (`model.master_dtype`): AdamW's updates at
  the learning rates RL uses (1e-6 to 1e-5) are mostly below half a bf16 ulp of their weight, and
  bf16 masters would round them away.
- Every forward pass (policy, frozen reference, Stage I anchors) runs under `torch.autocast` in the
  compute dtype (`model.autocast`: bf16 on CUDA, the master dtype on CPU, unless the config says
  otherwise). Linears then run on bf16 tensor cores; norms, softmaxes and every reduction accumulate
  in fp32 (the kernels' own rule). Under FSDP2 the gathered weights are already in the compute dtype
  (its mixed-precision policy), so its all-gathers move half the bytes; autocast is the same context.
- The frozen reference is stored in the compute dtype: it is never updated.
- The engine generates from its own copy of the weights in the compute dtype, with a KV pool of that
  dtype (model/engine/inference_model.py), refreshed from the masters at each generate call.
- Checkpoints keep the masters (a resume is bit-identical); `final/` is written in
  `model.final_dtype` (by default the dtype the starting checkpoint stores).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from score.kernels.dispatch import interpreting
from score.model.cast_copy import cast_copy
from score.model.loading import stored_dtype

from .config import RunConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    master_dtype: torch.dtype  # the trained weights and the optimizer state
    compute_dtype: torch.dtype  # forward passes, the reference, the engine's weights and KV cache
    kernels: str  # Transformer.set_kernels: "auto" | "triton" | "torch"

    @classmethod
    def of(cls, cfg: RunConfig, device: torch.device) -> Precision:
        """The run's precision on `device`; a ValueError naming the key when the setting cannot run there."""
        m = cfg.model
        master = getattr(torch, m.master_dtype)
        bf16 = m.autocast == "bf16" or (m.autocast == "auto" and device.type == "cuda")
        if m.kernels == "triton" and device.type != "cuda" and not interpreting():
            raise ValueError(
                "model.kernels = 'triton' on the CPU runs the Triton kernels in Triton's interpreter: start the "
                "command with TRITON_INTERPRET=1 set (slow; for testing the GPU path), or use model.kernels = 'auto'"
            )
        return cls(device, master, torch.bfloat16 if bf16 else master, m.kernels)

    @property
    def mixed(self) -> bool:
        """Whether the forward passes compute in another dtype than the master weights are stored in."""
        return self.compute_dtype != self.master_dtype

    def autocast(self):
        """The context every forward pass of a training step runs in."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of `model` held in the compute dtype (the reference, a Stage I anchor)."""
        return cast_copy(model, self.compute_dtype)


def final_dtype(cfg: RunConfig, source: str) -> torch.dtype:
    """The dtype `final/` is exported in: model.final_dtype, or the dtype `source` stores (auto)."""
    if cfg.model.final_dtype != "auto":
        return getattr(torch, cfg.model.final_dtype)
    return stored_dtype(source)
