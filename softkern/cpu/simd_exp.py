"""A branch-free exp for @njit loops, in float32 and float64.

``np.exp`` inside a Numba loop is a call into the C library per element, and
the call stops LLVM from vectorising the loop. These versions use only
arithmetic, ``rint``, fma and integer bit operations, which LLVM turns into
SIMD code, so a loop of them runs several times faster.

Algorithm (Cody and Waite): exp(x) = 2**n * exp(r) with n = rint(x / ln 2)
and r = x - n ln 2, computed with ln 2 split in a high part (few bits, so
n * ln2_hi is exact) and a low part, so |r| <= ln 2 / 2. exp(r) is a Taylor
polynomial (degree 7 for float32, 13 for float64: the truncation error is
below half an ulp), evaluated with fused multiply-adds. 2**n is put into the
exponent field with integer operations, as two factors 2**(n//2) and
2**(n - n//2), so that results near overflow and in the subnormal range come
out right without a branch: the first product is exact and only the second
rounds. Inputs are clamped to a range where n stays small enough for that,
and the clamp already saturates to inf and 0; NaN is passed through by a
final select.

Accuracy, checked over the whole float range in tests: within 2 ulp of the
correctly rounded result, and exactly inf / 0 / NaN where exp is.
"""

from __future__ import annotations

import math

import numpy as np
from numba import float32, float64, int32, int64, njit, types
from numba.extending import intrinsic

from softkern.cpu.fma import fma


@intrinsic
def _as_float(typingctx, bits):
    """Reinterpret an int32 (int64) as the float32 (float64) with those bits."""
    if bits == types.int32:
        result = types.float32
    elif bits == types.int64:
        result = types.float64
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(result))

    return result(bits), codegen


def _make_exp(ftype, itype, bias, mantissa_bits, ln2_hi, ln2_lo, lo, hi, degree):
    """The exp of one float format; the constants are all that differ."""
    log2e = ftype(1.4426950408889634)
    ln2_hi, ln2_lo, lo, hi = ftype(ln2_hi), ftype(ln2_lo), ftype(lo), ftype(hi)
    # Taylor coefficients 1/k!, highest degree first, for Horner's rule.
    taylor = tuple(ftype(1.0 / math.factorial(k)) for k in range(degree, -1, -1))

    @njit(inline="always", cache=True)
    def pow2(n):
        # 2**n for a normal exponent n, by writing the biased exponent field.
        return _as_float(itype((n + bias) << mantissa_bits))

    @njit(cache=True)
    def exp(x):
        c = x if x < hi else hi
        c = c if c > lo else lo
        n = np.rint(c * log2e)
        r = fma(-n, ln2_hi, c)
        r = fma(-n, ln2_lo, r)
        p = taylor[0]
        for i in range(1, len(taylor)):
            p = fma(p, r, taylor[i])
        k = itype(n)
        half = k >> 1
        result = p * pow2(half) * pow2(k - half)
        return result if x == x else x

    return exp


# ln 2 = hi + lo with few bits in hi, so n * hi is exact. exp(x) overflows
# above the clamp's top and is below half the least subnormal under its
# bottom, so the clamp already saturates to inf and 0, and it keeps |n| small
# enough that 2**(n//2) and 2**(n - n//2) are both normal numbers.
exp32 = _make_exp(
    float32, int32, 127, 23, 0.693145751953125, 1.4286068203094172e-06,
    lo=-104.0, hi=89.0, degree=7,
)  # fmt: skip
exp32.__doc__ = "exp of a float32, branch-free (see the module docstring)."
exp64 = _make_exp(
    float64, int64, 1023, 52, 6.93147180369123816490e-01, 1.90821492927058770002e-10,
    lo=-746.0, hi=710.0, degree=13,
)  # fmt: skip
exp64.__doc__ = "exp of a float64, branch-free (see the module docstring)."


@njit(cache=True)
def _exp32_array(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@njit(cache=True)
def _exp64_array(x, out):
    for i in range(x.size):
        out[i] = exp64(x[i])


def exp_array(x: np.ndarray) -> np.ndarray:
    """exp of every element of a 1-D float32 or float64 array (for tests and
    benchmarks; kernels call exp32/exp64 inside their own loops)."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    if x.dtype == np.float32:
        _exp32_array(x, out)
    elif x.dtype == np.float64:
        _exp64_array(x, out)
    else:
        raise TypeError(f"exp_array takes float32 or float64, got {x.dtype}")
    return out
