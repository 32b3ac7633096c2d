"""bfloat16 on the GPU, from its bits: the loads and stores of the kernels.

bfloat16 arrays reach the kernels as uint16 views of their bits (CuPy has no
bfloat16, PyTorch does not export one through ``__cuda_array_interface__``,
and numba-cuda's own ``bfloat16`` converts through out-of-line calls whose
PTX keeps a stack frame in local memory). A load widens the bits to float32
(a shift and a register move: ``int_as_float``), a store narrows a float32
to nearest, ties to even, as ``softkern.cpu.bfloat16.narrow`` does on the
CPU, bit for bit. Kernels take their conversions from ``loader``/``storer``:
for every other dtype those are plain Numba type casts.

The simulator has no libdevice, so there the same two functions are written
with NumPy (the simulator runs device functions as Python).
"""

from __future__ import annotations

import numpy as np
from numba import config, cuda, int32, int64, uint16, uint32
from numba.np.numpy_support import from_dtype

from softkern._dtypes import BFLOAT16_BITS, is_bfloat16
from softkern._launch import DEFAULT_BLOCK, elementwise_grid

if config.ENABLE_CUDASIM:

    def widen_bits(bits):
        return np.array(np.uint32(bits) << np.uint32(16)).view(np.float32)[()]

    def narrow_bits(value):
        bits = int(np.array(np.float32(value)).view(np.uint32))
        if value != value:
            return np.uint16((bits >> 16) | 0x40)
        return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def widen_bits(bits):
        """The float32 value of a bfloat16's uint16 `bits` (exact)."""
        return libdevice.int_as_float(int32(uint32(bits) << uint32(16)))

    @cuda.jit(device=True, inline=True)
    def narrow_bits(value):
        """float32 `value` rounded to bfloat16, to nearest even, as bits
        (``softkern.cpu.bfloat16.narrow``: the same integer arithmetic)."""
        bits = uint32(libdevice.float_as_int(value))
        odd = (bits >> uint32(16)) & uint32(1)
        rounded = uint32(bits + uint32(0x7FFF) + odd) >> uint32(16)
        quiet = (bits >> uint32(16)) | uint32(0x40)
        return uint16(quiet if value != value else rounded)


def kernel_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a kernel's array of `dtype` elements has: bfloat16's bits."""
    return BFLOAT16_BITS if is_bfloat16(dtype) else dtype


def loader(dtype: np.dtype, acc: np.dtype):
    """``load(x[i])``: an element of a `dtype` array as the `acc` type."""
    if is_bfloat16(dtype):
        return widen_bits
    return from_dtype(acc)


def storer(dtype: np.dtype):
    """``out[i] = store(v)``: a computed value as a `dtype` element."""
    if is_bfloat16(dtype):
        return narrow_bits
    return from_dtype(dtype)


@cuda.jit
def _widen3(bits, out):
    i = int64(cuda.grid(1))
    _, n, inner = bits.shape
    while i < out.size:
        r = i // inner
        out[r // n, r % n, i % inner] = widen_bits(bits[r // n, r % n, i % inner])
        i += cuda.gridsize(1)


def widened(bits3, stream=0):
    """A new C-contiguous float32 device array of the bfloat16 values whose
    bits the (outer, n, inner) device array `bits3` holds (any strides): the
    probability targets, weights and upstream gradients of a bfloat16 loss,
    which its kernels read as float32.

    Launch config: one thread per element, grid-stride, [<= MAX_GRID, 256].
    """
    out = cuda.device_array(bits3.shape, np.float32, stream=stream)
    if out.size:
        grid = elementwise_grid(out.size)
        _widen3[grid, DEFAULT_BLOCK, stream](bits3, out)
    return out


def ptx_cases(block: int = DEFAULT_BLOCK):
    """The widening kernel with its argument types, for compile checks (as
    ``softkern.cuda.reduce.ptx_cases``)."""
    from numba import float32

    yield (
        "widen3/bfloat16",
        _widen3,
        (uint16[:, :, :], float32[:, :, ::1]),
        "float32",
        None,
    )
