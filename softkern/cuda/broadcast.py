"""GPU expand and where: one thread per output element.

Threads walk the output with a grid-stride loop and 64-bit indices. The
general kernels unravel each output index into each operand's offset with
``_index.offset_of`` (the collapsed shape and the operands' element strides
are small int64 device arrays, 0 on broadcast dims); the flat kernels serve
same-shape contiguous operands with no index arithmetic. Operands are 1-D
views of their memory; the output is 1-D and contiguous. Numba compiles one
specialisation per argument dtype; stores convert to the output dtype.

Launch config: ``BroadcastPlan``: [grid, block], any block size.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, int64
from numba.np.numpy_support import from_dtype

from softkern._index import offset_of as _offset_of

offset_of = cuda.jit(device=True, inline=True)(_offset_of)


@cuda.jit
def expand_kernel(x, out, shape, strides):
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = int64(cuda.gridDim.x) * cuda.blockDim.x
    while i < out.size:
        out[i] = x[offset_of(i, shape, strides)]
        i += step


@cuda.jit
def copy_kernel(x, out):
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = int64(cuda.gridDim.x) * cuda.blockDim.x
    while i < out.size:
        out[i] = x[i]
        i += step


@cuda.jit
def where_kernel(c, x, y, out, shape, cs, xs, ys):
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = int64(cuda.gridDim.x) * cuda.blockDim.x
    while i < out.size:
        if c[offset_of(i, shape, cs)]:
            out[i] = x[offset_of(i, shape, xs)]
        else:
            out[i] = y[offset_of(i, shape, ys)]
        i += step


@cuda.jit
def where_flat_kernel(c, x, y, out):
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = int64(cuda.gridDim.x) * cuda.blockDim.x
    while i < out.size:
        out[i] = x[i] if c[i] else y[i]
        i += step


def ptx_cases():
    """The broadcast kernels for a few dtype combinations, as the other
    modules' ``ptx_cases``."""
    idx = int64[::1]
    for name in ("float32", "float64", "int32", "float16", "bool"):
        t = from_dtype(np.dtype(name))
        yield (f"expand/{name}", expand_kernel, (t[::1], t[::1], idx, idx), name, None)
        yield (f"copy/{name}", copy_kernel, (t[::1], t[::1]), name, None)
    b = from_dtype(np.dtype(np.bool_))
    for xname, yname, oname in (
        ("float32", "float32", "float32"),
        ("float64", "int64", "float64"),
        ("float16", "float16", "float16"),
        ("int32", "int32", "int32"),
    ):
        x, y, o = (from_dtype(np.dtype(n)) for n in (xname, yname, oname))
        label = f"{xname}-{yname}"
        yield (
            f"where/{label}",
            where_kernel,
            (b[::1], x[::1], y[::1], o[::1], idx, idx, idx, idx),
            oname,
            None,
        )
        yield (
            f"where_flat/{label}",
            where_flat_kernel,
            (b[::1], x[::1], y[::1], o[::1]),
            oname,
            None,
        )
