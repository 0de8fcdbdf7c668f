"""Triton kernels with torch references, one op per file.

Imports only torch and triton. Each public op takes `impl="auto"|"triton"|"torch"`:
Triton on CUDA tensors, the torch reference (same chunked algorithm) elsewhere.
"""

from .fused_linear_logprob import fused_linear_logprob
from .kl_penalty import kl_penalty
from .kv_store import store_kv
from .paged_attention import PagedAttentionBuffers, PagedAttentionPlan, paged_attention, plan_paged_attention
from .rms_norm import rms_norm
from .rope import apply_rope
from .rope_kv_store import rope_store_kv
from .score_loss import ScoreLossOutput, score_loss
from .swiglu import swiglu
from .varlen_attention import varlen_attention
