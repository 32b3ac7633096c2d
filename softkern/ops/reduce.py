"""sum, amax, amin and dot: validate, plan, dispatch to the CPU or GPU kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from softkern import _dispatch, _dtypes, _launch, _layout
from softkern.cpu import reduce as cpu_reduce
from softkern.cuda import reduce as cuda_reduce

Dim = int | Sequence[int] | None
# The kernels' catalogue is the one list of supported dtypes (by name:
# bfloat16's type exists only once ml_dtypes is imported).
REDUCE_NAMES = cuda_reduce.REDUCE_DTYPES + cuda_reduce.SMALL_DTYPES
DOT_DTYPES = tuple(np.dtype(n).type for n in cuda_reduce.FLOAT_DTYPES)
_FLOAT16 = np.dtype(np.float16)
_FLOAT32 = np.dtype(np.float32)
_BOOL = np.dtype(np.bool_)


def _check_reduce_dtype(dtype: np.dtype, fn: str) -> None:
    if dtype.name not in REDUCE_NAMES or (
        dtype.kind == "V" and not _dtypes.is_bfloat16(dtype)
    ):
        names = ", ".join(REDUCE_NAMES)
        raise TypeError(f"{fn}: x has dtype {dtype}; supported: {names}")


class ReducePlan(NamedTuple):
    """One reduction's checked arguments and kernel choice, for a shape.

    `kind`: "empty" (nothing to compute), "full" (every dim: a 1-D view,
    ``FullReducePlan``), "rows" (an (outer, n) view, the reduced dims last
    and contiguous in the view) or "columns" (an (outer, n, inner) view);
    `dims` the sorted reduced dims, `view` the kernel's view shape.
    """

    op: str
    strategy: int
    dims: tuple[int, ...]
    out_shape: tuple[int, ...]
    acc: np.dtype
    result: np.dtype  # acc, or the 16-bit float or small integer it rounds to
    start: np.generic
    kind: str
    view: tuple[int, ...]
    launch: Any  # FullReducePlan or DimReducePlan
    parallel: bool


@_dispatch.plan_cache
def reduce_plan(
    op: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    dim: Dim,
    keepdim: bool,
    strategy: int,
    block: int | None,
) -> ReducePlan:
    fn = f"softkern.{op}"
    strategy = _launch.check_strategy(strategy)
    block = _launch.check_block(block)
    _check_reduce_dtype(dtype, fn)
    dims = _layout.normalize_dims(dim, len(shape))
    out_shape = _layout.reduced_shape(shape, dims, bool(keepdim))
    acc = cuda_reduce.acc_dtype(op, dtype)
    if op != "sum":
        for d in dims:
            if shape[d] == 0:
                raise IndexError(
                    f"{fn}: cannot reduce over dim {d} of size 0 "
                    f"(x has shape {shape}); {op} of no elements is undefined"
                )
    start = cpu_reduce.start_of(op, dtype)
    size = math.prod(shape)
    if math.prod(out_shape) == 0:
        kind, view, launch = "empty", (), None
    elif len(dims) == len(shape):
        kind, view = "full", (size,)
        launch = _launch.full_reduce_plan(size, block)
    else:
        outer, n, inner = _layout.around_sizes(shape, dims)
        launch = _launch.dim_reduce_plan(outer, n, inner, block)
        kind = launch.regime
        view = (outer, n) if kind in ("rows", "split") else (outer, n, inner)
    parallel = _launch.cpu_parallel(size * dtype.itemsize)
    result = cuda_reduce.result_dtype(op, dtype)
    return ReducePlan(
        op, strategy, dims, out_shape, acc, result, start, kind, view, launch, parallel
    )


def _reduce(
    op: str, x: Any, dim: Dim, keepdim: bool, strategy: int, block: int | None
) -> Any:
    host = _dispatch.cpu_array(x)
    if host is None:
        return _reduce_gpu(op, x, dim, keepdim, strategy, block)
    plan = reduce_plan(
        op, host.shape, host.dtype, _dispatch.key(dim), keepdim, strategy, block
    )
    kernel_op = cpu_reduce.OPS[op]
    launch = plan.launch
    if host.dtype == _FLOAT16:  # Numba cannot load float16 on the CPU: a copy
        host = host.astype(_FLOAT32)
    elif host.dtype == _BOOL:  # 0 and 1: uint8's kernels, one compile fewer
        host = host.view(np.uint8)
    if plan.kind == "full":
        value = cpu_reduce.full_reduce_kernel(
            kernel_op,
            _dtypes.kernel_view(host.reshape(plan.view)),
            launch.grid,
            launch.block,
            plan.strategy,
            plan.start,
            plan.parallel,
        )
        # a value the kernel returned: made into the result, not written in
        # (rounded from the accumulator once, as the GPU's last store does)
        return _as_result(np.array(value, plan.acc), plan).reshape(plan.out_shape)
    out = _dispatch.host_empty(plan.out_shape, plan.acc)
    if plan.kind == "empty":
        return _as_result(out, plan)
    xv = _dtypes.kernel_view(_dispatch.three_d(host, plan.dims, plan.view))
    if plan.kind == "split":  # each row the GPU's full reduction, replayed
        flat = out.reshape(-1)
        for r in range(xv.shape[0]):
            flat[r] = cpu_reduce.full_reduce_kernel(
                kernel_op,
                xv[r],
                launch.grid,
                launch.block,
                plan.strategy,
                plan.start,
                plan.parallel,
            )
    elif plan.kind == "rows":
        cpu_reduce.rows_kernel(
            kernel_op,
            xv,
            out.reshape(-1),
            launch.group,
            plan.strategy,
            plan.start,
            plan.parallel,
        )
    else:
        cpu_reduce.columns_kernel(
            kernel_op,
            xv,
            out.reshape(plan.view[0], plan.view[2]),
            launch.lanes,
            plan.strategy,
            plan.start,
            plan.parallel,
        )
    return _as_result(out, plan)


def _as_result(acc: np.ndarray, plan: ReducePlan) -> np.ndarray:
    """The kernel's accumulators as the result dtype (float32 rounded to
    float16 or bfloat16, int32 maxima back to bool or small integers)."""
    if plan.result == plan.acc:
        return acc
    return acc.astype(plan.result)


def _flat(out: Any) -> Any:
    """A contiguous output, seen by the kernels as one dim."""
    itemsize = np.dtype(out.dtype).itemsize
    return _dispatch.strided_view(
        out, (math.prod(out.shape),), (itemsize,), writeable=True
    )


def _reduce_gpu(
    op: str, x: Any, dim: Dim, keepdim: bool, strategy: int, block: int | None
) -> Any:
    a = _dispatch.Operand(x, "x")
    plan = reduce_plan(
        op, a.shape, a.dtype, _dispatch.key(dim), keepdim, strategy, block
    )
    native, out = a.empty(plan.out_shape, plan.result)
    if plan.kind == "empty":
        return native
    stream = a.call.stream
    with a.call.on_device():
        if plan.kind == "full":
            cuda_reduce.launch_full(
                op,
                a.view([(0, len(a.shape))]),
                _flat(out),
                plan.launch,
                plan.strategy,
                stream,
                lambda s, d: a.empty(s, d)[1],
                a.dtype,
            )
            return native
        x3 = a.around(plan.dims)
        outer, n, inner = x3.shape
        if plan.kind != "columns":  # the (outer, n) rows, inner == 1
            rows = _dispatch.strided_view(x3, (outer, n), x3.strides[:2])
        if plan.kind == "split":
            cuda_reduce.launch_split(
                op,
                rows,
                _flat(out),
                plan.launch,
                plan.strategy,
                stream,
                lambda s, d: a.empty(s, d)[1],
                a.dtype,
            )
            return native
        if plan.kind == "rows":
            kx = rows
            kout = _flat(out)
        else:
            kx = x3
            item = plan.result.itemsize
            kout = _dispatch.strided_view(
                out, (outer, inner), (inner * item, item), writeable=True
            )
        cuda_reduce.launch_dim(
            op, kx, kout, plan.launch, plan.strategy, stream, a.dtype
        )
    return native


@_dispatch.public_function
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


@_dispatch.public_function
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


@_dispatch.public_function
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


@_dispatch.plan_cache
def dot_plan(
    x_shape: tuple[int, ...],
    x_dtype: np.dtype,
    y_shape: tuple[int, ...],
    y_dtype: np.dtype,
    strategy: int,
    block: int | None,
) -> tuple[int, _launch.FullReducePlan, bool]:
    """(strategy, launch plan, CPU threading) of a dot product, after
    checking the operands."""
    strategy = _launch.check_strategy(strategy)
    block = _launch.check_block(block)
    for name, shape, dtype in (("x", x_shape, x_dtype), ("y", y_shape, y_dtype)):
        _dispatch.check_dtype(dtype, DOT_DTYPES, "softkern.dot", name)
        if len(shape) != 1:
            raise ValueError(f"softkern.dot: {name} must be 1-D, got shape {shape}")
    if x_dtype != y_dtype:
        raise TypeError(
            f"softkern.dot: x and y must have one dtype, got {x_dtype} and {y_dtype}"
        )
    if x_shape != y_shape:
        raise ValueError(
            f"softkern.dot: x and y must have the same length, got {x_shape[0]} "
            f"and {y_shape[0]}"
        )
    parallel = _launch.cpu_parallel(2 * x_shape[0] * x_dtype.itemsize)
    return strategy, _launch.full_reduce_plan(x_shape[0], block), parallel


@_dispatch.public_function
def dot(x: Any, y: Any, *, reduce: int = 2, block: int | None = None) -> Any:
    """Dot product of two 1-D float vectors of one dtype, like ``torch.dot``.

    Each product is added with a fused multiply-add (one rounding), on both
    devices, so CPU and GPU agree bit for bit for the same `reduce`, `block`.
    """
    if type(x) is not np.ndarray or type(y) is not np.ndarray:
        if _dispatch.device_of(x, y) == "cuda":
            return _dot_gpu(x, y, reduce, block)
        x, y = np.asarray(x), np.asarray(y)
    strategy, launch, parallel = dot_plan(
        x.shape, x.dtype, y.shape, y.dtype, reduce, block
    )
    value = cpu_reduce.dot_kernel(x, y, launch.grid, launch.block, strategy, parallel)
    return np.array(value, x.dtype)


def _dot_gpu(x: Any, y: Any, reduce: int, block: int | None) -> Any:
    a, b = _dispatch.Operand(x, "x"), _dispatch.Operand(y, "y")
    strategy, launch, _ = dot_plan(a.shape, a.dtype, b.shape, b.dtype, reduce, block)
    native, out = a.empty((), a.dtype)
    with a.call.on_device():
        cuda_reduce.launch_dot(
            a.view([(0, 1)]),
            b.view([(0, 1)]),
            _flat(out),
            launch,
            strategy,
            a.call.stream,
            lambda s, d: a.empty(s, d)[1],
        )
    return native


__all__ = ["amax", "amin", "dot", "sum"]
