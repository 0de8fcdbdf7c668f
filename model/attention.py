"""Causal self-attention backends for the decoder: dense batches and packed variable-length ones.

Three backends, picked per call by `backend="auto"`:
- "flash": flash-attn's `flash_attn_func` / `flash_attn_varlen_func` (the `flash` extra). Used
  automatically for CUDA tensors in fp16/bf16 when flash-attn imports; it handles GQA and packed
  sequences natively.
- "triton": score.kernels.varlen_attention, our FlashAttention-2 forward and backward over packed
  sequences (a dense [B, T] batch is B packed sequences of T). Used automatically for CUDA tensors
  when flash-attn is absent and the decoder's kernels are on (`Transformer.set_kernels`), head dims
  up to 128. No padded row is computed.
- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, everywhere else. Packed sequences are
  scattered into a zero-padded [S, max_len] batch and run with `is_causal=True`: a real query at
  position t only sees keys 0..t of its own sequence, all real, so no padding mask is needed and
  torch may pick its fused kernels. The padded rows are computed and dropped.

A missing flash-attn is never an import error: "auto" falls back to SDPA and an explicit
`backend="flash"` raises a RuntimeError that says how to install it. Cached-key attention (the
engine's decode) is not here: the engine passes its own `attn` callable to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from score.kernels.dispatch import use_triton
from score.kernels.varlen_attention import MAX_HEAD_DIM, varlen_attention

try:  # the `flash` extra; any failure to load it just means the SDPA path
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except (ImportError, OSError):  # OSError: a wheel built against another CUDA/torch
    flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("auto", "sdpa", "flash", "triton")


def flash_available() -> bool:
    return flash_attn_varlen_func is not None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash" and not flash_available():
        raise RuntimeError("attention backend 'flash' needs flash-attn: pip install 'score-rl[flash]'")
    return backend


def resolve_backend(backend: str, q: torch.Tensor, kernels: str = "auto") -> str:
    """The backend "auto" stands for, given q and the decoder's kernels setting ("auto", "triton",
    "torch": see `Transformer.set_kernels`; "torch" keeps our Triton kernels out)."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if flash_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash"
    if kernels != "torch" and use_triton(kernels, q, "attention") and q.shape[-1] <= MAX_HEAD_DIM:
        return "triton"
    return "sdpa"


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
    kernels: str = "auto",
) -> torch.Tensor:
    """Causal attention with grouped-query heads.

    Dense: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D].
    Packed: q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens int32 [S+1] -> [N, Hq, D]; attention stays
    inside each sequence. `max_seqlen` (longest sequence) saves a host sync when the caller knows it.
    `kernels`: the decoder's kernels setting, which "auto" reads (`resolve_backend`).
    """
    backend = resolve_backend(backend, q, kernels)
    if cu_seqlens is None:
        if backend == "triton":  # B sequences of T, packed by a view
            b, t = q.shape[:2]
            cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
            out = varlen_attention(*(x.flatten(0, 1) for x in (q, k, v)), cu, t, scale=scale, impl="triton")
            return out.view(q.shape)
        if backend == "flash":
            return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0
    if backend == "flash":
        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=scale,
            causal=True,
        )
    if backend == "triton":
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale, impl="triton")
    return _packed_sdpa(q, k, v, cu_seqlens, max_seqlen, scale)


def _packed_sdpa(q, k, v, cu_seqlens, max_seqlen, scale):
    n = q.shape[0]
    num_seqs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lengths, output_size=n)
    slot = torch.arange(n, device=q.device) - cu[seq_of_token]
    index = (seq_of_token, slot)

    def padded(x):  # [N, H, D] -> [S, H, max_len, D]
        out = x.new_zeros(num_seqs, max_seqlen, x.shape[1], x.shape[2]).index_put(index, x)
        return out.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)[index]
