"""Index arithmetic shared by the CPU and GPU kernels (broadcasting, and the
one-hot of gumbel_softmax).

Plain Python functions, each compiled by ``numba.njit`` for the CPU kernels
and by ``numba.cuda.jit(device=True)`` for the GPU kernels, and callable as
is with Python ints: tests check the 64-bit kernels' arithmetic against
exact Python arithmetic on shapes of more than 2**31 elements without
allocating them.
"""

from __future__ import annotations


def offset_of(i, shape, strides):
    """Offset, in elements, of output element `i` (C order over `shape`) in an
    operand read with `strides` (0 on broadcast dims): the flat index is
    unravelled from the last dim to the first."""
    offset = i - i  # zero of i's type: int64 in the kernels
    for d in range(len(shape) - 1, -1, -1):
        size = shape[d]
        offset += (i % size) * strides[d]
        i //= size
    return offset


def first_argmax(y, o, c):
    """Index k of the first maximum of y[o, :, c] (a 3-D array), where NaN
    counts as larger than any number, as ``torch.argmax``."""
    best = 0
    for k in range(1, y.shape[1]):
        v = y[o, k, c]
        top = y[o, best, c]
        if v > top or (v != v and top == top):
            best = k
    return best
