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
