"""GPU softmax, log_softmax and their backward passes: one launch per call.

The input is viewed as (outer, n, inner) around the softmax dim, and
``softkern._launch.softmax_plan`` picks one of four regimes:

- ``warp``: inner == 1 and the row is at most 1 KiB (256 float32). A warp
  owns a row and holds it in registers (each lane keeps `values` elements,
  lane l the elements l, l + 32, ...): one read, one write, no shared memory
  for the row.
- ``shared``: inner == 1 and the row fits the block's shared-memory cache.
  A block owns a row, copies it into shared memory while taking the max, and
  never reads global memory again.
- ``stream``: inner == 1, longer rows. A block owns a row and reads it twice:
  first an online max and sum of exponentials (Milakov and Gimelshein 2018),
  then to normalise and write.
- ``columns``: inner > 1. A block is a tile of 32 columns by block / 32
  threads along the softmax dim, so that a warp reads 32 neighbouring
  addresses of one row; each thread keeps an online max and sum over its
  part of the column, the parts are merged, then the column is written.

Every in-block max and sum goes through ``cuda.reduce.group_reducer``, so the
three reduction strategies (``reduce=0/1/2``) can be compared inside softmax
too. Factories take the block size as an argument so tests can build 32- and
64-thread kernels for the simulator; the launch configuration itself is
chosen in ``softkern._launch``, never here.

Special values follow PyTorch: NaN anywhere in a slice, a +inf, or a slice of
only -inf make the whole slice NaN; -inf elements among finite ones give 0.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import config, cuda, float32, int64
from numba.np.numpy_support import from_dtype

from softkern._dtypes import dtype_named, is_bfloat16
from softkern._launch import MAX_GRID, WARP, softmax_acc_dtype
from softkern.cuda.convert import (
    kernel_dtype,
    loader,
    narrow_bits,
    storer,
    widen_bits,
)
from softkern.cuda.reduce import FULL_MASK, group_reducer, maximum

FORWARD = ("softmax", "log_softmax")
BACKWARD = ("softmax_backward", "log_softmax_backward")
# Output dtypes the kernels write; float16 and bfloat16 output is computed
# in float32.
OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def bounded_kernel(block: int):
    """``cuda.jit`` for a kernel launched with `block` threads a block: the
    launch bound lets ptxas budget registers for that block size (the
    simulator's jit takes no launch bounds)."""
    if config.ENABLE_CUDASIM:
        return cuda.jit
    return cuda.jit(launch_bounds=block)


def _types(out_dtype):
    """(accumulator numba type, the store of an output element (a cast, or
    bfloat16's rounding to bits: ``cuda.convert.storer``), accumulator
    dtype)."""
    acc = softmax_acc_dtype(out_dtype)
    return from_dtype(acc), storer(np.dtype(out_dtype)), acc


def _input_loader(x_dtype, out_dtype):
    """``load(x[i])`` of the forward kernels: an element of an `x_dtype`
    array (None: any dtype but bfloat16, converted by Numba) rounded to the
    output dtype first, as torch.softmax's dtype= casts x before computing,
    then in the accumulator type."""
    acc, out_type, _ = _types(out_dtype)
    out_dtype = np.dtype(out_dtype)
    if x_dtype is not None and is_bfloat16(x_dtype):
        if out_dtype.itemsize > 2 or is_bfloat16(out_dtype):
            # float32 holds every bfloat16: nothing to round
            @cuda.jit(device=True, inline=True)
            def load_bits(v):
                return acc(widen_bits(v))

            return load_bits

        @cuda.jit(device=True, inline=True)
        def load_bits_as_half(v):
            return acc(out_type(widen_bits(v)))

        return load_bits_as_half
    if is_bfloat16(out_dtype):

        @cuda.jit(device=True, inline=True)
        def load_as_bfloat16(v):
            # x (float64: via float32, a double rounding) rounded to bfloat16
            return widen_bits(narrow_bits(float32(v)))

        return load_as_bfloat16

    @cuda.jit(device=True, inline=True)
    def load(v):
        # dtype= casts x before computing (as torch.softmax): a float64 x
        # with dtype=float16 rounds to float16 first, then computes in float32.
        return acc(out_type(v))

    return load


@functools.cache
def group_broadcaster(group: int, pitch: int, block: int, dtype):
    """Device function giving every member of a group its member 0's value.

    Groups are laid out as in ``group_reducer`` (members base + r * pitch).
    A group within one warp (pitch 1, group <= 32) uses one shfl_sync from
    the group's first lane; otherwise member 0 writes a shared slot that all
    members read.

    Launch config: 1-D blocks of `block` threads; every thread of the block
    calls it the same number of times (it holds barriers when group > 32).
    """
    nbtype = from_dtype(np.dtype(dtype))

    if pitch == 1 and group <= WARP:

        @cuda.jit(device=True, inline=True)
        def broadcast_in_warp(value):
            lane = cuda.threadIdx.x % WARP
            return cuda.shfl_sync(FULL_MASK, value, lane - lane % group)

        return broadcast_in_warp

    @cuda.jit(device=True)
    def broadcast_shared(value):
        slots = cuda.shared.array(block, nbtype)
        tid = cuda.threadIdx.x
        if pitch == 1:
            slot, member = tid // group, tid % group
        else:
            slot, member = tid % pitch, tid // pitch
        if member == 0:
            slots[slot] = value
        cuda.syncthreads()
        value = slots[slot]
        cuda.syncthreads()  # hazard: slots are written again on the next call
        return value

    return broadcast_shared


def block_folds(strategy: int, group: int, pitch: int, block: int, dtype):
    """(fold_max, fold_sum, broadcast) of a group's values: the in-block max
    and sum with `strategy`, and the group-wide broadcast of a result.

    Launch config: as ``group_reducer`` and ``group_broadcaster``.
    """
    return (
        group_reducer("amax", strategy, group, pitch, block, dtype),
        group_reducer("sum", strategy, group, pitch, block, dtype),
        group_broadcaster(group, pitch, block, dtype),
    )


@functools.cache
def group_stats(strategy: int, group: int, pitch: int, block: int, dtype):
    """Device function merging per-thread online (max, sum) pairs of a group.

    Each member passes its running max `m` and its sum `d` of exp(x - m);
    every member gets the group's (M, D): M = max of the m, then
    D = sum of d * exp(m - M), both folded with `strategy`. A member with no
    finite contribution (m = -inf) adds d * 0: 0, so a row of -inf keeps
    D = 0 and its softmax is NaN, as in PyTorch, or NaN when it saw a NaN; a
    +inf makes D NaN through exp(inf - inf).

    Launch config: as ``group_reducer`` and ``group_broadcaster``.
    """
    fold_max, fold_sum, broadcast = block_folds(strategy, group, pitch, block, dtype)
    zero = np.dtype(dtype).type(0)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def merge(m, d):
        top = broadcast(fold_max(m))
        # d * 0, not 0: a thread that saw only NaN (and -inf) keeps m = -inf
        # and d = NaN, and that NaN must still reach the slice.
        scaled = d * math.exp(m - top) if m != neg_inf else d * zero
        return top, broadcast(fold_sum(scaled))

    return merge


@functools.cache
def log_of(dtype):
    """Device function: log(total) for a sum of exponentials, -inf at 0.

    The GPU's log gives -inf at 0 already; the explicit case keeps the
    simulator (Python's math.log raises at 0) on the same results. NaN stays
    NaN (the comparison is false)."""
    zero = np.dtype(dtype).type(0)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def safe_log(total):
        return neg_inf if total == zero else math.log(total)

    return safe_log


@functools.cache
def online_update(dtype):
    """Device function folding element v into a running max m and sum d of
    exp(x - m): a larger v rescales d (the Milakov–Gimelshein step); -inf adds
    nothing (exp(-inf - -inf) would be NaN); NaN fails both tests, so it makes
    d NaN and with it the whole slice.
    """
    one = np.dtype(dtype).type(1)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def update(m, d, v):
        if v > m:
            return v, d * math.exp(m - v) + one
        if v != neg_inf:
            d += math.exp(v - m)
        return m, d

    return update


@cuda.jit(device=True, inline=True)
def tile_column(item, tiles, lane):
    """(outer index, column) that `lane` reads in column tile `item`, with
    `tiles` tiles of 32 columns per outer slice; the column may be past the
    end in the last tile."""
    return item // tiles, (item % tiles) * WARP + lane


def _group_layout(regime: str, block: int) -> tuple[int, int]:
    """(group, pitch) of the threads that share one slice in `regime`: a warp
    per row, a block per row, or block / 32 threads down each of 32 columns."""
    if regime == "columns":
        return block // WARP, WARP
    if regime == "warp":
        return WARP, 1
    return block, 1


@functools.cache
def forward_kernel(
    kind: str,
    regime: str,
    strategy: int,
    block: int,
    values: int,
    cache: int,
    dtype,
    x_dtype=None,
):
    """softmax or log_softmax kernel for one regime of ``SoftmaxPlan``.

    `dtype` is the output dtype; inputs of any real dtype are converted on
    load (`x_dtype` bfloat16: x holds bfloat16 bits; None: any other dtype).
    `values` (warp regime) is the number of elements a lane holds, `cache`
    (shared regime) the shared-memory row capacity in elements.

    Launch config: ``SoftmaxPlan``: [grid, block]; (rows, n) views for the
    row regimes, (outer, n, inner) for "columns".
    """
    acc, out_type, acc_dt = _types(dtype)
    zero = acc_dt.type(0)
    one = acc_dt.type(1)
    neg_inf = acc_dt.type(-np.inf)
    log = kind == "log_softmax"
    group, pitch = _group_layout(regime, block)
    fold_max, fold_sum, broadcast = block_folds(strategy, group, pitch, block, acc_dt)
    merge = group_stats(strategy, group, pitch, block, acc_dt)
    update = online_update(acc_dt)
    safe_log = log_of(acc_dt)

    load = _input_loader(x_dtype, dtype)

    @cuda.jit(device=True, inline=True)
    def scale_of(total):
        # softmax multiplies by 1 / sum; log_softmax subtracts log(sum). A
        # sum of 0 (a slice of -inf) gives NaN either way: exp(NaN) * inf
        # and NaN - -inf.
        return safe_log(total) if log else one / total

    @cuda.jit(device=True, inline=True)
    def finish(v, top, scale):
        # v: the input element (log_softmax, or softmax from the input) or,
        # for softmax from a cache, exp(v - top) already
        if log:
            return out_type((v - top) - scale)
        return out_type(math.exp(v - top) * scale)

    if regime == "warp":
        rows_per_block = block // WARP

        @bounded_kernel(block)
        def softmax_warp(x, out):
            """A warp per row, the row in registers: lane l holds elements
            l, l + 32, ..., (values of them); read once, written once."""
            row_values = cuda.local.array(values, acc)
            tid = cuda.threadIdx.x
            lane = tid % WARP
            rows, n = x.shape
            items = (rows + rows_per_block - 1) // rows_per_block
            item = int64(cuda.blockIdx.x)
            while item < items:  # uniform over the block: folds hold barriers
                row = item * rows_per_block + tid // WARP
                valid = row < rows
                top = neg_inf
                for k in range(values):  # constant trip count: unrolled
                    j = lane + k * WARP
                    v = neg_inf
                    if valid and j < n:
                        v = load(x[row, j])
                    row_values[k] = v
                    top = maximum(top, v)
                top = broadcast(fold_max(top))
                total = zero
                for k in range(values):
                    if lane + k * WARP < n:
                        e = math.exp(row_values[k] - top)
                        total += e
                        if not log:
                            row_values[k] = e
                total = broadcast(fold_sum(total))
                if valid:
                    scale = scale_of(total)
                    for k in range(values):
                        j = lane + k * WARP
                        if j < n:
                            if log:
                                out[row, j] = finish(row_values[k], top, scale)
                            else:
                                out[row, j] = out_type(row_values[k] * scale)
                item += cuda.gridDim.x

        return softmax_warp

    if regime == "shared":

        @bounded_kernel(block)
        def softmax_shared(x, out):
            """A block per row, cached in shared memory: each thread keeps
            the elements it loads (j = tid, tid + block, ...) and reads only
            those back, so the cache itself needs no barrier."""
            row_cache = cuda.shared.array(cache, acc)
            tid = cuda.threadIdx.x
            rows, n = x.shape
            row = int64(cuda.blockIdx.x)
            while row < rows:  # uniform over the block
                top = neg_inf
                j = tid
                while j < n:
                    v = load(x[row, j])
                    row_cache[j] = v
                    top = maximum(top, v)
                    j += block
                top = broadcast(fold_max(top))
                total = zero
                j = tid
                while j < n:
                    e = math.exp(row_cache[j] - top)
                    total += e
                    if not log:
                        row_cache[j] = e
                    j += block
                total = broadcast(fold_sum(total))
                scale = scale_of(total)
                j = tid
                while j < n:
                    if log:
                        out[row, j] = finish(row_cache[j], top, scale)
                    else:
                        out[row, j] = out_type(row_cache[j] * scale)
                    j += block
                row += cuda.gridDim.x

        return softmax_shared

    if regime == "stream":

        @bounded_kernel(block)
        def softmax_stream(x, out):
            """A block per row, read twice: thread t keeps an online max and
            sum over elements t, t + block, ...; the block merges them; a
            second read normalises and writes."""
            tid = cuda.threadIdx.x
            rows, n = x.shape
            row = int64(cuda.blockIdx.x)
            while row < rows:  # uniform over the block
                top = neg_inf
                total = zero
                j = tid
                while j < n:
                    top, total = update(top, total, load(x[row, j]))
                    j += block
                top, total = merge(top, total)
                scale = scale_of(total)
                j = tid
                while j < n:
                    out[row, j] = finish(load(x[row, j]), top, scale)
                    j += block
                row += cuda.gridDim.x

        return softmax_stream

    lanes = block // WARP

    @bounded_kernel(block)
    def softmax_columns(x, out):
        """Tiles of 32 columns: thread (c, r) = (tid % 32, tid // 32) keeps
        an online max and sum over x[o, r, c], x[o, r + lanes, c], ... (a
        warp reads 32 neighbouring addresses); the column's lanes merge;
        a second read normalises and writes."""
        tid = cuda.threadIdx.x
        lane = tid % WARP
        part = tid // WARP
        outer, n, inner = x.shape
        tiles = (inner + WARP - 1) // WARP
        item = int64(cuda.blockIdx.x)
        while item < outer * tiles:  # uniform over the block
            o, c = tile_column(item, tiles, lane)
            top = neg_inf
            total = zero
            if c < inner:
                i = part
                while i < n:
                    top, total = update(top, total, load(x[o, i, c]))
                    i += lanes
            top, total = merge(top, total)
            if c < inner:
                scale = scale_of(total)
                i = part
                while i < n:
                    out[o, i, c] = finish(load(x[o, i, c]), top, scale)
                    i += lanes
            item += cuda.gridDim.x

    return softmax_columns


@functools.cache
def backward_kernel(kind: str, regime: str, strategy: int, block: int, dtype):
    """Gradient of softmax or log_softmax with respect to its input.

    softmax: out = y * (g - sum(g * y)); log_softmax: out = g - exp(y) *
    sum(g), with g the gradient of the output and y the forward output.
    One sum per slice, then one elementwise pass that reads g and y again
    (from L2 for rows that were just read). Row regimes share the forward
    plan's groups (a warp per row for "warp", a block per row otherwise).

    Launch config: ``SoftmaxPlan``: [grid, block].
    """
    _, out_type, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)
    zero = acc_dt.type(0)
    log = kind == "log_softmax_backward"
    group, pitch = _group_layout(regime, block)
    fold_sum = group_reducer("sum", strategy, group, pitch, block, acc_dt)
    broadcast = group_broadcaster(group, pitch, block, acc_dt)

    @cuda.jit(device=True, inline=True)
    def term(g, y):
        return g if log else g * y

    @cuda.jit(device=True, inline=True)
    def grad(g, y, total):
        return out_type(g - math.exp(y) * total if log else y * (g - total))

    if regime != "columns":
        rows_per_block = block // group

        @bounded_kernel(block)
        def backward_rows(g, y, out):
            """`group` threads per row: member r sums elements r, r + group,
            ...; the group folds and broadcasts; then each member writes
            the same elements."""
            tid = cuda.threadIdx.x
            member = tid % group
            rows, n = g.shape
            items = (rows + rows_per_block - 1) // rows_per_block
            item = int64(cuda.blockIdx.x)
            while item < items:  # uniform over the block
                row = item * rows_per_block + tid // group
                total = zero
                if row < rows:
                    j = member
                    while j < n:
                        total += term(load(g[row, j]), load(y[row, j]))
                        j += group
                total = broadcast(fold_sum(total))
                if row < rows:
                    j = member
                    while j < n:
                        out[row, j] = grad(load(g[row, j]), load(y[row, j]), total)
                        j += group
                item += cuda.gridDim.x

        return backward_rows

    lanes = block // WARP

    @bounded_kernel(block)
    def backward_columns(g, y, out):
        """Tiles of 32 columns by `lanes` threads, as ``softmax_columns``."""
        tid = cuda.threadIdx.x
        lane = tid % WARP
        part = tid // WARP
        outer, n, inner = g.shape
        tiles = (inner + WARP - 1) // WARP
        item = int64(cuda.blockIdx.x)
        while item < outer * tiles:  # uniform over the block
            o, c = tile_column(item, tiles, lane)
            total = zero
            if c < inner:
                i = part
                while i < n:
                    total += term(load(g[o, i, c]), load(y[o, i, c]))
                    i += lanes
            total = broadcast(fold_sum(total))
            if c < inner:
                i = part
                while i < n:
                    out[o, i, c] = grad(load(g[o, i, c]), load(y[o, i, c]), total)
                    i += lanes
            item += cuda.gridDim.x

    return backward_columns


