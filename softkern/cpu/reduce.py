"""CPU reductions that replay the GPU kernels' association order.

``softkern.cuda.reduce`` fixes, for a plan and a strategy, which element is
folded into which at every step. These @njit kernels perform the same folds
in the same order, so float results agree with the GPU bit for bit, but
arrange the work for a CPU: the GPU's per-thread accumulators become one
array, and "every thread adds its next element" becomes one vector add over
that array, which LLVM turns into SIMD code; the block folds touch only
block-sized arrays. Work is split over CPU threads along independent
accumulators, never along a fold, so the order stays the GPU's.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from softkern.cpu.fma import fma
from softkern.cuda.reduce import acc_dtype, identity

WARP = 32
# Accumulators are streamed in tiles that stay in L2 while every row of x
# passes through them: one tile per parallel work item.
ACC_TILE_BYTES = 128 * 1024
# Row regime work items: enough for any core count; each reuses one scratch.
ROW_CHUNKS = 256
# Columns per work item in the column regime: a few KiB of accumulators per
# item, enough to stream whole cache lines of every row.
COLUMN_CHUNK = 1024


@njit(inline="always", cache=True)
def add(a, b):
    return a + b


@njit(inline="always", cache=True)
def maximum(a, b):
    # `|`, not `or`: no branch, so LLVM turns the loop into vector selects.
    return a if (a > b) | (a != a) else b


@njit(inline="always", cache=True)
def minimum(a, b):
    return a if (a < b) | (a != a) else b


COMBINE = {"sum": add, "amax": maximum, "amin": minimum}


@functools.cache
def _folds(op: str):
    """The block folds of ``cuda.reduce.group_reducer``, replayed on arrays.

    ``fold_vector(p, strategy)`` folds the members p[0], ..., p[group-1] of
    one group (pitch 1: a row, or a whole block) into p[0]. ``fold_columns(p,
    strategy)`` folds the rows of p[group, width] into row 0, column by column
    (pitch 32: a column tile, group <= 32). Both combine the same members at
    the same step as the GPU strategy; loops run over contiguous memory so
    that LLVM can vectorise them.
    """
    combine = COMBINE[op]

    @njit(cache=True)
    def halving(p, first, step, count):
        # members first + k*step, k < count: member k folds in member k + s
        s = count // 2
        while s > 0:
            for k in range(s):
                a = first + k * step
                p[a] = combine(p[a], p[a + s * step])
            s //= 2

    @njit(cache=True)
    def fold_vector(p, strategy):
        group = p.size
        if strategy == 0:
            s = 1
            while s < group:
                for i in range(0, group - s, 2 * s):
                    p[i] = combine(p[i], p[i + s])
                s *= 2
        elif strategy == 1 or group <= WARP:
            # Shuffles inside a group of <= 32 lanes fold in halving order.
            halving(p, 0, 1, group)
        else:
            for first in range(0, group, WARP):
                halving(p, first, 1, WARP)
            halving(p, 0, WARP, group // WARP)

    @njit(cache=True)
    def fold_columns(p, strategy):
        group, width = p.shape
        if strategy == 0:
            s = 1
            while s < group:
                for i in range(0, group - s, 2 * s):
                    for w in range(width):
                        p[i, w] = combine(p[i, w], p[i + s, w])
                s *= 2
        else:
            # Strategy 2 on a column tile shuffles inside groups of <= 32
            # lanes: halving order, like strategy 1.
            s = group // 2
            while s > 0:
                for i in range(s):
                    for w in range(width):
                        p[i, w] = combine(p[i, w], p[i + s, w])
                s //= 2

    return fold_vector, fold_columns


@functools.cache
def _tile_partials(op: str):
    """Fold the blocks whose accumulators lie in acc[lo:hi] into their
    partials, as each block does, while that tile is still in cache."""
    fold_vector = _folds(op)[0]

    @njit(cache=True)
    def fold_tile(acc, lo, hi, block, strategy, partials):
        for b in range(lo // block, hi // block):
            p = acc[b * block : (b + 1) * block]
            fold_vector(p, strategy)
            partials[b] = p[0]

    return fold_tile


@functools.cache
def full_stage(op: str):
    """One launch of ``cuda.reduce.full_kernel``: the partial of every block.

    Accumulator t folds x[t], x[t + S], ... as GPU thread t does. Each CPU
    work item owns a tile of accumulators (whole blocks), streams the rows of
    x through it, then folds its blocks.
    """
    combine = COMBINE[op]
    fold_tile = _tile_partials(op)

    @njit(cache=True)
    def accumulate(x, acc, lo, hi, start):
        stride = acc.size
        rows = x.size // stride
        tail = x.size - rows * stride
        a = acc[lo:hi]
        a[:] = start
        # Four rows per pass, like the GPU's four loads in flight: the folds
        # stay in row order, and the accumulators are touched 4x less.
        k = 0
        while k + 4 <= rows:
            x0 = x[k * stride + lo : k * stride + hi]
            x1 = x[(k + 1) * stride + lo : (k + 1) * stride + hi]
            x2 = x[(k + 2) * stride + lo : (k + 2) * stride + hi]
            x3 = x[(k + 3) * stride + lo : (k + 3) * stride + hi]
            for j in range(hi - lo):
                a[j] = combine(
                    combine(combine(combine(a[j], x0[j]), x1[j]), x2[j]), x3[j]
                )
            k += 4
        for row in range(k, rows):
            xs = x[row * stride + lo : row * stride + hi]
            for j in range(hi - lo):
                a[j] = combine(a[j], xs[j])
        for j in range(lo, min(hi, tail)):
            acc[j] = combine(acc[j], x[rows * stride + j])

    @njit(parallel=True, cache=True)
    def tiles_in_parallel(x, acc, partials, width, block, strategy, start):
        for tile in prange((acc.size + width - 1) // width):
            lo = tile * width
            hi = min(lo + width, acc.size)
            accumulate(x, acc, lo, hi, start)
            fold_tile(acc, lo, hi, block, strategy, partials)

    @njit(cache=True)
    def stage(x, grid, block, strategy, start):
        acc = np.empty(grid * block, type(start))
        partials = np.empty(grid, type(start))
        width = max(block, ACC_TILE_BYTES // acc.itemsize)  # whole blocks
        if acc.size <= width:
            # One tile: starting CPU threads would cost more than it saves.
            accumulate(x, acc, 0, acc.size, start)
            fold_tile(acc, 0, acc.size, block, strategy, partials)
        else:
            tiles_in_parallel(x, acc, partials, width, block, strategy, start)
        return partials

    return stage


@functools.cache
def full_reducer(op: str):
    """Both launches of a ``FullReducePlan`` (stage 2: one block over the
    partials), in one call."""
    stage = full_stage(op)

    @njit(cache=True)
    def reduce_all(x, grid, block, strategy, start):
        partials = stage(x, grid, block, strategy, start)
        return stage(partials, 1, block, strategy, start)[0]

    return reduce_all


_fold_sum_tile = _tile_partials("sum")
_sum_stage = full_stage("sum")


@njit(cache=True)
def _dot_accumulate(x, y, acc, lo, hi, start):
    stride = acc.size
    rows = x.size // stride
    tail = x.size - rows * stride
    a = acc[lo:hi]
    a[:] = start
    k = 0
    while k + 2 <= rows:  # two rows per pass: four streams, as in full_stage
        x0 = x[k * stride + lo : k * stride + hi]
        y0 = y[k * stride + lo : k * stride + hi]
        x1 = x[(k + 1) * stride + lo : (k + 1) * stride + hi]
        y1 = y[(k + 1) * stride + lo : (k + 1) * stride + hi]
        for j in range(hi - lo):
            a[j] = fma(x1[j], y1[j], fma(x0[j], y0[j], a[j]))
        k += 2
    for row in range(k, rows):
        xs = x[row * stride + lo : row * stride + hi]
        ys = y[row * stride + lo : row * stride + hi]
        for j in range(hi - lo):
            a[j] = fma(xs[j], ys[j], a[j])
    for j in range(lo, min(hi, tail)):
        acc[j] = fma(x[rows * stride + j], y[rows * stride + j], acc[j])


@njit(parallel=True, cache=True)
def _dot_tiles_in_parallel(x, y, acc, partials, width, block, strategy, start):
    for tile in prange((acc.size + width - 1) // width):
        lo = tile * width
        hi = min(lo + width, acc.size)
        _dot_accumulate(x, y, acc, lo, hi, start)
        _fold_sum_tile(acc, lo, hi, block, strategy, partials)


@njit(cache=True)
def _dot_all(x, y, grid, block, strategy, start):
    """``cuda.reduce.dot_kernel`` (fma per element), then stage 2 as a sum."""
    acc = np.empty(grid * block, type(start))
    partials = np.empty(grid, type(start))
    width = max(block, ACC_TILE_BYTES // acc.itemsize)
    if acc.size <= width:
        _dot_accumulate(x, y, acc, 0, acc.size, start)
        _fold_sum_tile(acc, 0, acc.size, block, strategy, partials)
    else:
        _dot_tiles_in_parallel(x, y, acc, partials, width, block, strategy, start)
    return _sum_stage(partials, 1, block, strategy, start)[0]


def full_reduce(op: str, x: np.ndarray, plan, strategy: int) -> np.generic:
    """Reduce a 1-D array as the two GPU launches of a ``FullReducePlan`` do."""
    start = identity(op, acc_dtype(op, x.dtype))
    return full_reducer(op)(x, plan.grid, plan.block, strategy, start)


def dot(x: np.ndarray, y: np.ndarray, plan, strategy: int) -> np.generic:
    start = x.dtype.type(0)
    return _dot_all(x, y, plan.grid, plan.block, strategy, start)


@functools.cache
def rows_reduce(op: str):
    """``cuda.reduce.rows_kernel``: group member r folds x[row, r::group]."""
    combine = COMBINE[op]
    fold_vector = _folds(op)[0]

    @njit(parallel=True, cache=True)
    def reduce_rows(x, out, group, strategy, start):
        rows, n = x.shape
        chunks = min(ROW_CHUNKS, rows)
        for c in prange(chunks):
            p = np.empty(group, out.dtype)
            for row in range(c * rows // chunks, (c + 1) * rows // chunks):
                p[:] = start
                for base in range(0, n, group):
                    for r in range(min(group, n - base)):
                        p[r] = combine(p[r], x[row, base + r])
                fold_vector(p, strategy)
                out[row] = p[0]

    return reduce_rows


@functools.cache
def columns_reduce(op: str):
    """``cuda.reduce.columns_kernel``: part r of column c folds x[o, r::lanes, c]."""
    combine = COMBINE[op]
    fold_columns = _folds(op)[1]

    @njit(parallel=True, cache=True)
    def reduce_columns(x, out, lanes, strategy, start):
        outer, n, inner = x.shape
        tiles = (inner + COLUMN_CHUNK - 1) // COLUMN_CHUNK
        for item in prange(outer * tiles):
            o = item // tiles
            lo = (item % tiles) * COLUMN_CHUNK
            width = min(COLUMN_CHUNK, inner - lo)
            p = np.full((lanes, width), start)
            for i in range(n):
                r = i % lanes
                for c in range(width):
                    p[r, c] = combine(p[r, c], x[o, i, lo + c])
            fold_columns(p, strategy)
            for c in range(width):
                out[o, lo + c] = p[0, c]

    return reduce_columns


def reduce_dim(op: str, x: np.ndarray, out: np.ndarray, plan, strategy: int) -> None:
    """``cuda.reduce.launch_dim`` on the CPU: same plan, same order."""
    start = identity(op, acc_dtype(op, x.dtype))
    if plan.regime == "rows":
        rows_reduce(op)(x, out, plan.group, strategy, start)
    else:
        columns_reduce(op)(x, out, plan.lanes, strategy, start)
