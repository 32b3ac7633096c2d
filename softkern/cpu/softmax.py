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
from numba import float32, float64, njit, prange

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


@functools.cache
def kernels(acc_name: str):
    """The CPU kernels computing in float32 or float64 (`acc_name`).

    Returns a namespace-like dict: ``rows(x, out, log)`` over a (rows, n) view,
    ``columns(x, out, strip, log)`` over an (outer, n, inner) view,
    ``rows_backward(g, y, out, log)`` and ``columns_backward(g, y, out,
    strip, log)``. Inputs may have any real dtype and any strides; they are
    converted to the accumulator type on load. Outputs are C-contiguous.
    """
    acc = float32 if acc_name == "float32" else float64
    exp = exp32 if acc_name == "float32" else exp64
    neg_inf = acc(-np.inf)

    @njit(inline="always", cache=True)
    def row_max(x, r):
        top = neg_inf
        for j in range(x.shape[1]):
            top = maxnum(top, acc(x[r, j]))
        return top

    @njit(inline="always", cache=True)
    def row(x, out, r, n, log):
        """Softmax of row r: max, then exp(x - max) (kept in out) and their
        sum, then the scaling; the row stays in cache across the sweeps."""
        top = row_max(x, r)
        total = 0.0  # float64
        if log:
            for j in range(n):
                total += exp(acc(x[r, j]) - top)
            shift = acc(np.log(total))
            for j in range(n):
                out[r, j] = (acc(x[r, j]) - top) - shift
        else:
            for j in range(n):
                e = exp(acc(x[r, j]) - top)
                out[r, j] = e
                total += e
            scale = acc(1.0 / total)
            for j in range(n):
                out[r, j] *= scale

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def rows(x, out, log):
        count, n = x.shape
        chunks = min(count, ROW_CHUNKS)
        for chunk in prange(chunks):
            for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
                row(x, out, r, n, log)

    @njit(inline="always", cache=True)
    def strip_max(x, o, c0, width):
        """Column maxima of the strip x[o, :, c0:c0 + width], row by row."""
        top = np.full(width, neg_inf, dtype=acc)
        for i in range(x.shape[1]):
            xr = x[o, i, c0 : c0 + width]
            for c in range(width):
                top[c] = maxnum(top[c], acc(xr[c]))
        return top

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def columns(x, out, strip, log):
        outer, n, inner = x.shape
        strips = (inner + strip - 1) // strip
        for item in prange(outer * strips):
            o, c0, width = strip_of(item, strips, strip, inner)
            top = strip_max(x, o, c0, width)
            total = np.zeros(width, dtype=np.float64)
            if log:
                for i in range(n):
                    xr = x[o, i, c0 : c0 + width]
                    for c in range(width):
                        total[c] += exp(acc(xr[c]) - top[c])
                shift = np.empty(width, dtype=acc)
                for c in range(width):
                    shift[c] = acc(np.log(total[c]))
                for i in range(n):
                    xr = x[o, i, c0 : c0 + width]
                    orow = out[o, i, c0 : c0 + width]
                    for c in range(width):
                        orow[c] = (acc(xr[c]) - top[c]) - shift[c]
            else:
                for i in range(n):
                    xr = x[o, i, c0 : c0 + width]
                    orow = out[o, i, c0 : c0 + width]
                    for c in range(width):
                        orow[c] = exp(acc(xr[c]) - top[c])
                    # A loop of its own: the float64 sums vectorise better
                    # apart from the exp (measured 10-20% faster overall).
                    for c in range(width):
                        total[c] += orow[c]
                scale = np.empty(width, dtype=acc)
                for c in range(width):
                    scale[c] = acc(1.0 / total[c])
                for i in range(n):
                    orow = out[o, i, c0 : c0 + width]
                    for c in range(width):
                        orow[c] *= scale[c]

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def rows_backward(g, y, out, log):
        count, n = g.shape
        for r in prange(count):
            total = 0.0  # float64
            if log:
                for j in range(n):
                    total += acc(g[r, j])
                s = acc(total)
                for j in range(n):
                    out[r, j] = acc(g[r, j]) - exp(acc(y[r, j])) * s
            else:
                for j in range(n):
                    total += acc(g[r, j]) * acc(y[r, j])
                s = acc(total)
                for j in range(n):
                    out[r, j] = acc(y[r, j]) * (acc(g[r, j]) - s)

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def columns_backward(g, y, out, strip, log):
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
                        wide[c] += acc(gr[c])
                else:
                    for c in range(width):
                        wide[c] += acc(gr[c]) * acc(yr[c])
            total = wide.astype(acc)
            for i in range(n):
                gr = g[o, i, c0 : c0 + width]
                yr = y[o, i, c0 : c0 + width]
                orow = out[o, i, c0 : c0 + width]
                if log:
                    for c in range(width):
                        orow[c] = acc(gr[c]) - exp(acc(yr[c])) * total[c]
                else:
                    for c in range(width):
                        orow[c] = acc(yr[c]) * (acc(gr[c]) - total[c])

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def logsumexp_rows(x, out):
        count, n = x.shape
        for r in prange(count):
            shift = row_max(x, r)
            if np.isinf(shift):
                shift = acc(0)
            total = 0.0  # float64
            for j in range(n):
                total += exp(acc(x[r, j]) - shift)
            out[r] = acc(np.log(total)) + shift

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def logsumexp_columns(x, out, strip):
        """log(sum(exp(x))) over the middle axis into out[o, c], shifted by
        the max as PyTorch does (by 0 when the max is infinite, so that
        +inf gives inf and all -inf gives -inf)."""
        outer, n, inner = x.shape
        strips = (inner + strip - 1) // strip
        for item in prange(outer * strips):
            o, c0, width = strip_of(item, strips, strip, inner)
            shift = strip_max(x, o, c0, width)
            total = np.zeros(width, dtype=np.float64)
            for c in range(width):
                if np.isinf(shift[c]):
                    shift[c] = 0
            for i in range(n):
                xr = x[o, i, c0 : c0 + width]
                for c in range(width):
                    total[c] += exp(acc(xr[c]) - shift[c])
            for c in range(width):
                out[o, c0 + c] = acc(np.log(total[c])) + shift[c]

    return {
        "logsumexp_columns": logsumexp_columns,
        "logsumexp_rows": logsumexp_rows,
        "rows": rows,
        "columns": columns,
        "rows_backward": rows_backward,
        "columns_backward": columns_backward,
    }
