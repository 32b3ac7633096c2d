"""A branch-free exp (and log1p on [0, 1]) for @njit loops, in float32 and
float64.

``np.exp`` inside a Numba loop is a call into the C library per element, and
the call stops LLVM from vectorising the loop. These versions use only
arithmetic, ``rint``, fma and integer bit operations, which LLVM turns into
SIMD code, so a loop of them runs several times faster.

Algorithm (Cody and Waite): exp(x) = 2**n * exp(r) with n = rint(x / ln 2)
and r = x - n ln 2, computed with ln 2 split in a high part (few bits, so
n * ln2_hi is exact) and a low part, so |r| <= ln 2 / 2. exp(r) is a
polynomial (float32: the relative minimax one of degree 6; float64: Taylor's
of degree 13; either's error is below a sixth of an ulp), evaluated with
fused multiply-adds. 2**n is put into the
exponent field with integer operations, as two factors 2**(n//2) and
2**(n - n//2), so that results near overflow and in the subnormal range come
out right without a branch: the first product is exact and only the second
rounds. Inputs are clamped to a range where n stays small enough for that,
and the clamp already saturates to inf and 0; NaN is passed through by a
final select.

Accuracy, checked over the whole float range in tests: within 2 ulp of the
correctly rounded result, and exactly inf / 0 / NaN where exp is.

``exp_nonpositive32``/``64`` serve the softmax family, whose arguments are
x - max <= 0: no top clamp, n read from the bits of a rounding sum, and 2**n
added to the polynomial's exponent field in one step, lifted so that it
stays normal and brought back by one multiply (one rounding, so subnormal
results are right): 17 vector instructions per 16 float32 instead of 24
(0.56 against 0.77 cycles per element here). Every float32 in [-104, 0] was
checked: within 1 ulp.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

from softkern.cpu.fma import fma

# The integer type of each float type's width, and back.
_SAME_WIDTH = {
    types.int32: types.float32,
    types.int64: types.float64,
    types.float32: types.int32,
    types.float64: types.int64,
}


@intrinsic
def _reinterpret(typingctx, value):
    """The value of the other kind with the same bits: an int32 (int64) as
    a float32 (float64), or a float as the integer of its width."""
    result = _SAME_WIDTH.get(value)
    if result is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(result))

    return result(value), codegen


def _as_int_like(value, like):
    """`value` converted to the integer type of `like`."""


@overload(_as_int_like, inline="always")
def _as_int_like_impl(value, like):
    kind = like
    return lambda value, like: kind(value)


class ExpConstants(NamedTuple):
    """What one float format's exp needs: ln 2 = ln2_hi + ln2_lo with few bits
    in ln2_hi (so n * ln2_hi is exact), the clamp [lo, hi], the polynomial's
    coefficients for exp(r), highest degree first (Horner's rule), the
    integer type of the same width with the exponent's bias and position,
    and, for ``exp_nonpositive_with``, the rounding constant 1.5 * 2**p (p
    the mantissa bits: adding it rounds to an integer held in the low bits),
    its bit pattern less `lift`, and 2**-lift."""

    log2e: Any
    ln2_hi: Any
    ln2_lo: Any
    lo: Any
    hi: Any
    poly: tuple
    bias: Any
    mantissa_bits: Any
    rounder: Any
    rounder_bits_less_lift: Any
    unlift: Any


def _constants(
    ftype, itype, bias, mantissa_bits, ln2_hi, ln2_lo, lo, hi, poly, lift
):  # fmt: skip
    rounder = ftype(1.5 * 2.0**mantissa_bits)
    return ExpConstants(
        log2e=ftype(1.4426950408889634),
        ln2_hi=ftype(ln2_hi),
        ln2_lo=ftype(ln2_lo),
        lo=ftype(lo),
        hi=ftype(hi),
        poly=tuple(ftype(c) for c in reversed(poly)),
        bias=itype(bias),
        mantissa_bits=itype(mantissa_bits),
        rounder=rounder,
        rounder_bits_less_lift=itype(int(np.array(rounder).view(itype)) - lift),
        unlift=ftype(2.0**-lift),
    )


# exp(x) overflows above the clamp's top and is below half the least
# subnormal under its bottom, so the clamp already saturates to inf and 0,
# and it keeps |n| small enough that 2**(n//2) and 2**(n - n//2) are both
# normal numbers. `lift` keeps 2**(n + lift) normal for every n from the
# bottom clamp up to 0 (``exp_nonpositive_with``).
#
# float32: the relative minimax polynomial of degree 6 for exp on
# [-ln 2 / 2, ln 2 / 2] (fitted by iterated weighted least squares in
# float64; with its coefficients rounded to float32 the error is 1.7e-8,
# a sixth of an ulp), one multiply-add fewer than Taylor's degree 7.
# float64: Taylor's degree 13, whose truncation error (4e-18) is below
# half an ulp.
F32 = _constants(
    np.float32, np.int32, 127, 23, 0.693145751953125, 1.4286068203094172e-06,
    lo=-104.0, hi=89.0, lift=64,
    poly=(1.0, 1.0, 0.4999999403953552, 0.16666431725025177,
          0.04166800156235695, 0.008374156430363655, 0.001384365139529109),
)  # fmt: skip
F64 = _constants(
    np.float64, np.int64, 1023, 52, 6.93147180369123816490e-01,
    1.90821492927058770002e-10, lo=-746.0, hi=710.0, lift=512,
    poly=tuple(1.0 / math.factorial(k) for k in range(14)),
)  # fmt: skip


@njit(inline="always", cache=True)
def pow2(n, c):
    """2**n for a normal exponent n, by writing the biased exponent field."""
    return _reinterpret(_as_int_like((n + c.bias) << c.mantissa_bits, c.bias))


@njit(inline="always", cache=True)
def reduced_polynomial(x, n, c):
    """exp(r) for r = x - n ln 2 (|r| <= ln 2 / 2), by the polynomial."""
    r = fma(-n, c.ln2_hi, x)
    r = fma(-n, c.ln2_lo, r)
    p = c.poly[0]
    for i in range(1, len(c.poly)):
        p = fma(p, r, c.poly[i])
    return p


@njit(inline="always", cache=True)
def exp_with(x, c):
    """exp(x) with the constants `c` of x's format (module docstring)."""
    clamped = x if x < c.hi else c.hi
    clamped = clamped if clamped > c.lo else c.lo
    n = np.rint(clamped * c.log2e)
    p = reduced_polynomial(clamped, n, c)
    k = _as_int_like(n, c.bias)
    half = k >> 1
    result = p * pow2(half, c) * pow2(k - half, c)
    return result if x == x else x


@njit(inline="always", cache=True)
def exp_nonpositive_with(t, c):
    """exp(t) for t <= 0 or NaN (a softmax's x - max), in fewer operations
    than ``exp_with``: no top clamp; n = rint(t / ln 2) read from the low
    bits of t / ln 2 + 1.5 * 2**p (one rounding, no conversion); and 2**n
    applied by adding n + lift to p's exponent field, which stays normal for
    every n down to the clamp, then one multiply by 2**-lift, whose single
    rounding makes subnormal results right. Same accuracy as ``exp_with``.

    Hazard: t > 0 is outside its domain (n + lift would overflow the
    exponent from t = 44 in float32); callers pass x - max with max taken
    over the same values.
    """
    clamped = t if t > c.lo else c.lo
    rounded = fma(clamped, c.log2e, c.rounder)
    n = rounded - c.rounder
    p = reduced_polynomial(clamped, n, c)
    # Integer sums are wide in Numba: each is cut back to the float's width.
    lifted_n = _as_int_like(_reinterpret(rounded) - c.rounder_bits_less_lift, c.bias)
    scaled = _reinterpret(
        _as_int_like(_reinterpret(p) + (lifted_n << c.mantissa_bits), c.bias)
    )
    result = scaled * c.unlift
    return result if t == t else t


@njit(cache=True)
def exp32(x):
    """exp of a float32, branch-free (see the module docstring)."""
    return exp_with(x, F32)


@njit(cache=True)
def exp64(x):
    """exp of a float64, branch-free (see the module docstring)."""
    return exp_with(x, F64)


@njit(cache=True)
def exp_nonpositive32(t):
    """exp of a float32 t <= 0 (``exp_nonpositive_with``)."""
    return exp_nonpositive_with(t, F32)


@njit(cache=True)
def exp_nonpositive64(t):
    """exp of a float64 t <= 0 (``exp_nonpositive_with``)."""
    return exp_nonpositive_with(t, F64)


def exp(x):
    """The vectorisable exp of x's float type: exp32 or exp64."""


@overload(exp, inline="always")
def _exp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    if x == types.float64:
        return lambda x: exp64(x)
    return None


def exp_nonpositive(t):
    """exp of t <= 0 (or NaN) of t's float type: exp_nonpositive32 or 64."""


@overload(exp_nonpositive, inline="always")
def _exp_nonpositive(t):
    if t == types.float32:
        return lambda t: exp_nonpositive32(t)
    if t == types.float64:
        return lambda t: exp_nonpositive64(t)
    return None


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
def _exp_array(x, out, nonpositive):
    if nonpositive:
        for i in range(x.size):
            out[i] = exp_nonpositive(x[i])
    else:
        for i in range(x.size):
            out[i] = exp(x[i])


def exp_array(x: np.ndarray, nonpositive: bool = False) -> np.ndarray:
    """exp of every element of a 1-D float32 or float64 array, by exp32/exp64
    or, with `nonpositive` (x <= 0 or NaN), exp_nonpositive32/64 (for tests
    and benchmarks; kernels call them inside their own loops)."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"exp_array takes float32 or float64, got {x.dtype}")
    out = np.empty_like(x)
    _exp_array(x, out, nonpositive)
    return out
