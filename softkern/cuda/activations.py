"""GPU sigmoid and logsigmoid (a thread per element, grid-stride), and the
pieces of gumbel_softmax: Gumbel noise from Numba's xoroshiro128+ states
and the one-hot of the argmax along a dim.

The activations use e = exp(-|x|), which never overflows, as the CPU
kernels do (``cpu.activations``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int64
from numba.np.numpy_support import from_dtype

from softkern._index import first_argmax as _first_argmax
from softkern.cuda.softmax import _types, bounded_kernel

first_argmax = cuda.jit(device=True, inline=True)(_first_argmax)

# "identity" converts dtypes (gumbel_softmax's float16 result).
UNARY = ("sigmoid", "logsigmoid", "identity")


@functools.cache
def unary_kernel(name: str, block: int, dtype):
    """out[i] = name(x[i]) over 1-D arrays (x of any real dtype, out of
    `dtype`; float16 computes in float32).

    Launch config: ``FullReducePlan`` of the element count: [grid, block].
    """
    acc, out_type, acc_dt = _types(dtype)
    zero = acc_dt.type(0)
    one = acc_dt.type(1)
    logsigmoid = name == "logsigmoid"
    identity = name == "identity"

    @bounded_kernel(block)
    def activation(x, out):
        i = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        while i < x.size:
            v = acc(x[i])
            e = math.exp(-abs(v))
            if identity:
                out[i] = out_type(v)
            elif logsigmoid:
                out[i] = out_type(min(v, zero) - math.log1p(e))
            else:
                s = one / (one + e)
                out[i] = out_type(s if v >= zero else e * s)
            i += int64(cuda.gridDim.x) * block

    return activation


@functools.cache
def _uniform(dtype):
    """Device function: a uniform in [0, 1) of `dtype` from a thread's
    xoroshiro128+ state. float32 takes the top 24 bits of the next output:
    exact, and no float64 (Numba's own xoroshiro128p_uniform_float32
    converts through float64)."""
    # Imported here: importing numba.cuda.random emits deprecation warnings
    # (numba-cuda's own jit options), which `import softkern` should not.
    from numba.cuda.random import xoroshiro128p_next, xoroshiro128p_uniform_float64

    if np.dtype(dtype) == np.float64:
        return xoroshiro128p_uniform_float64

    @cuda.jit(device=True, inline=True)
    def uniform_float32(states, index):
        bits = xoroshiro128p_next(states, index) >> np.uint64(40)
        return float32(bits) * float32(2.0**-24)

    return uniform_float32


@functools.cache
def gumbel_kernel(block: int, dtype):
    """z[i] = (x[i] + g) / tau with g = -log(-log(u)), u uniform in (0, 1]
    from the thread's own xoroshiro128+ state (`states` has one per thread
    of the grid: the same seed and grid give the same noise).

    Launch config: ``FullReducePlan`` of the element count: [grid, block].
    """
    acc, _, acc_dt = _types(dtype)
    one = acc_dt.type(1)
    inf = acc_dt.type(np.inf)
    uniform = _uniform(acc_dt)

    @bounded_kernel(block)
    def gumbel_noise(x, states, tau, z):
        thread = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        i = thread
        while i < x.size:
            # uniform() is in [0, 1): 1 - u is in (0, 1], so -log(1 - u) is
            # a finite Exp(1) draw or 0, and -log of that is the Gumbel noise
            # (+inf when the draw is 0, as PyTorch's exponential_().log()).
            u = one - acc(uniform(states, thread))
            v = acc(x[i])
            z[i] = (v - math.log(-math.log(u))) / tau if u < one else v / tau + inf
            i += int64(cuda.gridDim.x) * block

    return gumbel_noise


@functools.cache
def one_hot_kernel(block: int, dtype):
    """out[o, :, c] = one-hot of the first argmax of y[o, :, c] (NaN counts
    as the max), a thread per (o, c), grid-stride.

    Launch config: ``FullReducePlan`` of outer * inner: [grid, block].
    """
    _, out_type, _ = _types(dtype)

    @bounded_kernel(block)
    def one_hot_max(y, out):
        outer, n, inner = y.shape
        i = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        while i < outer * inner:
            o = i // inner
            c = i - o * inner
            best = first_argmax(y, o, c)
            for k in range(n):
                out[o, k, c] = out_type(1 if k == best else 0)
            i += int64(cuda.gridDim.x) * block

    return one_hot_max


# --- catalogue for compile checks -------------------------------------------


def ptx_cases(block: int = 256):
    """sigmoid, logsigmoid, gumbel noise and the one-hot kernel, as
    ``cuda.reduce.ptx_cases``."""
    from numba.cuda.random import xoroshiro128p_type  # see _uniform

    for name in ("float32", "float64", "float16"):
        dtype = np.dtype(name)
        t = from_dtype(dtype)
        acc = from_dtype(_types(dtype)[2])
        for op in UNARY:
            yield (
                f"{op}/{name}",
                unary_kernel(op, block, dtype),
                (t[:], t[::1]),
                name,
                None,
            )
        yield (
            f"one_hot/{name}",
            one_hot_kernel(block, dtype),
            (acc[:, :, ::1], t[:, :, ::1]),
            name,
            None,
        )
        if name != "float16":
            yield (
                f"gumbel/{name}",
                gumbel_kernel(block, dtype),
                (t[:], xoroshiro128p_type[::1], acc, acc[::1]),
                name,
                None,
            )
