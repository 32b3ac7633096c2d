"""sum, amax, amin and dot: validate, plan, dispatch to the CPU or GPU kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from softkern import _dispatch, _launch, _layout
from softkern.cpu import reduce as cpu_reduce
from softkern.cuda import reduce as cuda_reduce

Dim = int | Sequence[int] | None
# The kernels' catalogue is the one list of supported dtypes.
REDUCE_DTYPES = tuple(np.dtype(n).type for n in cuda_reduce.REDUCE_DTYPES)
DOT_DTYPES = tuple(np.dtype(n).type for n in cuda_reduce.FLOAT_DTYPES)


class _Operand:
    """One array argument, as the kernels of its device read it.

    Holds the kernel-side array (a NumPy array, or a Numba or simulator device
    array) and, for the GPU, the caller's kind of array, allocator and stream.
    """

    def __init__(self, x: Any, name: str):
        self.device = _dispatch.device_of(x)
        if self.device == "cpu":
            self.array = np.asarray(x)
            self.call = None
        else:
            self.array, self.call = _dispatch.gpu_operand(x)
        self.name = name
        self.dtype = np.dtype(self.array.dtype)
        self.shape = tuple(self.array.shape)

    def check_dtype(self, allowed: tuple, what: str) -> None:
        if self.dtype.type not in allowed:
            names = ", ".join(np.dtype(t).name for t in allowed)
            raise TypeError(
                f"{what}: {self.name} has dtype {self.dtype}; supported: {names}"
            )

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any]:
        if self.call is None:
            arr = np.empty(shape, dtype)
            return arr, arr
        return self.call.empty(shape, dtype)

    def view(self, groups: Sequence[tuple[int, int]], arr: Any = None) -> Any:
        """`arr` (default: the operand) with each run of dims merged into one;
        copies only when the strides do not allow a view."""
        arr = self.array if arr is None else arr
        shape, strides = tuple(arr.shape), tuple(arr.strides)
        merged = _layout.merge_strides(shape, strides, groups, self.dtype.itemsize)
        if merged is None:
            if self.call is None:
                arr = np.ascontiguousarray(arr)
            else:
                with self.call.on_device():
                    arr = _dispatch.gpu_contiguous(arr, self.call)
            merged = _layout.merge_strides(
                shape, tuple(arr.strides), groups, self.dtype.itemsize
            )
        return _dispatch.strided_view(arr, *merged)

    def around(self, dims: Sequence[int]) -> Any:
        """The operand as an (outer, n, inner) view, n the product of the
        sorted `dims` (at least one). Dims apart are first moved last (a
        strided view); a copy happens only where strides cannot merge."""
        ndim = len(self.shape)
        if _layout.is_consecutive(dims):
            first, last = dims[0], dims[-1]
            return self.view([(0, first), (first, last + 1), (last + 1, ndim)])
        kept = [d for d in range(ndim) if d not in dims]
        return self.view(
            [(0, len(kept)), (len(kept), ndim), (ndim, ndim)],
            self.permuted(kept + list(dims)),
        )

    def permuted(self, order: Sequence[int]) -> Any:
        strides = tuple(self.array.strides)
        return _dispatch.strided_view(
            self.array,
            tuple(self.shape[d] for d in order),
            tuple(strides[d] for d in order),
        )


def _flat(out: Any) -> Any:
    """A contiguous output, seen by the kernels as one dim."""
    itemsize = np.dtype(out.dtype).itemsize
    return _dispatch.strided_view(
        out, (math.prod(out.shape),), (itemsize,), writeable=True
    )


def _reduce(
    op: str, x: Any, dim: Dim, keepdim: bool, strategy: int, block: int | None
) -> Any:
    strategy = _launch.check_strategy(strategy)
    block = _launch.check_block(block)
    a = _Operand(x, "x")
    a.check_dtype(REDUCE_DTYPES, f"softkern.{op}")
    dims = _layout.normalize_dims(dim, len(a.shape))
    out_shape = _layout.reduced_shape(a.shape, dims, bool(keepdim))
    acc_dtype = cuda_reduce.acc_dtype(op, a.dtype)
    if op != "sum":
        for d in dims:
            if a.shape[d] == 0:
                raise IndexError(
                    f"softkern.{op}: cannot reduce over dim {d} of size 0 "
                    f"(x has shape {a.shape}); {op} of no elements is undefined"
                )
    native, out = a.empty(out_shape, acc_dtype)
    if math.prod(out_shape) == 0:
        return native

    ndim = len(a.shape)
    if len(dims) == ndim:
        _full(op, a, _flat(out), strategy, block)
        return native

    x3 = a.around(dims)
    outer, n, inner = x3.shape
    plan = _launch.dim_reduce_plan(outer, n, inner, block)
    if plan.regime == "rows":
        kx = _dispatch.strided_view(x3, (outer, n), x3.strides[:2])
        kout = _flat(out)
    else:
        kx = x3
        item = np.dtype(acc_dtype).itemsize
        kout = _dispatch.strided_view(
            out, (outer, inner), (inner * item, item), writeable=True
        )
    if a.call is None:
        cpu_reduce.reduce_dim(op, kx, kout, plan, strategy)
    else:
        with a.call.on_device():
            cuda_reduce.launch_dim(op, kx, kout, plan, strategy, a.call.stream)
    return native


def _full(op: str, a: _Operand, out: Any, strategy: int, block: int) -> None:
    x1 = a.view([(0, len(a.shape))])
    plan = _launch.full_reduce_plan(x1.shape[0], block)
    if a.call is None:
        out[0] = cpu_reduce.full_reduce(op, x1, plan, strategy)
        return
    with a.call.on_device():
        cuda_reduce.launch_full(
            op, x1, out, plan, strategy, a.call.stream, lambda s, d: a.empty(s, d)[1]
        )


def sum(
    x: Any,
    dim: Dim = None,
    keepdim: bool = False,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Sum of `x` over `dim` (None or () for all elements), like ``torch.sum``.

    Integer input accumulates in int64. `reduce` picks the block strategy
    (0 interleaved pairs, 1 sequential halving, 2 warp shuffle), `block` the
    threads per block (a power of two, 32 to 1024; default 256). The CPU
    result equals the GPU result bit for bit for the same `reduce` and `block`.
    Returns an array of `x`'s kind (0-d for a full reduction).
    """
    return _reduce("sum", x, dim, keepdim, reduce, block)


