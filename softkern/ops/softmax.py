"""softmax, log_softmax, logsumexp and the backward passes: validate, plan,
dispatch to the CPU or GPU kernels."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from softkern import _dispatch, _launch, _layout
from softkern.cpu import softmax as cpu_softmax
from softkern.cuda import softmax as cuda_softmax
from softkern.ops.reduce import _Operand

FLOAT_NAMES = cuda_softmax.OUT_DTYPES  # float16, float32, float64
DTypeLike = Any


def _as_dtype(dtype: DTypeLike, fn: str) -> np.dtype:
    """A NumPy dtype from a NumPy dtype-like or a torch dtype."""
    if hasattr(dtype, "is_floating_point") and not isinstance(dtype, type):
        dtype = str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> "float32"
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be a float dtype, got {dtype!r}") from None
    if dtype.name not in FLOAT_NAMES:
        raise TypeError(
            f"{fn}: dtype must be float16, float32 or float64, got {dtype.name}"
        )
    return dtype


def _out_dtype(a: _Operand, dtype: DTypeLike, fn: str) -> np.dtype:
    """The result dtype: `dtype` when given (x is cast to it before computing),
    else x's own dtype, which must be a float."""
    if dtype is not None:
        out = _as_dtype(dtype, fn)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{fn}: cannot cast x of dtype {a.dtype} to {out}")
        return out
    if a.dtype.name in FLOAT_NAMES:
        return a.dtype
    raise TypeError(
        f"{fn}: x has dtype {a.dtype}, but softmax needs float16, float32 or "
        f"float64 input; pass dtype=np.float32 (or np.float64) to cast it first"
    )


def legacy_softmax_dim(ndim: int, fn: str) -> int:
    """PyTorch's implicit dim for dim=None: 0 for 0-, 1- and 3-d input, else 1
    (it has warned that this is deprecated since 2017); so do we."""
    dim = 0 if ndim in (0, 1, 3) else 1
    warnings.warn(
        f"{fn}: implicit dimension choice is deprecated; softkern picked "
        f"dim={dim} for a {ndim}-d input as PyTorch does. Pass dim={dim} to "
        "keep this result without the warning.",
        UserWarning,
        stacklevel=4,
    )
    return dim


def _contiguous_view(out: Any, shape: tuple[int, ...]) -> Any:
    """A C-contiguous array (`out`) seen with another `shape` of equal size."""
    strides = _dispatch._c_strides(shape, np.dtype(out.dtype).itemsize)
    return _dispatch.strided_view(out, shape, strides, writeable=True)


def _three_d(a: _Operand, dims: tuple[int, ...]) -> Any:
    """x as (outer, n, inner) around `dims`; a 0-d x (no dims) as (1, 1, 1)."""
    if not a.shape:
        return _dispatch.strided_view(a.array, (1, 1, 1), (0, 0, 0))
    return a.around(dims)


def _rows(x3: Any, writeable: bool = False) -> Any:
    """The (outer, n) view of an (outer, n, 1) view."""
    return _dispatch.strided_view(x3, x3.shape[:2], x3.strides[:2], writeable=writeable)


def _frozen(a: np.ndarray) -> np.ndarray:
    """`a` as a read-only array (a view). Every CPU kernel input is read-only,
    as the views of the caller's arrays are, so Numba compiles one version
    of a kernel, not one per writeable flag (seconds each, on a cold cache)."""
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


@contextlib.contextmanager
def _computed_in(out: np.ndarray, acc: np.dtype) -> Iterator[np.ndarray]:
    """The array a CPU kernel writes for `out`: `out` itself, or, when `out`
    is float16 (which Numba cannot store on the CPU), an `acc` (float32)
    array that is rounded into `out` when the block ends."""
    if out.dtype == acc:
        yield out
    else:
        wide = np.empty(out.shape, acc)
        yield wide
        out[...] = wide


def _cpu_input(x3: np.ndarray) -> np.ndarray:
    # Numba has no float16 arithmetic on the CPU: float16 input is widened
    # first (a copy, for float16 only).
    return _frozen(x3.astype(np.float32) if x3.dtype == np.float16 else x3)


