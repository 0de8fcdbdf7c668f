"""Fixes for Triton's interpreter (TRITON_INTERPRET=1, how the CPU runs the GPU path) where its bf16
arithmetic differs from the compiled kernels' (seen with triton 3.6 to 3.9):

- `tl.dot` on bf16 operands multiplies raw bits: the interpreter stores bf16 tensors as uint16 and
  hands them to numpy's matmul unconverted, so a bf16 dot returns garbage. The fix upcasts bf16
  operands to fp32 first (exact: bf16 -> fp32 is lossless).
- fp32 -> bf16 casts truncate, where the GPU rounds to nearest even: a kernel that rounds an fp32
  master weight to bf16 in registers would see other numbers on the CPU than on the GPU. The fix
  rounds to nearest even.

dispatch.py applies them on import when the interpreter is on; compiled kernels are untouched.
"""

from __future__ import annotations


def apply() -> None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_score_bf16_fixes", False):
        return
    np, handle = interpreter.np, interpreter.TensorHandle
    dot, cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (handle(_bf16_bits_to_fp32(x.data), tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(_fp32_to_bf16_bits(np, src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._score_bf16_fixes = True


def _bf16_bits_to_fp32(bits):
    """bf16 bit patterns (a numpy uint16 array) as the fp32 numbers they stand for."""
    return (bits.astype("uint32") << 16).view("float32")


def _fp32_to_bf16_bits(np, values):
    """fp32 numbers (a numpy array) rounded to nearest even bf16, as bit patterns; NaN stays NaN."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).astype(np.uint16)
