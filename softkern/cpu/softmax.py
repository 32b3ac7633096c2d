"""CPU softmax, log_softmax and their backward passes.

Rows regime (softmax over the last, contiguous dim): rows in parallel. A
row of at most TILE elements takes three sweeps that stay in L1: the max,
the sum of exp(x - max) (softmax keeps the exponentials in the output), then
the scaling. A longer row goes a tile at a time (its max, then its
exponentials, while the tile is in L1), the tiles' (max, sum) pairs merge
as online softmax's do, and the last sweep scales each tile by exp(its max
- the row's max) / the sum: the row is read from memory once and no sweep
waits on L2. Columns regime (any other dim): strips of neighbouring columns
whose whole height fits in cache, strips in parallel; the same three sweeps
run along the rows of the strip, each sweep reading rows front to back, so
memory is read sequentially and nothing is transposed.

Every inner loop is branch-free so LLVM vectorises it: the max is
``llvm.maxnum`` (which skips NaN: a NaN, like a +inf or a slice of -inf,
still makes the slice NaN through the sum of exponentials), the exponential
is ``simd_exp.exp_nonpositive`` (x - max <= 0 needs no overflow handling:
0.56 cycles per float32 on this machine's AVX-512, against 0.77 for the
general exp), and the sum may reassociate (fastmath ``reassoc``, on these
functions only) so it is split over vector lanes. Sums run in the
accumulator type over blocks of SUM_BLOCK elements (rows) or pairs of rows
(columns), and those partial sums add in float64: every term is positive,
so the relative error stays a few roundings of the accumulator type for
slices of any length, at full SIMD width.

Every kernel takes the accumulator type from its `lowest` argument (-inf of
that type) and ``parallel``: False runs the same loops on the calling thread
(``softkern._launch.cpu_parallel`` decides from the input's size). They are
module-level functions, not closures, so Numba's on-disk cache finds them in
every process.

Memory: the output, plus per strip a few rows of `strip` numbers and per
long row its tiles' maxima; nothing of the input's size. bfloat16 input is
read as its bits and widened as each element loads (``as_acc``); float16,
which Numba cannot load on the CPU, is widened to a float32 copy. Both write
their results into a float32 array that the host rounds into the output
(``ops.softmax.cpu_store``), as the softmax keeps its exponentials in the
output between sweeps.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from softkern.cpu import parallel_kernel
from softkern.cpu.bfloat16 import widen
from softkern.cpu.fma import maxnum
from softkern.cpu.simd_exp import exp, exp_nonpositive, log1p_unit32, log1p_unit64

# Only reassociation: no assumptions about NaN or inf (they must propagate),
# and the exp's own arithmetic keeps its exact rounding (it is compiled apart).
FASTMATH = {"reassoc"}


# A row's sum of exponentials runs in the accumulator type (float32 for
# float32 input: full SIMD width, no conversions) over blocks of this many
# elements, and the blocks' sums add in float64. Every term is positive, so
# a block's relative error is at most about 2 + log2(SUM_BLOCK) roundings
# whatever the row's length (the reassociated loop keeps 64 partial sums of
# 8 terms each, then adds them pairwise); float64 accumulation of every
# term kept the exponentials at half width: 1.40 against 1.06 cycles per
# element for the fused exp-and-sum loop.
SUM_BLOCK = 512

# softmax's fused loop stores each exponential into the output and adds it
# to a reassociated sum. LLVM compiles such a loop twice, vectorised and
# scalar, behind a run-time test that the output does not start within a few
# vectors after the input; the two copies add in different orders. Left to
# that test, the result depended on where the allocator put the output (NumPy
# placing a small output just after its input changed softmax by an ulp
# between two identical calls). So the kernel picks the loop from what the
# addresses cannot change: an input of ALIAS_REACH bytes or more written to
# a separate output takes the fused loop, whose test then always passes (a
# separate output starts at least the input's size away; LLVM's reach is its
# vector width times its unroll, 256 bytes here); a smaller input, or out=x,
# gets the exponentials first and their sum in a loop that stores nothing.
ALIAS_REACH = 4096


@njit(inline="always", cache=True)
def fused_sum_is_safe(x, out):
    """Whether softmax's fused store-and-sum loop always runs vectorised on
    these arrays (see ALIAS_REACH)."""
    gap = np.int64(out.ctypes.data) - np.int64(x.ctypes.data)
    return x.nbytes >= ALIAS_REACH and (gap < 0 or gap >= x.nbytes)


# A long row is worked on in tiles of this many elements: a tile's max and
# exponentials (two sweeps) stay in L1, so the row is read from memory once
# and its second sweep never waits on L2 (measured on (512, 65536) float32
# cross_entropy: three whole-row sweeps of 256 KiB rows fell out of L2).
TILE = 4096

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
    if value == types.uint16:  # a bfloat16's bits (softkern.cpu.bfloat16)
        return lambda value, lowest: kind(widen(value))
    return lambda value, lowest: kind(value)


@njit(inline="always", cache=True)
def as_acc_array(values, lowest):
    out = np.full(values.size, lowest)
    for i in range(values.size):
        out[i] = as_acc(values[i], lowest)
    return out


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
def merge_sums(top, total, m, part):
    """(max, sum) of two parts of a row, each part's sum of exponentials
    taken against its own max: the smaller max's sum is rescaled by
    exp(its max - the max). A part whose max is -inf (nothing but -inf, or
    NaN) adds part * 0: 0, or NaN. The first part's max is -inf while no
    part has had a larger one."""
    if m == -np.inf:
        return top, total + part * 0.0
    if top == -np.inf:
        return m, total * 0.0 + part
    if m > top:
        return m, total * np.exp(np.float64(top) - m) + part
    return top, total + part * np.exp(np.float64(m) - top)


@njit(inline="always", cache=True)
def short_row(x, out, r, n, log, lowest, fused):
    """``row`` for n <= TILE: the max, then exp(x - max) (kept in out) and
    their sum, then the scaling, each a plain loop (the tile machinery's
    slices and merges cost 30% on 128-element rows)."""
    # Slices indexed from 0: indices Numba can see are never negative, so
    # no wraparound test keeps the loops from vectorising (indexing from j0
    # instead ran 3x slower).
    xr = x[r]
    orow = out[r]
    top = lowest
    for j in range(n):
        top = maxnum(top, as_acc(xr[j], lowest))
    total = 0.0  # float64
    for j0 in range(0, n, SUM_BLOCK):
        xb = xr[j0 : min(n, j0 + SUM_BLOCK)]
        part = as_acc(0, lowest)
        if log:
            for j in range(xb.size):
                part += exp_nonpositive(as_acc(xb[j], lowest) - top)
        else:
            ob = orow[j0 : min(n, j0 + SUM_BLOCK)]
            if fused:  # see ALIAS_REACH
                for j in range(xb.size):
                    e = exp_nonpositive(as_acc(xb[j], lowest) - top)
                    ob[j] = e
                    part += e
            else:
                for j in range(xb.size):
                    ob[j] = exp_nonpositive(as_acc(xb[j], lowest) - top)
                for j in range(ob.size):
                    part += ob[j]
        total += part
    if log:
        shift = as_acc(np.log(total), lowest)
        for j in range(n):
            orow[j] = (as_acc(xr[j], lowest) - top) - shift
    else:
        scale = as_acc(1.0 / total, lowest)
        for j in range(n):
            orow[j] *= scale


@njit(inline="always", cache=True)
def row(x, out, r, n, log, lowest, tile_top, fused):
    """Softmax of row r, a tile of TILE elements at a time: the tile's max,
    then exp(x - that max) (kept in out) and their sum, while the tile is
    in L1; the tiles' (max, sum) merge (``merge_sums``); then one sweep
    scales each tile by exp(its max - the row's max) / the row's sum. A
    row of one tile is the classic three sweeps. log_softmax keeps only the
    sums and writes x - max - log(sum) in its last sweep.

    The sum runs in the accumulator type within blocks of SUM_BLOCK
    elements, added in float64 (``SUM_BLOCK``). `tile_top` holds the
    tiles' maxima (at least ceil(n / TILE) elements)."""
    if n <= TILE:
        short_row(x, out, r, n, log, lowest, fused)
        return
    # Slices indexed from 0: indices Numba can see are never negative, so
    # no wraparound test keeps the loops from vectorising.
    xr = x[r]
    orow = out[r]
    top = lowest
    total = 0.0  # float64
    for k in range((n + TILE - 1) // TILE):
        xt = xr[k * TILE : min(n, (k + 1) * TILE)]
        ot = orow[k * TILE : min(n, (k + 1) * TILE)]
        m = lowest
        for j in range(xt.size):
            m = maxnum(m, as_acc(xt[j], lowest))
        tile_top[k] = m
        # A tile of -inf (and NaN) only is shifted by 0, never by -inf:
        # its exponentials are 0 (or NaN), not exp(-inf - -inf).
        shift = m if m != lowest else as_acc(0, lowest)
        tile_sum = 0.0
        for j0 in range(0, xt.size, SUM_BLOCK):
            xb = xt[j0 : min(xt.size, j0 + SUM_BLOCK)]
            part = as_acc(0, lowest)
            if log:
                for j in range(xb.size):
                    part += exp_nonpositive(as_acc(xb[j], lowest) - shift)
            else:
                ob = ot[j0 : min(xt.size, j0 + SUM_BLOCK)]
                if fused:  # see ALIAS_REACH
                    for j in range(xb.size):
                        e = exp_nonpositive(as_acc(xb[j], lowest) - shift)
                        ob[j] = e
                        part += e
                else:
                    for j in range(xb.size):
                        ob[j] = exp_nonpositive(as_acc(xb[j], lowest) - shift)
                    for j in range(ob.size):
                        part += ob[j]
            tile_sum += part
        top, total = merge_sums(top, total, m, tile_sum)
    if top == -np.inf:  # every element -inf (or NaN): NaN, as PyTorch
        total = np.nan
    if log:
        shift = as_acc(np.log(total), lowest)
        for j in range(n):
            orow[j] = (as_acc(xr[j], lowest) - top) - shift
        return
    scale = 1.0 / total
    for k in range((n + TILE - 1) // TILE):
        ot = orow[k * TILE : min(n, (k + 1) * TILE)]
        m = tile_top[k]
        if m == top:  # exp(0) = 1, without a call into libm
            factor = as_acc(scale, lowest)
        elif m == lowest:
            factor = as_acc(scale * 0.0, lowest)
        else:
            factor = as_acc(scale * np.exp(np.float64(m) - top), lowest)
        for j in range(ot.size):
            ot[j] *= factor


@parallel_kernel(fastmath=FASTMATH)
def rows(x, out, log, lowest, parallel):
    count, n = x.shape
    tiles = max(1, (n + TILE - 1) // TILE)
    fused = fused_sum_is_safe(x, out)
    if not parallel:
        tile_top = np.empty(tiles, dtype=out.dtype)
        for r in range(count):
            row(x, out, r, n, log, lowest, tile_top, fused)
        return
    chunks = min(count, ROW_CHUNKS)
    for chunk in prange(chunks):
        tile_top = np.empty(tiles, dtype=out.dtype)
        for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
            row(x, out, r, n, log, lowest, tile_top, fused)


@njit(inline="always", cache=True)
def strip_max(x, o, c0, width, lowest):
    """Column maxima of the strip x[o, :, c0:c0 + width], two rows at a
    time (half the loads and stores of the running maxima)."""
    n = x.shape[1]
    top = np.full(width, lowest)
    for i in range(0, n - 1, 2):
        xa = x[o, i, c0 : c0 + width]
        xb = x[o, i + 1, c0 : c0 + width]
        for c in range(width):
            pair = maxnum(as_acc(xa[c], lowest), as_acc(xb[c], lowest))
            top[c] = maxnum(top[c], pair)
    if n % 2:
        xr = x[o, n - 1, c0 : c0 + width]
        for c in range(width):
            top[c] = maxnum(top[c], as_acc(xr[c], lowest))
    return top


@njit(inline="always", cache=True)
def strip_exps(x, o, i, c0, width, top, dest, lowest):
    """exp(x[o, i, strip] - top) into dest (the strip's width)."""
    xr = x[o, i, c0 : c0 + width]
    for c in range(width):
        dest[c] = exp_nonpositive(as_acc(xr[c], lowest) - top[c])


@njit(inline="always", cache=True)
def column_strip(x, out, item, strips, strip, log, lowest):
    """Softmax of the columns of work item `item`'s strip: three sweeps
    down the strip (max, exponentials and their sums, scaling).

    The exponentials of two rows are added in the accumulator type before
    their sum joins the column's float64 total: a relative error of one
    rounding, as the rows regime's blocks, at a quarter of the float64
    work (a float64 add per element halved the exponentials' vector width
    when fused with them, and cost 20% even in a loop of its own).

    Softmax keeps its exponentials in out and scales them in place, even
    when the strip is too tall for cache: computing them again in the last
    sweep instead saves one of six passes over memory but cost more than it
    saved (measured on (4096, 4096) over dim 0: float32 15.1 against 13.6
    ms, float64 29.7 against 25.8)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top = strip_max(x, o, c0, width, lowest)
    total = np.zeros(width, dtype=np.float64)
    # log_softmax keeps its exponentials in two scratch rows, softmax in out.
    scratch = np.empty((2, width), dtype=top.dtype)
    for i in range(0, n - 1, 2):
        if log:
            ea, eb = scratch[0], scratch[1]
        else:
            ea, eb = out[o, i, c0 : c0 + width], out[o, i + 1, c0 : c0 + width]
        strip_exps(x, o, i, c0, width, top, ea, lowest)
        strip_exps(x, o, i + 1, c0, width, top, eb, lowest)
        for c in range(width):
            total[c] += ea[c] + eb[c]
    if n % 2:
        ea = scratch[0] if log else out[o, n - 1, c0 : c0 + width]
        strip_exps(x, o, n - 1, c0, width, top, ea, lowest)
        for c in range(width):
            total[c] += ea[c]
    if log:
        shift = np.full(width, lowest)
        for c in range(width):
            shift[c] = as_acc(np.log(total[c]), lowest)
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            orow = out[o, i, c0 : c0 + width]
            for c in range(width):
                orow[c] = (as_acc(xr[c], lowest) - top[c]) - shift[c]
    else:
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
def row_logsumexp(x, out, r, lowest, part_zero):
    """log(sum(exp(x[r]))) a tile at a time, as ``row``: the tile's max and
    its sum of exp(x - max) while it is in L1 (blocks of SUM_BLOCK summed in
    the type of `part_zero`, added in float64), the tiles merged by
    ``merge_sums``. A row whose max is +inf is summed again shifted by 0
    (+inf, or NaN with a NaN).

    `part_zero`: 0 of the compute type (SIMD adds of the exponentials, as
    fast as they come; the blocks' rounding costs ~1e-7 relative in
    float32), or float64 0 (~1e-8, 1.5x the time: softkern._dask's class
    chunks, whose values are merged into a loss and its gradient)."""
    xr = x[r]
    n = xr.shape[0]
    top = lowest
    total = 0.0  # float64
    for k in range((n + TILE - 1) // TILE):
        xt = xr[k * TILE : min(n, (k + 1) * TILE)]
        m = lowest
        for j in range(xt.size):
            m = maxnum(m, as_acc(xt[j], lowest))
        shift = m if m != lowest else as_acc(0, lowest)
        tile_sum = 0.0
        for j0 in range(0, xt.size, SUM_BLOCK):
            xb = xt[j0 : min(xt.size, j0 + SUM_BLOCK)]
            part = part_zero
            for j in range(xb.size):
                part += exp_nonpositive(as_acc(xb[j], lowest) - shift)
            tile_sum += part
        top, total = merge_sums(top, total, m, tile_sum)
    if top == np.inf:
        total = 0.0
        for j in range(n):
            total += exp(as_acc(xr[j], lowest))
        top = as_acc(0, lowest)
    # one rounding, by the store: a float64 out keeps the float64 value
    out[r] = np.log(total) + top


@parallel_kernel(fastmath=FASTMATH)
def logsumexp_rows(x, out, lowest, part_zero, parallel):
    count = x.shape[0]
    if not parallel:
        for r in range(count):
            row_logsumexp(x, out, r, lowest, part_zero)
        return
    for r in prange(count):
        row_logsumexp(x, out, r, lowest, part_zero)


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
        out[o, c0 + c] = np.log(total[c]) + shift[c]  # rounded by the store


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


@njit(inline="always", cache=True)
def slab_from_logsumexp(x, lse, out, o, log):
    n, inner = x.shape[1], x.shape[2]
    for k in range(n):
        for i in range(inner):
            top = lse[o, i]
            shifted = x[o, k, i] - top
            if not top < np.inf:  # +inf or NaN in the slice: NaN throughout
                shifted = top - top
            out[o, k, i] = shifted if log else exp(shifted)


@parallel_kernel(fastmath=FASTMATH)
def from_logsumexp(x, lse, out, log, parallel):
    """softmax, exp(x - lse), or log_softmax, x - lse, of slices whose
    log-sum-exp `lse` is already known: the second pass of a softmax whose
    dim is split over several pieces (Dask chunks, ``softkern._dask``),
    after their (max, sum) statistics merged into `lse`.

    x and out are (outer, n, inner) in the accumulator type, lse (outer,
    inner). As PyTorch's softmax: a slice holding +inf or NaN (lse +inf or
    NaN) is NaN throughout, and a slice of -inf gets -inf - -inf = NaN.
    One sweep, reading x once; the slabs of `outer` in parallel.
    """
    outer = x.shape[0]
    if not parallel:
        for o in range(outer):
            slab_from_logsumexp(x, lse, out, o, log)
        return
    for o in prange(outer):
        slab_from_logsumexp(x, lse, out, o, log)
