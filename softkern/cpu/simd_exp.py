"""A branch-free exp (and log1p on [0, 1]) for @njit loops, in float32 and
float64.

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
from typing import Any, NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

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


def _as_int_like(value, like):
    """`value` converted to the integer type of `like`."""


@overload(_as_int_like, inline="always")
def _as_int_like_impl(value, like):
    kind = like
    return lambda value, like: kind(value)


class ExpConstants(NamedTuple):
    """What one float format's exp needs: ln 2 = ln2_hi + ln2_lo with few bits
    in ln2_hi (so n * ln2_hi is exact), the clamp [lo, hi], the Taylor
    coefficients 1/k!, highest degree first (Horner's rule), and the integer
    type of the same width with the exponent's bias and position."""

    log2e: Any
    ln2_hi: Any
    ln2_lo: Any
    lo: Any
    hi: Any
    taylor: tuple
    bias: Any
    mantissa_bits: Any


def _constants(ftype, itype, bias, mantissa_bits, ln2_hi, ln2_lo, lo, hi, degree):
    return ExpConstants(
        log2e=ftype(1.4426950408889634),
        ln2_hi=ftype(ln2_hi),
        ln2_lo=ftype(ln2_lo),
        lo=ftype(lo),
        hi=ftype(hi),
        taylor=tuple(ftype(1.0 / math.factorial(k)) for k in range(degree, -1, -1)),
        bias=itype(bias),
        mantissa_bits=itype(mantissa_bits),
    )


# exp(x) overflows above the clamp's top and is below half the least
# subnormal under its bottom, so the clamp already saturates to inf and 0,
# and it keeps |n| small enough that 2**(n//2) and 2**(n - n//2) are both
# normal numbers.
F32 = _constants(
    np.float32, np.int32, 127, 23, 0.693145751953125, 1.4286068203094172e-06,
    lo=-104.0, hi=89.0, degree=7,
)  # fmt: skip
F64 = _constants(
    np.float64, np.int64, 1023, 52, 6.93147180369123816490e-01,
    1.90821492927058770002e-10, lo=-746.0, hi=710.0, degree=13,
)  # fmt: skip


@njit(inline="always", cache=True)
def pow2(n, c):
    """2**n for a normal exponent n, by writing the biased exponent field."""
    return _as_float(_as_int_like((n + c.bias) << c.mantissa_bits, c.bias))


@njit(inline="always", cache=True)
def exp_with(x, c):
    """exp(x) with the constants `c` of x's format (module docstring)."""
    clamped = x if x < c.hi else c.hi
    clamped = clamped if clamped > c.lo else c.lo
    n = np.rint(clamped * c.log2e)
    r = fma(-n, c.ln2_hi, clamped)
    r = fma(-n, c.ln2_lo, r)
    p = c.taylor[0]
    for i in range(1, len(c.taylor)):
        p = fma(p, r, c.taylor[i])
    k = _as_int_like(n, c.bias)
    half = k >> 1
    result = p * pow2(half, c) * pow2(k - half, c)
    return result if x == x else x


@njit(cache=True)
def exp32(x):
    """exp of a float32, branch-free (see the module docstring)."""
    return exp_with(x, F32)


@njit(cache=True)
def exp64(x):
    """exp of a float64, branch-free (see the module docstring)."""
    return exp_with(x, F64)


class Log1pConstants(NamedTuple):
    """log1p on [0, 1] in one float format: the odd series of 2 atanh(s),
    coefficients 1 / (2k + 1) highest first (Horner's rule in s**2), ln 2,
    and sqrt(2) - 1, above which 1 + e is halved first."""

    series: tuple
    ln2: Any
    split: Any
    one: Any  # 1 and 2 of the format: a Python 2 would make float32 float64
    two: Any


def _log1p_constants(ftype, terms):
    return Log1pConstants(
        series=tuple(ftype(1.0 / (2 * k + 1)) for k in range(terms - 1, -1, -1)),
        ln2=ftype(math.log(2.0)),
        split=ftype(math.sqrt(2.0) - 1.0),
        one=ftype(1.0),
        two=ftype(2.0),
    )


# |s| <= 0.1716, so s**2 <= 0.0295 and the series' tail after `terms` terms
# is below half an ulp: 5 terms for float32, 11 for float64.
L32 = _log1p_constants(np.float32, 5)
L64 = _log1p_constants(np.float64, 11)


@njit(inline="always", cache=True)
def log1p_unit_with(e, c):
    """log(1 + e) for 0 <= e <= 1 (NaN passes through), branch-free.

    With f = e, or f = (e - 1) / 2 and ln 2 added when e > sqrt(2) - 1 (so
    that 1 + e = 2 (1 + f)), log1p(f) = 2 atanh(s) with s = f / (2 + f),
    |s| <= 0.1716: an odd series in s. s is formed from f directly, never
    from 1 + f, so a tiny e keeps its full relative precision.
    """
    high = e > c.split
    f = (e - c.one) / c.two if high else e
    s = f / (c.two + f)
    t = s * s
    p = c.series[0]
    for i in range(1, len(c.series)):
        p = fma(p, t, c.series[i])
    result = c.two * s * p
    return result + c.ln2 if high else result


# NumPy's error model: Python's tests every division for zero, which keeps
# the callers' loops from vectorising.
@njit(cache=True, error_model="numpy")
def log1p_unit32(e):
    """log1p of a float32 in [0, 1], branch-free (``log1p_unit_with``)."""
    return log1p_unit_with(e, L32)


@njit(cache=True, error_model="numpy")
def log1p_unit64(e):
    """log1p of a float64 in [0, 1], branch-free (``log1p_unit_with``)."""
    return log1p_unit_with(e, L64)


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
