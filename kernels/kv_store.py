"""Write new K/V rows into a paged cache through a slot mapping.

k, v [N, Hkv, D] are the new tokens' keys and values; `slot_mapping` int32 [N] gives each
token's cache row, slot = block * block_size + offset, in caches [num_blocks, block_size, Hkv, D]
(contiguous). A negative slot means "do not store" (padding tokens). One Triton program copies
one token's K and V rows; the torch reference is one `index_copy_` per cache (the CPU path).
Both write in place and return nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

_BLOCK = 1024  # elements per inner step: Hkv * D is at most a few thousand
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kn, stride_vn, row_size, BLOCK: tl.constexpr
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    for start in range(0, row_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < row_size
        k = tl.load(k_ptr + token.to(tl.int64) * stride_kn + offs, mask=ok)
        v = tl.load(v_ptr + token.to(tl.int64) * stride_vn + offs, mask=ok)
        tl.store(k_cache_ptr + slot * row_size + offs, k, mask=ok)
        tl.store(v_cache_ptr + slot * row_size + offs, v, mask=ok)


def check_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The argument checks of `store_kv` (a caller storing every layer of a step runs them once)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [N, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"rows of k {tuple(k.shape[1:])} do not match the cache's {tuple(k_cache.shape[2:])}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"k/v dtype {k.dtype}/{v.dtype} differs from the cache's {k_cache.dtype}/{v_cache.dtype}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int32:
        raise ValueError(
            f"slot_mapping must be int32 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device}, k on {k.device}")


def store_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    rows = k_cache.shape[2:]
    k_cache.view(-1, *rows).index_copy_(0, slots, k)
    v_cache.view(-1, *rows).index_copy_(0, slots, v)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 or v.stride(1) != v.shape[2]:
        k, v = k.contiguous(), v.contiguous()  # the kernel copies each token's [Hkv, D] as one row
    n = k.shape[0]
    if n == 0:
        return
    launch(
        _TABLE[k.dtype], (n,), k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), k.shape[1] * k.shape[2]
    )


def store_kv(k, v, k_cache, v_cache, slot_mapping, *, impl: str = "auto") -> None:
    """Store k/v [N, Hkv, D] at cache rows `slot_mapping` [N] (negative = skip); in place."""
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    if use_triton(impl, k, "store_kv"):
        if k.dtype not in _DTYPES:
            raise ValueError(f"the Triton path takes {_DTYPES}, got {k.dtype}")
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def _build_table() -> dict:
    table = {}
    for dtype in _DTYPES:
        ptr = "*" + triton_type(dtype)
        signature = {
            "k_ptr": ptr,
            "v_ptr": ptr,
            "k_cache_ptr": ptr,
            "v_cache_ptr": ptr,
            "slot_ptr": "*i32",
            "stride_kn": "i32",
            "stride_vn": "i32",
            "row_size": "i32",
            "BLOCK": "constexpr",
        }
        table[dtype] = Launch(_store_kv_kernel, signature, {"BLOCK": _BLOCK}, num_warps=4, num_stages=1)
    return table


_TABLE = _build_table()


def aot_launches() -> list[Launch]:
    """Every launch configuration `store_kv` can use (see kernels/aot.py)."""
    return list(_TABLE.values())
