"""A decoder's weights in another dtype: the trainer's frozen reference of fp32 master weights, in the
compute dtype (bf16 on GPU). (The engine keeps copies of its own: engine/inference_model.py.)

The copy is built on the meta device and allocated straight in its dtype, so making a bf16 copy of an
fp32 model never holds a second fp32 copy.
"""

from __future__ import annotations

import torch

from .model import Transformer


def cast_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A frozen Transformer of `model`'s config, kernels and attention backend, on its device, whose
    weights are `model`'s rounded to `dtype`."""
    if not isinstance(model, Transformer):
        raise ValueError(f"cast_copy needs a score.model.Transformer, got {type(model).__name__}")
    with torch.device("meta"):
        copy = Transformer(model.config, attention_backend=model.attention_backend)
    copy = copy.to(dtype).to_empty(device=model.lm_head_weight.device)
    copy.set_kernels(model.kernels)
    copy.requires_grad_(False).eval()
    with torch.no_grad():
        for mine, theirs in zip(copy.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs)
    return copy
