"""Work around a Triton interpreter bug: `tl.dot` on bf16 operands multiplies raw bits.

The interpreter stores bf16 tensors as uint16 and its `create_dot` hands them to `np.matmul`
unconverted (seen with triton 3.9), so a bf16 dot returns garbage on CPU while the compiled GPU
kernel is correct. Tests that run bf16 kernels under TRITON_INTERPRET=1 call `apply()`, which
upcasts bf16 dot operands to fp32 first (exact: bf16 -> fp32 is lossless). Nothing changes when
the interpreter is off or the bug is absent.
"""

import numpy as np


def apply() -> None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_score_bf16_dot_patch", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_to_fp32(a.data), tl.float32) if a.dtype.scalar == tl.bfloat16 else a
            b = interpreter.TensorHandle(_bf16_to_fp32(b.data), tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._score_bf16_dot_patch = True


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