@functools.cache
def logsumexp_kernel(regime: str, strategy: int, block: int, dtype):
    """log(sum(exp(x))) of each slice into out, shifted by the slice's max
    as PyTorch does (by 0 when the max is infinite: +inf gives inf, a slice
    of -inf gives -inf, NaN propagates). Two reads: max, then the sum.

    regime "warp" (a warp per row), "shared"/"stream" (a block per row) or
    "columns" (32-column tiles), as ``SoftmaxPlan``; out is (rows,) or
    (outer, inner).

    Launch config: ``SoftmaxPlan``: [grid, block].
    """
    _, out_type, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)
    zero = acc_dt.type(0)
    neg_inf = acc_dt.type(-np.inf)
    inf = acc_dt.type(np.inf)
    group, pitch = _group_layout(regime, block)
    fold_max, fold_sum, broadcast = block_folds(strategy, group, pitch, block, acc_dt)
    safe_log = log_of(acc_dt)

    @cuda.jit(device=True, inline=True)
    def finite_or_zero(top):
        return zero if (top == inf) | (top == neg_inf) else top

    if regime != "columns":
        rows_per_block = block // group

        @bounded_kernel(block)
        def logsumexp_rows(x, out):
            tid = cuda.threadIdx.x
            member = tid % group
            rows, n = x.shape
            items = (rows + rows_per_block - 1) // rows_per_block
            item = int64(cuda.blockIdx.x)
            while item < items:  # uniform over the block
                row = item * rows_per_block + tid // group
                valid = row < rows
                top = neg_inf
                if valid:
                    j = member
                    while j < n:
                        top = maximum(top, load(x[row, j]))
                        j += group
                shift = finite_or_zero(broadcast(fold_max(top)))
                total = zero
                if valid:
                    j = member
                    while j < n:
                        total += math.exp(load(x[row, j]) - shift)
                        j += group
                total = fold_sum(total)
                if valid and member == 0:
                    out[row] = out_type(safe_log(total) + shift)
                item += cuda.gridDim.x

        return logsumexp_rows

    lanes = block // WARP

    @bounded_kernel(block)
    def logsumexp_columns(x, out):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        part = tid // WARP
        outer, n, inner = x.shape
        tiles = (inner + WARP - 1) // WARP
        item = int64(cuda.blockIdx.x)
        while item < outer * tiles:  # uniform over the block
            o, c = tile_column(item, tiles, lane)
            top = neg_inf
            if c < inner:
                i = part
                while i < n:
                    top = maximum(top, load(x[o, i, c]))
                    i += lanes
            shift = finite_or_zero(broadcast(fold_max(top)))
            total = zero
            if c < inner:
                i = part
                while i < n:
                    total += math.exp(load(x[o, i, c]) - shift)
                    i += lanes
            total = fold_sum(total)
            if c < inner and part == 0:
                out[o, c] = out_type(safe_log(total) + shift)
            item += cuda.gridDim.x

    return logsumexp_columns


