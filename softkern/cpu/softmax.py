"""CPU softmax, log_softmax and their backward passes.

Rows regime (softmax over the last, contiguous dim): rows in parallel, and
for each row one fused pass in three sweeps that stay in cache: the max, the
sum of exp(x - max) (softmax keeps the exponentials in the output), then the
scaling. Columns regime (any other dim): strips of neighbouring columns whose
whole height fits in cache, strips in parallel; the same three sweeps run
along the rows of the strip, each sweep reading rows front to back, so memory
is read sequentially and nothing is transposed.

Every inner loop is branch-free so LLVM vectorises it: the max is
``llvm.maxnum`` (which skips NaN: a NaN, like a +inf or a slice of -inf,
still makes the slice NaN through the sum of exponentials), the exponential
is ``simd_exp.exp32``/``exp64``, and the sum may reassociate (fastmath
``reassoc``, on these functions only) so it is split over vector lanes.
Sums of float32 accumulate in float64: the relative error of the sum stays
near 1e-7 for rows of any length.

Every kernel takes the accumulator type from its `lowest` argument (-inf of
that type) and ``parallel``: False runs the same loops on the calling thread
(``softkern._launch.cpu_parallel`` decides from the input's size). They are
module-level functions, not closures, so Numba's on-disk cache finds them in
every process.

Memory: the output, plus per strip a few rows of `strip` numbers; nothing of
the input's size (except for float16, which Numba cannot compute with on the
CPU: its input is widened to a float32 copy, and its result computed in
float32 before it is rounded).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from softkern.cpu import parallel_kernel
from softkern.cpu.fma import maxnum
from softkern.cpu.simd_exp import exp32, exp64, log1p_unit32, log1p_unit64

# Only reassociation: no assumptions about NaN or inf (they must propagate),
# and the exp's own arithmetic keeps its exact rounding (it is compiled apart).
FASTMATH = {"reassoc"}


# Rows are split into this many work items (for any core count); each walks
# its rows in order, so per-item setup is paid once, not once per row.
ROW_CHUNKS = 256


@njit(inline="always", cache=True)
def strip_of(item, strips, strip, inner):
    """Work item `item` of the column regime: (outer index, first column,
    width) of its strip; the last strip of each outer slice may be narrower."""
    c0 = (item % strips) * strip
    return item // strips, c0, min(strip, inner - c0)


def as_acc(value, lowest):
    """`value` converted to the accumulator type, the type of `lowest`."""


@overload(as_acc, inline="always")
def _as_acc(value, lowest):
    kind = lowest
    return lambda value, lowest: kind(value)


@njit(inline="always", cache=True)
def as_acc_array(values, lowest):
    out = np.full(values.size, lowest)
    for i in range(values.size):
        out[i] = as_acc(values[i], lowest)
    return out


def exp(x):
    """The vectorisable exp of ``simd_exp`` for x's float type."""


@overload(exp, inline="always")
def _exp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    if x == types.float64:
        return lambda x: exp64(x)
    return None


def log1p_unit(e):
    """The vectorisable log1p of ``simd_exp`` for e in [0, 1]."""


@overload(log1p_unit, inline="always")
def _log1p_unit(e):
    if e == types.float32:
        return lambda e: log1p_unit32(e)
    if e == types.float64:
        return lambda e: log1p_unit64(e)
    return None


@njit(inline="always", cache=True)
def row_max(x, r, lowest):
    top = lowest
    for j in range(x.shape[1]):
        top = maxnum(top, as_acc(x[r, j], lowest))
    return top


@njit(inline="always", cache=True)
def row(x, out, r, n, log, lowest):
    """Softmax of row r: max, then exp(x - max) (kept in out) and their
    sum, then the scaling; the row stays in cache across the sweeps."""
    top = row_max(x, r, lowest)
    total = 0.0  # float64
    if log:
        for j in range(n):
            total += exp(as_acc(x[r, j], lowest) - top)
        shift = as_acc(np.log(total), lowest)
        for j in range(n):
            out[r, j] = (as_acc(x[r, j], lowest) - top) - shift
    else:
        for j in range(n):
            e = exp(as_acc(x[r, j], lowest) - top)
            out[r, j] = e
            total += e
        scale = as_acc(1.0 / total, lowest)
        for j in range(n):
            out[r, j] *= scale


@parallel_kernel(fastmath=FASTMATH)
def rows(x, out, log, lowest, parallel):
    count, n = x.shape
    if not parallel:
        for r in range(count):
            row(x, out, r, n, log, lowest)
        return
    chunks = min(count, ROW_CHUNKS)
    for chunk in prange(chunks):
        for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
            row(x, out, r, n, log, lowest)


@njit(inline="always", cache=True)
def strip_max(x, o, c0, width, lowest):
    """Column maxima of the strip x[o, :, c0:c0 + width], row by row."""
    top = np.full(width, lowest)
    for i in range(x.shape[1]):
        xr = x[o, i, c0 : c0 + width]
        for c in range(width):
            top[c] = maxnum(top[c], as_acc(xr[c], lowest))
    return top


