"""Triton kernels with torch references, one op per file (DESIGN.md §4).

Imports only torch and triton. Each public op takes `impl="auto"|"triton"|"torch"`:
Triton on CUDA tensors, the torch reference (same chunked algorithm) elsewhere.
"""