def _given_out(a: _Operand, out: Any, dtype: np.dtype, fn: str) -> tuple[Any, Any]:
    """(native, kernel view) of a caller's `out=` array, checked."""
    if isinstance(out, (int, float, complex, bool, list, tuple)):
        raise TypeError(f"{fn}: out must be an array, got {type(out).__name__}")
    o = _Operand(out, "out")
    if o.device != a.device:
        raise TypeError(
            f"{fn}: x is on the {a.device.upper()} but out is on the "
            f"{o.device.upper()}; pass them on one device"
        )
    if o.shape != a.shape:
        raise ValueError(f"{fn}: out must have shape {a.shape}, got {o.shape}")
    if o.dtype != dtype:
        raise TypeError(f"{fn}: out must have dtype {dtype}, got {o.dtype}")
    c_strides = _dispatch._c_strides(o.shape, dtype.itemsize)
    if any(
        size > 1 and stride != want
        for size, stride, want in zip(o.shape, o.array.strides, c_strides, strict=True)
    ):
        raise ValueError(f"{fn}: out must be C-contiguous")
    if o.call is None:
        if not o.array.flags.writeable:
            raise ValueError(f"{fn}: out is read-only")
        # Each element is read before it is written in every kernel, so x
        # itself may be out; any other overlap would read results as input.
        same = (
            o.array.__array_interface__["data"][0]
            == a.array.__array_interface__["data"][0]
            and o.array.strides == a.array.strides
        )
        if not same and np.shares_memory(o.array, a.array):
            raise ValueError(f"{fn}: out overlaps x (only out=x itself is allowed)")
    return out, o.array


def _forward(
    kind: str,
    x: Any,
    dim: int | None,
    dtype: DTypeLike,
    out: Any,
    strategy: int,
    block: int | None,
) -> Any:
    fn = f"softkern.{kind}"
    strategy = _launch.check_strategy(strategy)
    a = _Operand(x, "x")
    out_dtype = _out_dtype(a, dtype, fn)
    if dim is None:
        dim = legacy_softmax_dim(len(a.shape), fn)
    plan = _launch.softmax_plan(a.shape, dim, out_dtype, block)
    if out is None:
        native, out = a.empty(a.shape, out_dtype)
    else:
        native, out = _given_out(a, out, out_dtype, fn)
    if math.prod(a.shape) == 0:
        return native
    x3 = _three_d(a, (plan.dim,))
    shape3 = (plan.outer, plan.n, plan.inner)
    log = kind == "log_softmax"
    if a.call is None:
        if out_dtype != x3.dtype and out_dtype.itemsize < 4:
            with np.errstate(over="ignore"):  # too large for float16: inf
                x3 = x3.astype(out_dtype)  # dtype= casts first, as PyTorch does
        x3 = _cpu_input(x3)
        acc = _launch.softmax_acc_dtype(out_dtype)
        kernels = cpu_softmax.kernels(acc.name)
        with _computed_in(out, acc) as target:
            out3 = _contiguous_view(target, shape3)
            if plan.cpu_regime == "rows":
                kernels["rows"](_rows(x3), _rows(out3, True), log)
            else:
                kernels["columns"](x3, out3, plan.cpu_strip, log)
        return native
    out3 = _contiguous_view(out, shape3)
    if plan.regime != "columns":
        x3, out3 = _rows(x3), _rows(out3, True)
    with a.call.on_device():
        cuda_softmax.launch_forward(kind, x3, out3, plan, strategy, a.call.stream)
    return native