# --- few long rows: the "split" regime -----------------------------------------


@functools.cache
def shift_of(dtype):
    """Device function: the shift of a slice's exponentials, its max, or 0
    when the max is infinite (+inf then sums to inf, a slice of -inf to 0:
    logsumexp's convention); NaN stays NaN. Constants of `dtype`, so that a
    float32 kernel compares in float32."""
    zero = np.dtype(dtype).type(0)
    inf = np.dtype(dtype).type(np.inf)

    @cuda.jit(device=True, inline=True)
    def shift(top):
        return zero if (top == inf) | (top == -inf) else top

    return shift


@functools.cache
def split_partials_kernel(
    strategy: int, block: int, out_dtype, x_dtype=None, cast=True
):
    """Stage 1 of the split regime: a block per segment of a row, each
    writing its segment's max and its sum of exp(x - shift) (``_shift_of``)
    into tops[row, segment] and sums[row, segment]. Two reads of the
    segment (max, then sum), while it is in L2.

    Loads as the forward kernels (`cast`: x rounded to the output dtype
    first, as dtype= asks; `x_dtype` bfloat16: x holds its bits) or as
    logsumexp's (`cast` False).

    Launch config: ``SoftmaxPlan`` "split": [plan.grid, plan.block], items
    = rows * segments walked grid-stride; x (rows, n); tops, sums (rows,
    segments) of the accumulator type.
    """
    _, _, acc_dt = _types(out_dtype)
    if cast:
        load = _input_loader(x_dtype, out_dtype)
    else:
        load = loader(np.dtype(out_dtype), acc_dt)
    fold_max, fold_sum, broadcast = block_folds(strategy, block, 1, block, acc_dt)
    zero = acc_dt.type(0)
    neg_inf = acc_dt.type(-np.inf)
    _shift_of = shift_of(acc_dt)

    @bounded_kernel(block)
    def split_partials(x, tops, sums):
        tid = cuda.threadIdx.x
        rows, n = x.shape
        segments = tops.shape[1]
        width = (n + segments - 1) // segments
        item = int64(cuda.blockIdx.x)
        while item < rows * segments:  # uniform over the block
            row = item // segments
            segment = item - row * segments
            lo = segment * width
            hi = min(n, lo + width)
            top = neg_inf
            j = lo + tid
            while j < hi:
                top = maximum(top, load(x[row, j]))
                j += block
            top = broadcast(fold_max(top))
            shift = _shift_of(top)
            total = zero
            j = lo + tid
            while j < hi:
                total += math.exp(load(x[row, j]) - shift)
                j += block
            total = fold_sum(total)
            if tid == 0:
                tops[row, segment] = top
                sums[row, segment] = total
            item += cuda.gridDim.x

    return split_partials


