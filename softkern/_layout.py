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


def around_sizes(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, int, int]:
    """Sizes of the (outer, n, inner) view around the sorted `dims` that
    ``_dispatch.three_d`` makes: dims apart are moved last first (inner 1);
    no dims (a 0-d array) is one slice of one element."""
    if not dims:
        return 1, 1, 1
    if is_consecutive(dims):
        return outer_n_inner(shape, dims)
    n = math.prod(shape[d] for d in dims)
    return math.prod(s for d, s in enumerate(shape) if d not in dims), n, 1


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


# --- broadcasting --------------------------------------------------------------


def _as_shape(shape, what: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"{what} must be a tuple of ints, got {shape!r}") from None
    if any(isinstance(s, (bool, np.bool_)) for s in shape):
        raise TypeError(f"{what} must be a tuple of ints, got {shape!r}")
    return out


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """The shape that `shapes` broadcast to (NumPy's and PyTorch's rule):
    shapes are aligned at the right; each dim's sizes must be equal or 1.
    A shape that does not broadcast is a ValueError naming both shapes and
    the dim where they disagree."""
    shapes = [_as_shape(s, "shape") for s in shapes]
    for s in shapes:
        if any(d < 0 for d in s):
            raise ValueError(f"negative size in shape {s}")
    ndim = max((len(s) for s in shapes), default=0)
    result = [1] * ndim
    owner = [None] * ndim  # which shape set each dim's size
    for s in shapes:
        for i, size in enumerate(s):
            d = ndim - len(s) + i
            if size == 1:
                continue
            if result[d] == 1:
                result[d], owner[d] = size, s
            elif result[d] != size:
                raise ValueError(
                    f"shapes {owner[d]} and {s} do not broadcast: at dim {d} of "
                    f"the result (dim {i} of {s}) the sizes are {result[d]} and "
                    f"{size}; each must be 1 or the same"
                )
    return tuple(result)


def expand_shape(shape: tuple[int, ...], sizes) -> tuple[int, ...]:
    """The shape of ``torch.Tensor.expand(*sizes)`` of an array of `shape`:
    -1 keeps a size; new dims only in front (where -1 is not allowed); only
    size-1 dims grow. Errors are ValueErrors in PyTorch's words."""
    sizes = _as_shape(sizes, "sizes")
    if len(sizes) < len(shape):
        raise ValueError(
            f"expand: the number of sizes provided ({len(sizes)}) must be greater "
            f"or equal to the number of dimensions in the array ({len(shape)}); "
            f"sizes {list(sizes)}, array shape {list(shape)}"
        )
    lead = len(sizes) - len(shape)
    out = []
    for d, size in enumerate(sizes):
        if d < lead:
            if size < 0:
                raise ValueError(
                    f"expand: the expanded size {size} is not allowed in the "
                    f"leading, non-existing dimension {d}; sizes {list(sizes)}, "
                    f"array shape {list(shape)}"
                )
            out.append(size)
            continue
        have = shape[d - lead]
        if size == -1:
            size = have
        elif size < -1:
            raise ValueError(f"expand: invalid size {size} at dimension {d}")
        elif size != have and have != 1:
            raise ValueError(
                f"expand: the expanded size ({size}) must match the existing "
                f"size ({have}) at non-singleton dimension {d}. Target sizes: "
                f"{list(sizes)}. Array sizes: {list(shape)}"
            )
        out.append(size)
    return tuple(out)


def broadcast_strides(
    shape: tuple[int, ...], strides: tuple[int, ...], out_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """Strides (in elements) reading an array of `shape` and `strides` as if
    it had `out_shape`: 0 on every broadcast or new leading dim."""
    lead = len(out_shape) - len(shape)
    out = [0] * lead
    for size, stride, want in zip(shape, strides, out_shape[lead:], strict=True):
        out.append(0 if size == 1 and want != 1 else stride)
    return tuple(out)


def collapse(
    shape: tuple[int, ...], strides: Sequence[tuple[int, ...]]
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Drop size-1 dims and merge neighbouring dims that every operand walks
    as one (stride[d] == stride[d + 1] * shape[d + 1] for all of them), so a
    broadcast is done with as few dims as possible. Returns at least 1 dim."""
    keep = [d for d in range(len(shape)) if shape[d] != 1]
    new_shape: list[int] = []
    new_strides: list[list[int]] = [[] for _ in strides]
    for d in keep:
        if new_shape and all(
            s[-1] == st[d] * shape[d]
            for s, st in zip(new_strides, strides, strict=True)
        ):
            new_shape[-1] *= shape[d]
            for s, st in zip(new_strides, strides, strict=True):
                s[-1] = st[d]
            continue
        new_shape.append(shape[d])
        for s, st in zip(new_strides, strides, strict=True):
            s.append(st[d])
    if not new_shape:
        return (1,), [(0,) for _ in strides]
    return tuple(new_shape), [tuple(s) for s in new_strides]
