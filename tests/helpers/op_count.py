"""The ops a call dispatches from Python, as the engine's op-count targets count them."""

from __future__ import annotations

from collections.abc import Callable

# torch's own ops and oneDNN's (the engine's CPU GEMMs: model/engine/onednn.py)
OP_NAMESPACES = ("aten::", "mkldnn::")


def top_level_ops(fn: Callable[[], object]) -> list[str]:
    """Names of the ops `fn` dispatches from Python, in order (ops called inside other ops not listed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith(OP_NAMESPACES) and e.cpu_parent is None]