def softmax(
    x: Any,
    dim: int | None = None,
    *,
    dtype: DTypeLike = None,
    out: Any = None,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """exp(x) / sum(exp(x)) over `dim`, like ``torch.softmax``.

    Computed stably (the slice's max is subtracted first) in one fused pass
    per slice. `dim` may be negative; None picks PyTorch's legacy dim with a
    warning. `dtype` casts x before computing (needed for integer input);
    float16 computes in float32. A slice holding NaN or +inf, or only -inf,
    is NaN throughout, as in PyTorch. `out`, a C-contiguous array of x's
    kind, shape and result dtype, receives the result instead of a new array
    (it may be x itself; another overlap with x is a ValueError on the CPU
    and undefined on the GPU); reusing one
    saves the page faults of a fresh large allocation on every call.
    `reduce` (0/1/2) and `block` choose the
    GPU kernels' in-block max and sum strategy and block size (the plan is
    ``softkern.softmax_plan``); the CPU validates and ignores them.
    Returns a new array of x's kind and shape (or `out`).
    """
    return _forward("softmax", x, dim, dtype, out, reduce, block)


def log_softmax(
    x: Any,
    dim: int | None = None,
    *,
    dtype: DTypeLike = None,
    out: Any = None,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """(x - max) - log(sum(exp(x - max))) over `dim`, like
    ``torch.log_softmax``; arguments as ``softmax``."""
    return _forward("log_softmax", x, dim, dtype, out, reduce, block)


def logsumexp(
    x: Any,
    dim: int | Sequence[int],
    keepdim: bool = False,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """log(sum(exp(x))) over `dim` (an int or a tuple), like
    ``torch.logsumexp``: stable, +inf where any element is +inf, -inf for
    empty slices and slices of -inf, NaN where a NaN is. Integer and bool
    input computes in float32, as PyTorch's default dtype."""
    fn = "softkern.logsumexp"
    strategy = _launch.check_strategy(reduce)
    a = _Operand(x, "x")
    if a.dtype.name in FLOAT_NAMES:
        out_dtype = a.dtype
    elif a.dtype.kind in "biu":
        out_dtype = np.dtype(np.float32)
    else:
        raise TypeError(f"{fn}: x has dtype {a.dtype}; expected a real dtype")
    if dim is None:
        raise TypeError(f"{fn}: dim is required (an int or a tuple of ints)")
    dims = _layout.normalize_dims(dim, len(a.shape))
    out_shape = _layout.reduced_shape(a.shape, dims, bool(keepdim))
    native, out = a.empty(out_shape, out_dtype)
    if math.prod(out_shape) == 0:
        return native
    x3 = _three_d(a, dims)
    outer, n, inner = x3.shape
    plan = _launch.softmax_plan((outer, n, inner), 1, out_dtype, block)
    out2 = _contiguous_view(out, (outer, inner))
    if a.call is None:
        x3 = _cpu_input(x3)
        acc = _launch.softmax_acc_dtype(out_dtype)
        kernels = cpu_softmax.kernels(acc.name)
        with _computed_in(out2, acc) as target:
            if inner == 1:
                kernels["logsumexp_rows"](_rows(x3), target[:, 0])
            else:
                kernels["logsumexp_columns"](x3, target, plan.cpu_strip)
        return native
    if plan.regime != "columns":
        x3 = _rows(x3)
        out2 = _dispatch.strided_view(out2, (outer,), out2.strides[:1], writeable=True)
    with a.call.on_device():
        cuda_softmax.launch_logsumexp(x3, out2, plan, strategy, a.call.stream)
    return native


def _backward(
    kind: str,
    grad_output: Any,
    output: Any,
    dim: int,
    strategy: int,
    block: int | None,
) -> Any:
    fn = f"softkern.{kind}"
    strategy = _launch.check_strategy(strategy)
    _dispatch.device_of(grad_output, output)
    g, y = _Operand(grad_output, "grad_output"), _Operand(output, "output")
    allowed = tuple(np.dtype(n).type for n in FLOAT_NAMES)
    for v in (g, y):
        v.check_dtype(allowed, fn)
    if g.dtype != y.dtype:
        raise TypeError(
            f"{fn}: grad_output and output must have one dtype, got {g.dtype} "
            f"and {y.dtype}"
        )
    if g.shape != y.shape:
        raise ValueError(
            f"{fn}: grad_output has shape {g.shape} but output has shape {y.shape}"
        )
    if dim is None:
        raise TypeError(f"{fn}: dim is required")
    plan = _launch.softmax_plan(g.shape, dim, g.dtype, block)
    native, out = g.empty(g.shape, g.dtype)
    if math.prod(g.shape) == 0:
        return native
    g3, y3 = _three_d(g, (plan.dim,)), _three_d(y, (plan.dim,))
    shape3 = (plan.outer, plan.n, plan.inner)
    log = kind == "log_softmax_backward"
    if g.call is None:
        g3, y3 = _cpu_input(g3), _cpu_input(y3)
        acc = _launch.softmax_acc_dtype(g.dtype)
        kernels = cpu_softmax.kernels(acc.name)
        with _computed_in(out, acc) as target:
            out3 = _contiguous_view(target, shape3)
            if plan.cpu_regime == "rows":
                kernels["rows_backward"](_rows(g3), _rows(y3), _rows(out3, True), log)
            else:
                kernels["columns_backward"](g3, y3, out3, plan.cpu_strip, log)
        return native
    out3 = _contiguous_view(out, shape3)
    if plan.regime != "columns":
        g3, y3, out3 = _rows(g3), _rows(y3), _rows(out3, True)
    with g.call.on_device():
        cuda_softmax.launch_backward(kind, g3, y3, out3, plan, strategy, g.call.stream)
    return native


def softmax_backward(
    grad_output: Any,
    output: Any,
    dim: int,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Gradient of ``softmax`` with respect to its input, given the gradient
    of its `output`: ``output * (grad_output - sum(grad_output * output,
    dim))`` (PyTorch's ``_softmax_backward_data``)."""
    return _backward("softmax_backward", grad_output, output, dim, reduce, block)


def log_softmax_backward(
    grad_output: Any,
    output: Any,
    dim: int,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Gradient of ``log_softmax`` with respect to its input, given the
    gradient of its `output`: ``grad_output - exp(output) * sum(grad_output,
    dim)`` (PyTorch's ``_log_softmax_backward_data``)."""
    return _backward("log_softmax_backward", grad_output, output, dim, reduce, block)


def softmax_plan(
    shape: Sequence[int],
    dim: int,
    dtype: DTypeLike = np.float32,
    block: int | None = None,
) -> _launch.SoftmaxPlan:
    """Which kernel regime softmax over `dim` of an array of `shape` runs, on
    the GPU (`regime`) and the CPU (`cpu_regime`); see ``SoftmaxPlan``."""
    return _launch.softmax_plan(
        tuple(shape), dim, _as_dtype(dtype, "softkern.softmax_plan"), block
    )


__all__ = [
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "softmax",
    "softmax_backward",
    "softmax_plan",
]
