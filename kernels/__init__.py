"""Triton kernels with torch references, one op per file.

Imports only torch and triton. Each public op takes `impl="auto"|"triton"|"torch"`:
Triton on CUDA tensors, the torch reference (same chunked algorithm) elsewhere.

This folder is installed as `score.kernels`. Run from the repository root (`python -m pytest`,
`python -c ...`), Python also finds it as a top-level `kernels`, which is Hugging Face's package of
that name (transformers imports it). Imported under that name, the module hands the import on to
the installed `kernels` (or fails as if the folder were not there): the root shadows nothing.
"""

if __name__ != "score.kernels":  # found as top-level `kernels` through the repository root
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed  # what the import statement returns once this module ends
    _spec.loader.exec_module(_installed)
else:
    from .fused_linear_logprob import fused_linear_logprob
    from .kl_penalty import kl_penalty
    from .kv_store import store_kv
    from .paged_attention import paged_attention
    from .rms_norm import rms_norm
    from .rope import apply_rope
    from .rope_kv_store import rope_store_kv
    from .score_loss import ScoreLossOutput, score_loss
    from .swiglu import swiglu
    from .varlen_attention import varlen_attention
