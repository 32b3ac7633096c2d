"""GPU gather of a strided Numba device array into C order.

Used only where a strided view cannot be reshaped without a copy and the
array belongs to no library that can copy it itself (CuPy and PyTorch arrays
use their own ``ascontiguousarray``/``contiguous``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, int64

from softkern._launch import DEFAULT_BLOCK, elementwise_grid

MAX_GATHER_DIMS = 4


@cuda.jit
def _gather1(x, out):
    i = cuda.grid(1)
    while i < out.size:
        out[i] = x[i]
        i += cuda.gridsize(1)


@cuda.jit
def _gather2(x, out):
    i = int64(cuda.grid(1))
    _, s1 = x.shape
    while i < out.size:
        out[i] = x[i // s1, i % s1]
        i += cuda.gridsize(1)


@cuda.jit
def _gather3(x, out):
    i = int64(cuda.grid(1))
    _, s1, s2 = x.shape
    while i < out.size:
        r = i // s2
        out[i] = x[r // s1, r % s1, i % s2]
        i += cuda.gridsize(1)


@cuda.jit
def _gather4(x, out):
    i = int64(cuda.grid(1))
    _, s1, s2, s3 = x.shape
    while i < out.size:
        r = i // s3
        q = r // s2
        out[i] = x[q // s1, q % s1, r % s2, i % s3]
        i += cuda.gridsize(1)


@functools.cache
def _gathers():
    return {1: _gather1, 2: _gather2, 3: _gather3, 4: _gather4}


def gather_contiguous(x, stream=0):
    """A new C-contiguous device array equal to the strided device array `x`.

    Launch config: one thread per element, grid-stride, [<= MAX_GRID, 256].
    """
    if x.ndim > MAX_GATHER_DIMS:
        raise TypeError(
            f"a non-contiguous Numba device array of {x.ndim} dims cannot be "
            f"read in place; copy it to a contiguous array first (up to "
            f"{MAX_GATHER_DIMS} dims are gathered automatically)"
        )
    out = cuda.device_array(x.size, np.dtype(x.dtype), stream=stream)
    if x.size:
        grid = elementwise_grid(x.size)
        _gathers()[x.ndim][grid, DEFAULT_BLOCK, stream](x, out)
    return out.reshape(x.shape)


def ptx_cases(block: int = DEFAULT_BLOCK):
    """The gather kernels with their argument types, for compile checks
    (same shape of record as ``softkern.cuda.reduce.ptx_cases``)."""
    from numba.np.numpy_support import from_dtype

    for name in ("float32", "int32"):
        t = from_dtype(np.dtype(name))
        for ndim, kernel in _gathers().items():
            argtypes = (t[(slice(None),) * ndim], t[::1])
            yield f"gather{ndim}/{name}", kernel, argtypes, name, None