@functools.cache
def split_merge_kernel(strategy: int, block: int, out_dtype, pair: bool = False):
    """Stage 2 of the split regime: one block per row merges the segments'
    (max, sum) pairs into the row's shift (its max, or 0 when infinite) and
    S = sum of sums[s] * exp(shift_s - shift), shift_s each segment's
    (``shift_of``); a segment of -inf only (sum 0) adds nothing, so that
    0 * exp(huge) never makes a NaN. Writes out[row] = log(S) + shift
    (logsumexp), or with `pair` out[row, 0] = shift and out[row, 1] = S for
    softmax's third stage, which then scales exactly as the one-block
    regimes do.

    Launch config: [min(rows, MAX_GRID), plan.block], rows walked
    grid-stride; tops, sums (rows, segments) of the accumulator type; out
    (rows,) of `out_dtype`, or (rows, 2) of the accumulator type (`pair`).
    """
    _, out_type, acc_dt = _types(out_dtype)
    fold_max, fold_sum, broadcast = block_folds(strategy, block, 1, block, acc_dt)
    safe_log = log_of(acc_dt)
    zero = acc_dt.type(0)
    neg_inf = acc_dt.type(-np.inf)
    _shift_of = shift_of(acc_dt)

    @bounded_kernel(block)
    def split_merge(tops, sums, out):
        tid = cuda.threadIdx.x
        rows, segments = tops.shape
        row = int64(cuda.blockIdx.x)
        while row < rows:  # uniform over the block
            top = neg_inf
            s = tid
            while s < segments:
                top = maximum(top, tops[row, s])
                s += block
            shift = _shift_of(broadcast(fold_max(top)))
            total = zero
            s = tid
            while s < segments:
                part = sums[row, s]
                if part != zero:
                    total += part * math.exp(_shift_of(tops[row, s]) - shift)
                s += block
            total = fold_sum(total)
            if tid == 0:
                if pair:
                    out[row, 0] = shift
                    out[row, 1] = total
                else:
                    out[row] = out_type(safe_log(total) + shift)
            row += cuda.gridDim.x

    return split_merge


