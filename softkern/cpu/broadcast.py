"""CPU expand and where: loops over the output, in parallel when it is large.

The output is written in C order. Work items are pieces of rows of the last
collapsed dim (``BroadcastPlan.chunk`` elements): an item unravels its first
index once (``_index.offset_of``) and then walks each operand with that
operand's last-dim stride (1, or 0 where broadcast), so the inner loop has no
division and LLVM can vectorise it. Same-shape contiguous operands take a
flat loop with no index arithmetic at all.

Operands are 1-D views of their memory (from their first element), indexed
by offset; outputs are 1-D and contiguous. The flat kernels also take an
operand of one element as a 0-d array (``where(c, x, 0.0)``): Numba compiles
that loop with the value hoisted, so it still vectorises. The collapsed shape and each
operand's element strides come in one small int64 array, `geometry`: row 0
the shape, row 1 + k operand k's strides (the plan builds it once per
argument shape). The condition of `where` comes as uint8 (the bool's bytes):
Numba's bool loads kept the loop scalar and branchy (measured 16x slower on
random conditions). Indices are cast to uint64: they are never negative here
(ops/broadcast.py first copies operands with negative strides, or strides
that are not whole elements), and an unsigned index spares Numba's
negative-index wraparound on every access, which otherwise keeps these loops
scalar (measured: 2-3x slower).

Each kernel takes ``parallel``: False runs the work items in order on the
calling thread (``softkern._launch.cpu_parallel`` decides from the size).
"""

from __future__ import annotations

from numba import njit, prange, types, uint64
from numba.extending import overload

from softkern._index import offset_of as _offset_of
from softkern.cpu import parallel_kernel

offset_of = njit(inline="always", cache=True)(_offset_of)


@njit(inline="always", cache=True)
def item_span(item, last, chunk):
    """(first output index, length) of work item `item`."""
    pieces = (last + chunk - 1) // chunk
    row = item // pieces
    start = (item % pieces) * chunk
    return row * last + start, min(chunk, last - start)


@njit(inline="always", cache=True)
def item_count(n, last, chunk):
    """Work items of an output of `n` elements in rows of `last`."""
    return (n // last) * ((last + chunk - 1) // chunk)


@njit(inline="always", cache=True)
def expand_item(x, out, shape, strides, item, chunk):
    last = shape[shape.size - 1]
    step = strides[shape.size - 1]
    first, length = item_span(item, last, chunk)
    base = offset_of(first, shape, strides)
    if step == 0:  # a broadcast row: one value, a vector fill
        value = x[uint64(base)]
        for k in range(length):
            out[uint64(first + k)] = value
    elif step == 1:  # a contiguous run: a vector copy
        for k in range(length):
            out[uint64(first + k)] = x[uint64(base + k)]
    else:
        for k in range(length):
            out[uint64(first + k)] = x[uint64(base + k * step)]


@parallel_kernel()
def expand(x, out, geometry, chunk, parallel):
    shape, strides = geometry[0], geometry[1]
    items = item_count(out.size, shape[shape.size - 1], chunk)
    if not parallel:
        for item in range(items):
            expand_item(x, out, shape, strides, item, chunk)
        return
    for item in prange(items):
        expand_item(x, out, shape, strides, item, chunk)


@njit(inline="always", cache=True)
def copy_span(x, out, first, last):
    for i in range(first, last):
        out[uint64(i)] = x[uint64(i)]


@parallel_kernel()
def copy_flat(x, out, chunk, parallel):
    n = out.size
    if not parallel:
        copy_span(x, out, 0, n)
        return
    for item in prange((n + chunk - 1) // chunk):
        copy_span(x, out, item * chunk, min(item * chunk + chunk, n))


@njit(inline="always", cache=True)
def where_item(c, x, y, out, geometry, item, chunk):
    shape = geometry[0]
    d = shape.size - 1
    cstep, xstep, ystep = geometry[1, d], geometry[2, d], geometry[3, d]
    first, length = item_span(item, shape[d], chunk)
    cbase = offset_of(first, shape, geometry[1])
    xbase = offset_of(first, shape, geometry[2])
    ybase = offset_of(first, shape, geometry[3])
    for k in range(length):
        # both loaded, then a select: no branch on random conditions
        a = x[uint64(xbase + k * xstep)]
        b = y[uint64(ybase + k * ystep)]
        out[uint64(first + k)] = a if c[uint64(cbase + k * cstep)] != 0 else b


@parallel_kernel()
def where(c, x, y, out, geometry, chunk, parallel):
    shape = geometry[0]
    items = item_count(out.size, shape[shape.size - 1], chunk)
    if not parallel:
        for item in range(items):
            where_item(c, x, y, out, geometry, item, chunk)
        return
    for item in prange(items):
        where_item(c, x, y, out, geometry, item, chunk)


def at(a, i):
    """a[i], or the value of a 0-d `a` (a scalar operand, read everywhere)."""


@overload(at)
def _at(a, i):
    if not isinstance(a, types.Array):  # inside a parallel loop a 0-d array
        return lambda a, i: a  # arrives as its value
    if a.ndim == 0:
        return lambda a, i: a[()]
    return lambda a, i: a[i]


@njit(inline="always", cache=True)
def where_span(c, x, y, out, first, last):
    for i in range(first, last):
        j = uint64(i)
        a = at(x, j)
        b = at(y, j)
        out[j] = a if at(c, j) != 0 else b


@parallel_kernel()
def where_flat(c, x, y, out, chunk, parallel):
    n = out.size
    if not parallel:
        where_span(c, x, y, out, 0, n)
        return
    for item in prange((n + chunk - 1) // chunk):
        where_span(c, x, y, out, item * chunk, min(item * chunk + chunk, n))
