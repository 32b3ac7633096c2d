"""bfloat16, the one dtype softkern takes that NumPy lacks.

NumPy arrays of bfloat16 are ``ml_dtypes.bfloat16`` arrays (the dtype JAX
and TensorFlow use; its ``name`` is "bfloat16" and its kind "V"), imported
only when a bfloat16 is asked for by name. Kernels never see that dtype:
the CPU kernels read its 16-bit patterns as uint16 (``softkern.cpu.bfloat16``
widens them to float32 as they load), and everything computes in float32,
as PyTorch does, rounding to bfloat16 only where a result is stored.
"""

from __future__ import annotations

import numpy as np

BFLOAT16 = "bfloat16"
# How the CPU kernels see a bfloat16 array: its bits.
BFLOAT16_BITS = np.dtype(np.uint16)


def is_bfloat16(dtype: np.dtype) -> bool:
    # kind first: a one-character attribute, where .name builds a string
    # (this runs several times in every call)
    return dtype.kind == "V" and dtype.name == BFLOAT16


def is_float(dtype: np.dtype) -> bool:
    """A floating-point dtype: NumPy's own, or bfloat16."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def bfloat16() -> np.dtype:
    """``ml_dtypes.bfloat16`` as a NumPy dtype."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "softkern: bfloat16 arrays need the ml_dtypes package "
            "(pip install ml_dtypes, or softkern[torch])"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def dtype_named(name: str) -> np.dtype:
    """np.dtype(name), with "bfloat16" meaning ml_dtypes' bfloat16."""
    return bfloat16() if name == BFLOAT16 else np.dtype(name)


def kernel_view(x: np.ndarray) -> np.ndarray:
    """`x` as the CPU kernels read it: a bfloat16 array as its bits (a view),
    any other array as itself."""
    return x.view(BFLOAT16_BITS) if is_bfloat16(x.dtype) else x