@functools.cache
def split_apply_kernel(kind: str, block: int, out_dtype, x_dtype=None):
    """Stage 3 of the split regime: softmax exp(x - shift) / S, log_softmax
    (x - shift) - log(S), from the row's (shift, S) of stage 2 (as the
    one-block regimes finish, so the error is theirs). S is +inf or NaN
    exactly when the row holds +inf or NaN: the row is then NaN throughout,
    as PyTorch's; a row of -inf gets 0 / 0 = NaN too.

    Launch config: [plan.grid, plan.block], one thread per element,
    grid-stride; x, out (rows, n); stats (rows, 2) of the accumulator type.
    """
    load = _input_loader(x_dtype, out_dtype)
    _, out_type, acc_dt = _types(out_dtype)
    one = acc_dt.type(1)
    inf = acc_dt.type(np.inf)
    safe_log = log_of(acc_dt)
    log = kind == "log_softmax"

    @bounded_kernel(block)
    def split_apply(x, stats, out):
        rows, n = x.shape
        stride = int64(cuda.gridDim.x) * block
        i = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        while i < rows * n:
            row = i // n
            j = i - row * n
            shift = stats[row, 0]
            total = stats[row, 1]
            v = load(x[row, j]) - shift
            if not total < inf:  # +inf or NaN in the row
                v = total - total
            if log:
                out[row, j] = out_type(v - safe_log(total))
            else:
                out[row, j] = out_type(math.exp(v) * (one / total))
            i += stride

    return split_apply


