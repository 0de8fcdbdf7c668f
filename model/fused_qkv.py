"""The engine's copies of every layer's q, k and v projections, stacked into one matrix per layer.

With them a rollout forward runs one [(Hq + 2 Hkv) D, d] GEMM per layer where the model's own
forward runs three, and (engine mode, plain ops) rotates q and k in one pass, since they sit side
by side in its output. The model keeps its three HF-named parameters: checkpoints, FSDP2, the
optimizer and the training forward and backward are untouched.

The copies cost the q/k/v weights once more in memory (their share of a model is small: 5 % of
Qwen2.5-0.5B's parameters, 10 % of Llama-3-8B's). `refresh()` copies the model's current
weights into them in place: the engine calls it at the start of every generate call (the trainer
updates the weights between calls), and the tensors keep their addresses, so CUDA graphs captured
against them stay valid. gate|up is not stacked: those two matrices are 42 % of Qwen2.5-0.5B and 47 % of
Llama-3-8B, so a second copy would cost far more memory than one GEMM fewer per layer saves.

A model sharded by FSDP2 gets no copies (`FusedQKV.of` returns None): its weights are whole only
inside its own forward.
"""

from __future__ import annotations

import torch

from .decode_step import fsdp2_sharded


class FusedQKV:
    def __init__(self, model: torch.nn.Module):
        self._sources = [(layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj) for layer in model.layers]
        with torch.no_grad():
            self.weights = [torch.cat([p.weight for p in projs]) for projs in self._sources]
            self.biases = [
                None if projs[0].bias is None else torch.cat([p.bias for p in projs]) for projs in self._sources
            ]

    @classmethod
    def of(cls, model: torch.nn.Module) -> FusedQKV | None:
        """The copies for `model`, or None when it is sharded by FSDP2."""
        return None if fsdp2_sharded(model) else cls(model)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [(Hq + 2 Hkv) D, d], bias or None) of layer `layer_idx`."""
        return self.weights[layer_idx], self.biases[layer_idx]

    def refresh(self) -> None:
        """Copy the model's current q/k/v weights (and biases) into the stacked tensors, in place."""
        with torch.no_grad():
            for projs, weight, bias in zip(self._sources, self.weights, self.biases, strict=True):
                torch.cat([p.weight for p in projs], out=weight)
                if bias is not None:
                    torch.cat([p.bias for p in projs], out=bias)
