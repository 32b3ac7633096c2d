"""One table of reference implementations, shared by tests and benchmarks.

``EXACT`` computes in float64 (int64 for integers) and is what tests compare
against; ``BASELINE`` is what a user would otherwise call on the same array
in its own dtype, and is the reference row of every benchmark group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _wide(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.int64 if x.dtype.kind in "iub" else np.float64)


def _axis(dim):
    return None if dim == () else dim


EXACT: dict[str, Callable] = {
    "sum": lambda x, dim=None, keepdim=False: np.sum(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "amax": lambda x, dim=None, keepdim=False: np.max(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "amin": lambda x, dim=None, keepdim=False: np.min(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "dot": lambda x, y: np.dot(_wide(x), _wide(y)),
}

BASELINE: dict[str, Callable] = {
    "sum": np.sum,
    "amax": np.max,
    "amin": np.min,
    "dot": np.dot,
}


def numpy_softmax(x, dim: int) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) over `dim`, in x's own dtype: the
    formula a NumPy user writes (one temporary, updated in place)."""
    x = np.asarray(x)
    e = np.subtract(x, np.max(x, axis=dim, keepdims=True))
    np.exp(e, out=e)
    e /= np.sum(e, axis=dim, keepdims=True)
    return e


def numpy_log_softmax(x, dim: int) -> np.ndarray:
    """(x - max) - log(sum(exp(x - max))) over `dim`, in x's own dtype."""
    x = np.asarray(x)
    shifted = np.subtract(x, np.max(x, axis=dim, keepdims=True))
    shifted -= np.log(np.sum(np.exp(shifted), axis=dim, keepdims=True))
    return shifted


EXACT["softmax"] = lambda x, dim: numpy_softmax(_wide(x).astype(np.float64), dim)
EXACT["log_softmax"] = lambda x, dim: numpy_log_softmax(
    _wide(x).astype(np.float64), dim
)

try:
    from scipy import special as _special
except ImportError:  # scipy is a test extra: fall back to the same formulas
    BASELINE["softmax"] = numpy_softmax
    BASELINE["log_softmax"] = numpy_log_softmax
else:
    BASELINE["softmax"] = lambda x, dim: _special.softmax(x, axis=dim)
    BASELINE["log_softmax"] = lambda x, dim: _special.log_softmax(x, axis=dim)