# --- host launchers ----------------------------------------------------------


def launch_forward(kind, x, out, plan, strategy, stream, x_dtype, out_dtype):
    """One launch: softmax/log_softmax of `x` into `out`, both (rows, n) for
    the row regimes or (outer, n, inner) for "columns", as `plan` says; the
    arrays hold `x_dtype` and `out_dtype` elements (bfloat16: their bits)."""
    kernel = forward_kernel(
        kind,
        plan.regime,
        strategy,
        plan.block,
        plan.values,
        plan.cache,
        np.dtype(out_dtype),
        np.dtype(x_dtype) if is_bfloat16(np.dtype(x_dtype)) else None,
    )
    kernel[plan.grid, plan.block, stream](x, out)


def launch_logsumexp(x, out, plan, strategy, stream, out_dtype):
    kernel = logsumexp_kernel(plan.regime, strategy, plan.block, np.dtype(out_dtype))
    kernel[plan.grid, plan.block, stream](x, out)


def _bfloat16_or_none(x_dtype):
    return np.dtype(x_dtype) if is_bfloat16(np.dtype(x_dtype)) else None


def launch_split_logsumexp(x, out, plan, strategy, stream, out_dtype, empty):
    """logsumexp of few long rows (regime "split"): stages 1 and 2, the
    segments' pairs in two (rows, segments) scratch arrays from `empty`."""
    out_dtype = np.dtype(out_dtype)
    acc = softmax_acc_dtype(out_dtype)
    tops = empty((plan.outer, plan.segments), acc)
    sums = empty((plan.outer, plan.segments), acc)
    split_partials_kernel(strategy, plan.block, out_dtype, None, False)[
        plan.grid, plan.block, stream
    ](x, tops, sums)
    split_merge_kernel(strategy, plan.block, out_dtype)[
        min(plan.outer, MAX_GRID), plan.block, stream
    ](tops, sums, out)