@njit(inline="always", cache=True)
def column_strip(x, out, item, strips, strip, log, lowest):
    """Softmax of the columns of work item `item`'s strip: three sweeps
    down the strip (max, exponentials and their sums, scaling)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top = strip_max(x, o, c0, width, lowest)
    total = np.zeros(width, dtype=np.float64)
    if log:
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            for c in range(width):
                total[c] += exp(as_acc(xr[c], lowest) - top[c])
        shift = np.full(width, lowest)
        for c in range(width):
            shift[c] = as_acc(np.log(total[c]), lowest)
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            orow = out[o, i, c0 : c0 + width]
            for c in range(width):
                orow[c] = (as_acc(xr[c], lowest) - top[c]) - shift[c]
    else:
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            orow = out[o, i, c0 : c0 + width]
            for c in range(width):
                orow[c] = exp(as_acc(xr[c], lowest) - top[c])
            # A loop of its own: the float64 sums vectorise better
            # apart from the exp (measured 10-20% faster overall).
            for c in range(width):
                total[c] += orow[c]
        scale = np.full(width, lowest)
        for c in range(width):
            scale[c] = as_acc(1.0 / total[c], lowest)
        for i in range(n):
            orow = out[o, i, c0 : c0 + width]
            for c in range(width):
                orow[c] *= scale[c]


@parallel_kernel(fastmath=FASTMATH)
def columns(x, out, strip, log, lowest, parallel):
    outer, inner = x.shape[0], x.shape[2]
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            column_strip(x, out, item, strips, strip, log, lowest)
        return
    for item in prange(outer * strips):
        column_strip(x, out, item, strips, strip, log, lowest)


@njit(inline="always", cache=True)
def row_backward(g, y, out, r, log, lowest):
    n = g.shape[1]
    total = 0.0  # float64
    if log:
        for j in range(n):
            total += as_acc(g[r, j], lowest)
        s = as_acc(total, lowest)
        for j in range(n):
            out[r, j] = as_acc(g[r, j], lowest) - exp(as_acc(y[r, j], lowest)) * s
    else:
        for j in range(n):
            total += as_acc(g[r, j], lowest) * as_acc(y[r, j], lowest)
        s = as_acc(total, lowest)
        for j in range(n):
            out[r, j] = as_acc(y[r, j], lowest) * (as_acc(g[r, j], lowest) - s)


@parallel_kernel(fastmath=FASTMATH)
def rows_backward(g, y, out, log, lowest, parallel):
    count = g.shape[0]
    if not parallel:
        for r in range(count):
            row_backward(g, y, out, r, log, lowest)
        return
    for r in prange(count):
        row_backward(g, y, out, r, log, lowest)


@njit(inline="always", cache=True)
def column_strip_backward(g, y, out, item, strips, strip, log, lowest):
    n, inner = g.shape[1], g.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    wide = np.zeros(width, dtype=np.float64)
    for i in range(n):
        gr = g[o, i, c0 : c0 + width]
        yr = y[o, i, c0 : c0 + width]
        if log:
            for c in range(width):
                wide[c] += as_acc(gr[c], lowest)
        else:
            for c in range(width):
                wide[c] += as_acc(gr[c], lowest) * as_acc(yr[c], lowest)
    total = as_acc_array(wide, lowest)
    for i in range(n):
        gr = g[o, i, c0 : c0 + width]
        yr = y[o, i, c0 : c0 + width]
        orow = out[o, i, c0 : c0 + width]
        if log:
            for c in range(width):
                orow[c] = as_acc(gr[c], lowest) - exp(as_acc(yr[c], lowest)) * total[c]
        else:
            for c in range(width):
                orow[c] = as_acc(yr[c], lowest) * (as_acc(gr[c], lowest) - total[c])


@parallel_kernel(fastmath=FASTMATH)
def columns_backward(g, y, out, strip, log, lowest, parallel):
    outer, inner = g.shape[0], g.shape[2]
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            column_strip_backward(g, y, out, item, strips, strip, log, lowest)
        return
    for item in prange(outer * strips):
        column_strip_backward(g, y, out, item, strips, strip, log, lowest)


@njit(inline="always", cache=True)
def row_logsumexp(x, out, r, lowest):
    shift = row_max(x, r, lowest)
    if np.isinf(shift):
        shift = as_acc(0, lowest)
    total = 0.0  # float64
    for j in range(x.shape[1]):
        total += exp(as_acc(x[r, j], lowest) - shift)
    out[r] = as_acc(np.log(total), lowest) + shift


@parallel_kernel(fastmath=FASTMATH)
def logsumexp_rows(x, out, lowest, parallel):
    count = x.shape[0]
    if not parallel:
        for r in range(count):
            row_logsumexp(x, out, r, lowest)
        return
    for r in prange(count):
        row_logsumexp(x, out, r, lowest)


@njit(inline="always", cache=True)
def column_strip_logsumexp(x, out, item, strips, strip, lowest):
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    shift = strip_max(x, o, c0, width, lowest)
    total = np.zeros(width, dtype=np.float64)
    for c in range(width):
        if np.isinf(shift[c]):
            shift[c] = 0
    for i in range(n):
        xr = x[o, i, c0 : c0 + width]
        for c in range(width):
            total[c] += exp(as_acc(xr[c], lowest) - shift[c])
    for c in range(width):
        out[o, c0 + c] = as_acc(np.log(total[c]), lowest) + shift[c]


@parallel_kernel(fastmath=FASTMATH)
def logsumexp_columns(x, out, strip, lowest, parallel):
    """log(sum(exp(x))) over the middle axis into out[o, c], shifted by
    the max as PyTorch does (by 0 when the max is infinite, so that
    +inf gives inf and all -inf gives -inf)."""
    outer, inner = x.shape[0], x.shape[2]
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            column_strip_logsumexp(x, out, item, strips, strip, lowest)
        return
    for item in prange(outer * strips):
        column_strip_logsumexp(x, out, item, strips, strip, lowest)
