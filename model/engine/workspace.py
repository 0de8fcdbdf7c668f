"""The buffers the engine's CPU decode loop reuses from step to step instead of allocating them.

On the CPU a fresh multi-MB tensor costs page faults comparable to the pass that fills it. The
same kernels write into a kept buffer as into a fresh one, so no number changes.

Two kinds, released at different times:
* vocabulary-sized ones, [S, V] per step (the logits and the sampler's intermediates): dropped at
  the end of each generate call, because S x V floats are large and the trainer runs between calls;
* the torch attention path's gathers and decode keys (`attention`), sized by the batch's context
  and kept for the engine's life.

The sampler's results ([S] tokens and logprobs) live here too, with views that read them without
a dispatched op: the [S] form of the [S, 1] columns the kernels write, and numpy views for the
host's copy (`tolist` on a tensor dispatches two ops).
"""

from __future__ import annotations

import math

import torch

from .torch_attention import PagedAttentionBuffers


class DecodeWorkspace:
    def __init__(self):
        self.attention = PagedAttentionBuffers()
        self._vocab: dict[str, torch.Tensor] = {}  # name -> flat storage, grown on demand
        # (name, shape) -> the view handed out last: a step of the same shape gets it again instead
        # of slicing and viewing the storage anew (two dispatched ops per buffer and step)
        self._views: dict[tuple, torch.Tensor] = {}
        self._results: dict[tuple, SampleResults] = {}  # (rows, device) -> the sampler's kept outputs

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

    def sample_results(self, rows: int, device: torch.device) -> SampleResults:
        """Kept results of a `rows`-row sampling pass on `device`, for the sampler to write into."""
        key = (rows, torch.device(device))
        if key not in self._results:
            self._results[key] = SampleResults(rows, torch.device(device))
        return self._results[key]

    def to_lists(self, tokens: torch.Tensor, logprobs: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
        """The first `n` of the sampler's [S] tokens and logprobs as Python lists: through the kept
        numpy views when these are the workspace's CPU results, else with `tolist`."""
        kept = self._results.get((tokens.shape[0], tokens.device))
        if kept is not None and kept.tokens_np is not None and kept.tokens is tokens and kept.logprobs is logprobs:
            return kept.tokens_np[:n].tolist(), kept.logprobs_np[:n].tolist()
        return tokens[:n].tolist(), logprobs[:n].tolist()


class SampleResults:
    """A sampling pass's outputs: the [S, 1] columns its kernels write (`out=`), their [S] views
    (what `sample` returns) and, on the CPU, numpy views of those for the host's copy."""

    def __init__(self, rows: int, device: torch.device):
        self.token_column = torch.empty(rows, 1, dtype=torch.long, device=device)
        self.logprob_column = torch.empty(rows, 1, device=device)
        self.tokens, self.logprobs = self.token_column.view(-1), self.logprob_column.view(-1)
        cpu = device.type == "cpu"
        self.tokens_np = self.tokens.numpy() if cpu else None
        self.logprobs_np = self.logprobs.numpy() if cpu else None