def launch_split_forward(
    kind, x, out, plan, strategy, stream, x_dtype, out_dtype, empty
):
    """softmax/log_softmax of few long rows (regime "split"): each row's
    shift and sum of exponentials in the accumulator type (stages 1 and 2),
    then stage 3 writes the output: x is read three times (twice in stage 1,
    a segment at a time while it is in L2), each pass over all SMs."""
    out_dtype = np.dtype(out_dtype)
    acc = softmax_acc_dtype(out_dtype)
    x_bits = _bfloat16_or_none(x_dtype)
    tops = empty((plan.outer, plan.segments), acc)
    sums = empty((plan.outer, plan.segments), acc)
    stats = empty((plan.outer, 2), acc)
    split_partials_kernel(strategy, plan.block, out_dtype, x_bits, True)[
        plan.grid, plan.block, stream
    ](x, tops, sums)
    split_merge_kernel(strategy, plan.block, acc, True)[
        min(plan.outer, MAX_GRID), plan.block, stream
    ](tops, sums, stats)
    split_apply_kernel(kind, plan.block, out_dtype, x_bits)[
        plan.grid, plan.block, stream
    ](x, stats, out)


def launch_backward(kind, g, y, out, plan, strategy, stream, dtype):
    kernel = backward_kernel(kind, plan.regime, strategy, plan.block, np.dtype(dtype))
    kernel[plan.grid, plan.block, stream](g, y, out)


# --- catalogue for compile checks -------------------------------------------


