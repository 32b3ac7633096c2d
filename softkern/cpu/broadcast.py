"""CPU expand and where: @njit(parallel=True) loops over the output.

The output is written in C order. Work items are pieces of rows of the last
collapsed dim (``BroadcastPlan.chunk`` elements): an item unravels its first
index once (``_index.offset_of``) and then walks each operand with that
operand's last-dim stride (1, or 0 where broadcast), so the inner loop has no
division and LLVM can vectorise it. Same-shape contiguous operands take a
flat loop with no index arithmetic at all.

Operands are 1-D views of their memory (from their first element), indexed
by offset; outputs are 1-D and contiguous. The condition of `where` comes
as uint8 (the bool's bytes): Numba's bool loads kept the loop scalar and
branchy (measured 16x slower on random conditions). Indices are cast to
uint64: they are never negative here (ops/broadcast.py first copies operands
with negative strides, or strides that are not whole elements), and an
unsigned index spares Numba's negative-index wraparound on every access,
which otherwise keeps these loops scalar (measured: 2-3x slower).
"""

from __future__ import annotations

from numba import njit, prange, uint64

from softkern._index import offset_of as _offset_of

offset_of = njit(inline="always", cache=True)(_offset_of)


@njit(inline="always", cache=True)
def _item(item, last, chunk):
    """(first output index, length) of work item `item`."""
    pieces = (last + chunk - 1) // chunk
    row = item // pieces
    start = (item % pieces) * chunk
    return row * last + start, min(chunk, last - start)


@njit(parallel=True, cache=True)
def expand(x, out, shape, strides, last, chunk, items):
    step = strides[shape.size - 1]
    for item in prange(items):
        first, length = _item(item, last, chunk)
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


@njit(parallel=True, cache=True)
def copy_flat(x, out, chunk, items):
    n = out.size
    for item in prange(items):
        first = item * chunk
        for i in range(first, min(first + chunk, n)):
            out[uint64(i)] = x[uint64(i)]


@njit(parallel=True, cache=True)
def where(c, x, y, out, shape, cs, xs, ys, last, chunk, items):
    d = shape.size - 1
    cstep, xstep, ystep = cs[d], xs[d], ys[d]
    for item in prange(items):
        first, length = _item(item, last, chunk)
        cbase = offset_of(first, shape, cs)
        xbase = offset_of(first, shape, xs)
        ybase = offset_of(first, shape, ys)
        for k in range(length):
            # both loaded, then a select: no branch on random conditions
            a = x[uint64(xbase + k * xstep)]
            b = y[uint64(ybase + k * ystep)]
            out[uint64(first + k)] = a if c[uint64(cbase + k * cstep)] != 0 else b


@njit(parallel=True, cache=True)
def where_flat(c, x, y, out, chunk, items):
    n = out.size
    for item in prange(items):
        first = item * chunk
        for i in range(first, min(first + chunk, n)):
            j = uint64(i)
            a = x[j]
            b = y[j]
            out[j] = a if c[j] != 0 else b
