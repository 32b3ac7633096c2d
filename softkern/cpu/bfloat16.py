"""bfloat16 on the CPU, from its bits.

A bfloat16 is the top half of a float32: widening shifts its 16 bits up
(exact, and one vector shift per 16 elements), narrowing rounds a float32's
low 16 bits away to nearest, ties to even, as PyTorch's and ml_dtypes' casts
do (NaN stays a quiet NaN with its sign; overflow rounds to inf). Numba has
no bfloat16 type, so the kernels take bfloat16 arrays as uint16 (their
bits: ``softkern._dtypes.kernel_view``) and ``softmax.as_acc`` and
``reduce.combine`` widen such elements as they load them: no float32 copy
of an input is ever made. Results are computed in float32 and narrowed where
they are stored (``narrow_into``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from softkern.cpu import parallel_kernel


@intrinsic
def _bits_as_float32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits`."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _float32_bits(typingctx, value):
    """The bit pattern of the float32 `value`, as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always", cache=True)
def widen(bits):
    """The float32 value of a bfloat16 given as its uint16 `bits` (exact)."""
    return _bits_as_float32(np.uint32(np.uint32(bits) << np.uint32(16)))


@njit(cache=True)  # LLVM inlines it; Numba's inlining tripped an SSA check
def narrow(value):
    """The bits of float32 `value` rounded to bfloat16, to nearest even.

    Adding 0x7FFF plus the lowest kept bit carries into the kept half
    exactly when the dropped half is above one half, or equal to it with
    the kept half odd; a carry out of the largest finite value gives inf's
    pattern. NaN instead keeps its top bits with the quiet bit set (adding
    could carry a NaN into inf)."""
    bits = _float32_bits(value)
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + odd) >> np.uint32(16)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x40)
    return np.uint16(quiet if value != value else rounded)


# Below this many elements narrowing stays on the calling thread.
NARROW_PARALLEL_MIN = 1 << 18
NARROW_CHUNK = 1 << 14


@parallel_kernel()
def narrow_into(src, dst):
    """dst[i] = narrow(src[i]) over two flat arrays (float32 in, bfloat16
    bits out), in chunks over the threads for large arrays."""
    n = src.size
    if n < NARROW_PARALLEL_MIN:
        for i in range(n):
            dst[i] = narrow(src[i])
        return
    chunks = (n + NARROW_CHUNK - 1) // NARROW_CHUNK
    for c in prange(chunks):
        s = src[c * NARROW_CHUNK : min(n, (c + 1) * NARROW_CHUNK)]
        d = dst[c * NARROW_CHUNK : min(n, (c + 1) * NARROW_CHUNK)]
        for i in range(s.size):
            d[i] = narrow(s[i])
