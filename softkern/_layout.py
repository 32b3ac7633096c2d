"""Shapes and strides: dim normalisation and the (outer, n, inner) view.

Pure functions on tuples, shared by both devices, so they are tested once.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence

import numpy as np
from numpy.exceptions import AxisError


def normalize_dims(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """Return the sorted, non-negative dims that `dim` names.

    `None` and `()` mean every dim (as `torch.sum(x, dim=())` does). A 0-d
    array accepts dim 0 and -1, as in PyTorch. Out of range: `AxisError`;
    a dim named twice: `ValueError`.
    """
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if not isinstance(dim, (tuple, list)) else tuple(dim)
    if not dims:
        return tuple(range(ndim))
    bound = max(ndim, 1)
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)):
            raise TypeError(f"dim must be an int, got the bool {d!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(
                f"dim must be None, an int or a tuple of ints, got {dim!r}"
            ) from None
        if not -bound <= d < bound:
            raise AxisError(d, bound, "dim")
        out.append(d % bound)
    if len(set(out)) != len(out):
        raise ValueError(f"dim {dim!r} names the same dimension twice")
    return tuple(sorted(d for d in out if d < ndim))


def reduced_shape(
    shape: tuple[int, ...], dims: tuple[int, ...], keepdim: bool
) -> tuple[int, ...]:
    if keepdim:
        return tuple(1 if i in dims else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def is_consecutive(dims: tuple[int, ...]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(dims))


def outer_n_inner(
    shape: tuple[int, ...], dims: tuple[int, ...]
) -> tuple[int, int, int]:
    """Sizes of the (outer, n, inner) view around consecutive `dims`."""
    first, last = dims[0], dims[-1]
    return (
        math.prod(shape[:first]),
        math.prod(shape[first : last + 1]),
        math.prod(shape[last + 1 :]),
    )


def merge_strides(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    groups: Sequence[tuple[int, int]],
    itemsize: int,
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Merge each half-open run of dims [lo, hi) into one dim, without a copy.

    Returns the merged shape and strides, or None when some run cannot be
    addressed with a single stride (then the caller must copy). Size-1 dims
    never block a merge; an empty run becomes a dim of size 1.
    """
    new_shape, new_strides = [], []
    for lo, hi in groups:
        size = math.prod(shape[lo:hi])
        kept = [d for d in range(lo, hi) if shape[d] != 1]
        stride = strides[kept[-1]] if kept else itemsize
        for a, b in itertools.pairwise(kept):
            if strides[a] != strides[b] * shape[b]:
                return None
        new_shape.append(size)
        new_strides.append(stride if size > 1 else itemsize)
    return tuple(new_shape), tuple(new_strides)