def ptx_cases(block: int = 256):
    """Every softmax kernel with the argument types it is launched with, as
    ``cuda.reduce.ptx_cases``: each regime, direction and strategy for
    float32 and float64; float16 (which computes in float32) with reduce=2.
    The warp regime's register counts (values a lane) are all compiled for
    reduce=2 and the smallest and largest for 0 and 1."""
    from softkern._launch import (
        SHARED_ROW_BYTES,
        SOFTMAX_MAX_BLOCK,
        WARP,
        WARP_ROW_BYTES,
    )

    # The largest block, where registers and shared memory are tightest: the
    # biggest register rows, and the shared regime with the most scratch.
    big = SOFTMAX_MAX_BLOCK
    for name, kind, regime, values, strategy in (
        ("float32", "softmax", "warp", WARP_ROW_BYTES // 4 // WARP, 2),
        ("float64", "log_softmax", "warp", WARP_ROW_BYTES // 8 // WARP, 0),
        ("float64", "softmax", "shared", 0, 0),
        ("float32", "softmax", "stream", 0, 1),
        ("float32", "softmax", "columns", 0, 2),
    ):
        dtype = np.dtype(name)
        t = from_dtype(dtype)
        cache = SHARED_ROW_BYTES // dtype.itemsize if regime == "shared" else 0
        dims = (
            (t[:, :, :], t[:, :, ::1]) if regime == "columns" else (t[:, :], t[:, ::1])
        )
        yield (
            f"b{big}/{regime}{values or ''}/{kind}/{name}/r{strategy}",
            forward_kernel(kind, regime, strategy, big, values, cache, dtype),
            dims,
            name,
            strategy,
        )

    for name in OUT_DTYPES:
        dtype = dtype_named(name)
        t = from_dtype(kernel_dtype(dtype))
        x_dtype = dtype if is_bfloat16(dtype) else None
        itemsize = softmax_acc_dtype(dtype).itemsize
        cache = SHARED_ROW_BYTES // itemsize
        most = WARP_ROW_BYTES // itemsize // WARP  # 16 float32, 8 float64
        for strategy in (2,) if dtype.itemsize == 2 else (0, 1, 2):
            every = tuple(1 << k for k in range(most.bit_length()))
            all_values = every if strategy == 2 else (1, most)
            for kind in FORWARD:
                for values in all_values:
                    yield (
                        f"warp{values}/{kind}/{name}/r{strategy}",
                        forward_kernel(
                            kind, "warp", strategy, block, values, 0, dtype, x_dtype
                        ),
                        (t[:, :], t[:, ::1]),
                        name,
                        strategy,
                    )
                for regime in ("shared", "stream"):
                    size = cache if regime == "shared" else 0
                    yield (
                        f"{regime}/{kind}/{name}/r{strategy}",
                        forward_kernel(
                            kind, regime, strategy, block, 0, size, dtype, x_dtype
                        ),
                        (t[:, :], t[:, ::1]),
                        name,
                        strategy,
                    )
                yield (
                    f"columns/{kind}/{name}/r{strategy}",
                    forward_kernel(
                        kind, "columns", strategy, block, 0, 0, dtype, x_dtype
                    ),
                    (t[:, :, :], t[:, :, ::1]),
                    name,
                    strategy,
                )
            for regime in ("warp", "stream"):
                yield (
                    f"{regime}/logsumexp/{name}/r{strategy}",
                    logsumexp_kernel(regime, strategy, block, dtype),
                    (t[:, :], t[::1]),
                    name,
                    strategy,
                )
            yield (
                f"columns/logsumexp/{name}/r{strategy}",
                logsumexp_kernel("columns", strategy, block, dtype),
                (t[:, :, :], t[:, ::1]),
                name,
                strategy,
            )
            a = from_dtype(softmax_acc_dtype(dtype))
            pairs = (a[:, ::1], a[:, ::1])
            for forward in (True, False):
                yield (
                    f"split/partials/{'forward' if forward else 'logsumexp'}/"
                    f"{name}/r{strategy}",
                    split_partials_kernel(strategy, block, dtype, x_dtype, forward),
                    (t[:, :], *pairs),
                    name,
                    strategy,
                )
            yield (
                f"split/merge/logsumexp/{name}/r{strategy}",
                split_merge_kernel(strategy, block, dtype),
                (*pairs, t[::1]),
                name,
                strategy,
            )
            yield (
                f"split/merge/forward/{name}/r{strategy}",
                split_merge_kernel(strategy, block, softmax_acc_dtype(dtype), True),
                (*pairs, a[:, ::1]),
                name,
                strategy,
            )
            for kind in FORWARD if strategy == 2 else ():
                yield (
                    f"split/apply/{kind}/{name}",
                    split_apply_kernel(kind, block, dtype, x_dtype),
                    (t[:, :], a[:, ::1], t[:, ::1]),
                    name,
                    None,  # no in-block folds: no strategy
                )
            for kind in BACKWARD:
                for regime in ("warp", "stream"):
                    yield (
                        f"{regime}/{kind}/{name}/r{strategy}",
                        backward_kernel(kind, regime, strategy, block, dtype),
                        (t[:, :], t[:, :], t[:, ::1]),
                        name,
                        strategy,
                    )
                yield (
                    f"columns/{kind}/{name}/r{strategy}",
                    backward_kernel(kind, "columns", strategy, block, dtype),
                    (t[:, :, :], t[:, :, :], t[:, :, ::1]),
                    name,
                    strategy,
                )
