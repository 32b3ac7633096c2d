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

Memory: the output, plus per strip a few rows of `strip` numbers; nothing of
the input's size (except for float16, which Numba cannot compute with on the
CPU: its input is widened to a float32 copy, and its result computed in
float32 before it is rounded).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from softkern.cpu.fma import maxnum
from softkern.cpu.simd_exp import exp32, exp64

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


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def rows(x, out, log, lowest):
    count, n = x.shape
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


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def columns(x, out, strip, log, lowest):
    outer, n, inner = x.shape
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
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


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def rows_backward(g, y, out, log, lowest):
    count, n = g.shape
    for r in prange(count):
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


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def columns_backward(g, y, out, strip, log, lowest):
    outer, n, inner = g.shape
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
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
                    orow[c] = (
                        as_acc(gr[c], lowest) - exp(as_acc(yr[c], lowest)) * total[c]
                    )
            else:
                for c in range(width):
                    orow[c] = as_acc(yr[c], lowest) * (as_acc(gr[c], lowest) - total[c])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def logsumexp_rows(x, out, lowest):
    count, n = x.shape
    for r in prange(count):
        shift = row_max(x, r, lowest)
        if np.isinf(shift):
            shift = as_acc(0, lowest)
        total = 0.0  # float64
        for j in range(n):
            total += exp(as_acc(x[r, j], lowest) - shift)
        out[r] = as_acc(np.log(total), lowest) + shift


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def logsumexp_columns(x, out, strip, lowest):
    """log(sum(exp(x))) over the middle axis into out[o, c], shifted by
    the max as PyTorch does (by 0 when the max is infinite, so that
    +inf gives inf and all -inf gives -inf)."""
    outer, n, inner = x.shape
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
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


@functools.cache
def kernels(acc_name: str) -> dict:
    """The CPU kernels computing in float32 or float64 (`acc_name`), as a dict:
    ``rows(x, out, log)`` over a (rows, n) view, ``columns(x, out, strip,
    log)`` over an (outer, n, inner) view, ``rows_backward(g, y, out, log)``,
    ``columns_backward(g, y, out, strip, log)``, ``logsumexp_rows(x, out)``
    and ``logsumexp_columns(x, out, strip)``. Inputs may have any real dtype
    and any strides; they are converted to the accumulator type on load.
    Outputs are C-contiguous.

    The kernels themselves are module-level functions that take the
    accumulator type from their last argument (-inf of that type), not
    closures: Numba's cache keys a closure by its cell contents, which hold
    dispatchers that pickle differently in every process, so closures were
    recompiled (seconds each) in every new process.
    """
    lowest = np.dtype(acc_name).type(-np.inf)
    return {
        "rows": lambda x, out, log: rows(x, out, log, lowest),
        "columns": lambda x, out, strip, log: columns(x, out, strip, log, lowest),
        "rows_backward": lambda g, y, out, log: rows_backward(g, y, out, log, lowest),
        "columns_backward": lambda g, y, out, strip, log: columns_backward(
            g, y, out, strip, log, lowest
        ),
        "logsumexp_rows": lambda x, out: logsumexp_rows(x, out, lowest),
        "logsumexp_columns": lambda x, out, strip: logsumexp_columns(
            x, out, strip, lowest
        ),
    }
