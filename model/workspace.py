"""The buffers the engine's CPU decode loop reuses from step to step instead of allocating them.

On the CPU a fresh multi-MB tensor costs page faults comparable to the pass that fills it. The
same kernels write into a kept buffer as into a fresh one, so no number changes.

Two kinds, released at different times:
* vocabulary-sized ones, [S, V] per step (the logits and the sampler's intermediates): dropped at
  the end of each generate call, because S x V floats are large and the trainer runs between calls;
* the torch attention path's gathers and decode keys (`attention`), sized by the batch's context
  and kept for the engine's life.
"""

from __future__ import annotations

import math

import torch

from score.kernels import PagedAttentionBuffers


class DecodeWorkspace:
    def __init__(self):
        self.attention = PagedAttentionBuffers()
        self._vocab: dict[str, torch.Tensor] = {}  # name -> flat storage, grown on demand
        # (name, shape) -> the view handed out last: a step of the same shape gets it again instead
        # of slicing and viewing the storage anew (two dispatched ops per buffer and step)
        self._views: dict[tuple, torch.Tensor] = {}

    def vocab_buffer(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape` for the [S, V] intermediate `name`: the kept one when
        it is large enough and of the same dtype and device, else a new one kept from now on."""
        key = (name, tuple(shape))
        view = self._views.get(key)
        if view is not None and view.dtype == dtype and view.device == device:
            return view
        numel = math.prod(shape)
        buf = self._vocab.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._vocab[name] = torch.empty(numel, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name}  # views of the old storage
        view = self._views[key] = buf[:numel].view(shape)
        return view

    def drop_vocab_buffers(self) -> None:
        """Release every [S, V] buffer (the attention buffers stay)."""
        self._vocab.clear()
        self._views.clear()
