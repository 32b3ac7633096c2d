"""@njit CPU kernels, one module per operation family (as ``softkern.cuda``)."""

from __future__ import annotations

from typing import Any

from numba import njit
from numba.core.cpu import ParallelOptions


def parallel_kernel(**options: Any) -> Any:
    """``njit(parallel=..., cache=True)`` for a kernel whose only parallel
    loops are its ``prange`` loops.

    NumPy calls inside a kernel (``np.zeros`` for a strip's scratch, ``a[:] =
    v``) stay plain loops: left to Numba's auto-parallelisation they would
    each start a parallel region of their own, even on the serial branch a
    kernel takes for a small input.

    Division follows NumPy's error model (1 / 0 is inf, as in PyTorch), not
    Python's: Python's raises ZeroDivisionError, and the test before every
    division kept loops from vectorising (sigmoid on the calling thread ran
    13x slower than in its parallel loop, whose body Numba compiles with
    NumPy's model).
    """
    only_prange = {
        "prange": True,
        "comprehension": False,
        "reduction": False,
        "inplace_binop": False,
        "setitem": False,
        "numpy": False,
        "stencil": False,
        "fusion": False,
    }
    # An options object, not the dict: Numba pops the dict's keys as it reads
    # them, so a kernel's second specialisation would see {} (everything on).
    return njit(
        parallel=ParallelOptions(only_prange),
        cache=True,
        error_model="numpy",
        **options,
    )