def amax(
    x: Any,
    dim: Dim = None,
    keepdim: bool = False,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Maximum of `x` over `dim`, like ``torch.amax``: NaN propagates, and an
    empty reduced dim is an IndexError."""
    return _reduce("amax", x, dim, keepdim, reduce, block)


def amin(
    x: Any,
    dim: Dim = None,
    keepdim: bool = False,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Minimum of `x` over `dim`, like ``torch.amin``: NaN propagates, and an
    empty reduced dim is an IndexError."""
    return _reduce("amin", x, dim, keepdim, reduce, block)


def dot(x: Any, y: Any, *, reduce: int = 2, block: int | None = None) -> Any:
    """Dot product of two 1-D float vectors of one dtype, like ``torch.dot``.

    Each product is added with a fused multiply-add (one rounding), on both
    devices, so CPU and GPU agree bit for bit for the same `reduce`, `block`.
    """
    strategy = _launch.check_strategy(reduce)
    block = _launch.check_block(block)
    _dispatch.device_of(x, y)
    a, b = _Operand(x, "x"), _Operand(y, "y")
    for v in (a, b):
        v.check_dtype(DOT_DTYPES, "softkern.dot")
        if len(v.shape) != 1:
            raise ValueError(f"softkern.dot: {v.name} must be 1-D, got shape {v.shape}")
    if a.dtype != b.dtype:
        raise TypeError(
            f"softkern.dot: x and y must have one dtype, got {a.dtype} and {b.dtype}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"softkern.dot: x and y must have the same length, got {a.shape[0]} "
            f"and {b.shape[0]}"
        )
    native, out = a.empty((), a.dtype)
    kout = _flat(out)
    plan = _launch.full_reduce_plan(a.shape[0], block)
    x1, y1 = a.view([(0, 1)]), b.view([(0, 1)])
    if a.call is None:
        kout[0] = cpu_reduce.dot(x1, y1, plan, strategy)
        return native
    with a.call.on_device():
        cuda_reduce.launch_dot(
            x1,
            y1,
            kout,
            plan,
            strategy,
            a.call.stream,
            lambda s, d: a.empty(s, d)[1],
        )
    return native


__all__ = ["amax", "amin", "dot", "sum"]
