"""softmax, log_softmax, logsumexp and the backward passes: validate, plan,
dispatch to the CPU or GPU kernels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from softkern import _dispatch, _dtypes, _launch, _layout
from softkern.cpu import bfloat16 as cpu_bfloat16
from softkern.cpu import softmax as cpu_softmax
from softkern.cuda import softmax as cuda_softmax

# The dtypes softmax and the losses compute in and return; the 16-bit ones
# compute in float32, as PyTorch does.
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
FLOATS_SAID = "float16, bfloat16, float32 or float64"
DTypeLike = Any
_FLOAT16 = np.dtype(np.float16)
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def is_softmax_float(dtype: np.dtype) -> bool:
    return dtype.name in FLOAT_NAMES and _dtypes.is_float(dtype)


def _as_dtype(dtype: DTypeLike, fn: str) -> np.dtype:
    """A NumPy dtype from a NumPy dtype-like or a torch dtype."""
    if hasattr(dtype, "is_floating_point") and not isinstance(dtype, type):
        dtype = str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> "float32"
    if isinstance(dtype, str) and dtype == _dtypes.BFLOAT16:
        dtype = _dtypes.bfloat16()  # a TypeError naming ml_dtypes without it
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be a float dtype, got {dtype!r}") from None
    if not is_softmax_float(dtype):
        raise TypeError(f"{fn}: dtype must be {FLOATS_SAID}, got {dtype.name}")
    return dtype


def _out_dtype(x_dtype: np.dtype, dtype: DTypeLike, fn: str) -> np.dtype:
    """The result dtype: `dtype` when given (x is cast to it before computing),
    else x's own dtype, which must be a float."""
    if dtype is not None:
        out = _as_dtype(dtype, fn)
        if x_dtype.kind not in "biuf" and not _dtypes.is_bfloat16(x_dtype):
            raise TypeError(f"{fn}: cannot cast x of dtype {x_dtype} to {out}")
        return out
    if is_softmax_float(x_dtype):
        return x_dtype
    raise TypeError(
        f"{fn}: x has dtype {x_dtype}, but softmax needs {FLOATS_SAID} "
        f"input; pass dtype=np.float32 (or np.float64) to cast it first"
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
    if isinstance(out, np.ndarray):
        return out.reshape(shape)
    strides = _dispatch._c_strides(shape, np.dtype(out.dtype).itemsize)
    return _dispatch.strided_view(out, shape, strides, writeable=True)


def _rows(x3: Any, writeable: bool = False) -> Any:
    """The (outer, n) view of an (outer, n, 1) view."""
    return _dispatch.strided_view(x3, x3.shape[:2], x3.strides[:2], writeable=writeable)


def _cpu_casts(x_dtype: np.dtype, out_dtype: np.dtype) -> tuple[np.dtype, ...]:
    """The casts a CPU kernel's input goes through first: ``dtype=float16``
    (or bfloat16, or float32 of a float64 x) rounds x to that dtype first, as
    PyTorch does; and Numba has no float16 arithmetic on the CPU, so float16
    is widened to float32 (a copy, for float16 only: bfloat16 is widened as
    it is loaded, ``softkern.cpu.bfloat16``)."""
    casts = []
    if out_dtype.itemsize == 2 and x_dtype != out_dtype:
        casts.append(out_dtype)
    if out_dtype == _FLOAT16 or (x_dtype == _FLOAT16 and not casts):
        casts.append(_FLOAT32)
    return tuple(casts)


def cpu_input(x: np.ndarray, casts: tuple[np.dtype, ...]) -> np.ndarray:
    """`x` after `casts` (see ``_cpu_casts``), as the kernels read it
    (``_dtypes.kernel_view``)."""
    if casts:
        with np.errstate(over="ignore"):  # too large for float16: inf
            for dtype in casts:
                x = x.astype(dtype)
    return _dtypes.kernel_view(x)


def cpu_target(out: np.ndarray, acc: np.dtype) -> np.ndarray:
    """The array a CPU kernel writes for `out`: `out` itself, or, when `out`
    is float16 or bfloat16 (which the kernels compute in float32), an `acc`
    (float32) array that ``cpu_store`` rounds into `out` afterwards."""
    if out.dtype == acc:
        return out
    return _dispatch.host_empty(out.shape, acc)


def cpu_store(out: np.ndarray, target: np.ndarray) -> None:
    """Round the kernel's float32 `target` into `out` (see ``cpu_target``):
    bfloat16 by ``cpu.bfloat16.narrow_into`` (3.5x ml_dtypes' cast here),
    float16 by NumPy."""
    if target is out or target.dtype == _dtypes.BFLOAT16_BITS:
        return  # written in place (a bfloat16 out as its bits)
    if _dtypes.is_bfloat16(out.dtype) and out.flags.c_contiguous:
        cpu_bfloat16.narrow_into(
            target.reshape(-1), out.reshape(-1).view(_dtypes.BFLOAT16_BITS)
        )
    else:
        out[...] = target


class SoftmaxCall(NamedTuple):
    """A softmax-family call for one argument shape: the shared plan, the
    result and compute dtypes, and what the CPU kernels need (the view of x
    they read, the casts first, -inf of the compute type, threading)."""

    plan: _launch.SoftmaxPlan
    strategy: int
    out_dtype: np.dtype
    acc: np.dtype
    lowest: np.generic
    casts: tuple[np.dtype, ...]
    view: tuple[int, ...]
    size: int
    parallel: bool


def _softmax_call(
    plan: _launch.SoftmaxPlan,
    strategy: int,
    x_dtype: np.dtype,
    out_dtype: np.dtype,
    size: int,
) -> SoftmaxCall:
    acc = _launch.softmax_acc_dtype(out_dtype)
    if plan.cpu_regime == "rows":
        view: tuple[int, ...] = (plan.outer, plan.n)
    else:
        view = (plan.outer, plan.n, plan.inner)
    return SoftmaxCall(
        plan=plan,
        strategy=_launch.check_strategy(strategy),
        out_dtype=out_dtype,
        acc=acc,
        lowest=acc.type(-np.inf),
        casts=_cpu_casts(x_dtype, out_dtype),
        view=view,
        size=size,
        parallel=_launch.cpu_parallel(size * x_dtype.itemsize),
    )


@_dispatch.plan_cache
def forward_plan(
    kind: str,
    shape: tuple[int, ...],
    x_dtype: np.dtype,
    dim: int,
    dtype: DTypeLike,
    strategy: int,
    block: int | None,
) -> SoftmaxCall:
    fn = f"softkern.{kind}"
    _launch.check_strategy(strategy)
    out_dtype = _out_dtype(x_dtype, dtype, fn)
    plan = _launch.softmax_plan(
        shape, dim, out_dtype, block, _launch.SPLIT_MIN_SOFTMAX_ROW
    )
    return _softmax_call(plan, strategy, x_dtype, out_dtype, math.prod(shape))


def _host_out(x: np.ndarray, out: Any, dtype: np.dtype, fn: str) -> np.ndarray:
    """A caller's CPU `out=` array, checked."""
    if type(out) is not np.ndarray:
        if isinstance(out, (int, float, complex, bool, list, tuple)):
            raise TypeError(f"{fn}: out must be an array, got {type(out).__name__}")
        if _dispatch.device_of(out) != "cpu":
            raise TypeError(
                f"{fn}: x is on the CPU but out is on the CUDA; pass them on one device"
            )
        out = np.asarray(out)
    _check_out(out.shape, out.dtype, out.strides, x.shape, dtype, fn)
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is read-only")
    # Each element is read before it is written in every kernel, so x
    # itself may be out; any other overlap would read results as input.
    if out is not x and np.may_share_memory(out, x):
        same = (
            out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
            and out.strides == x.strides
        )
        if not same and np.shares_memory(out, x):
            raise ValueError(f"{fn}: out overlaps x (only out=x itself is allowed)")
    return out


def _check_out(
    shape: tuple[int, ...],
    dtype: np.dtype,
    strides: tuple[int, ...],
    x_shape: tuple[int, ...],
    want: np.dtype,
    fn: str,
) -> None:
    if shape != x_shape:
        raise ValueError(f"{fn}: out must have shape {x_shape}, got {shape}")
    if dtype != want:
        raise TypeError(f"{fn}: out must have dtype {want}, got {dtype}")
    c_strides = _dispatch._c_strides(shape, want.itemsize)
    if any(
        size > 1 and stride != c
        for size, stride, c in zip(shape, strides, c_strides, strict=True)
    ):
        raise ValueError(f"{fn}: out must be C-contiguous")


def _forward(
    kind: str,
    x: Any,
    dim: int | None,
    dtype: DTypeLike,
    out: Any,
    strategy: int,
    block: int | None,
) -> Any:
    host = _dispatch.cpu_array(x)
    if host is None:
        return _forward_gpu(kind, x, dim, dtype, out, strategy, block)
    fn = f"softkern.{kind}"
    if dim is None:
        dim = legacy_softmax_dim(host.ndim, fn)
    call = forward_plan(kind, host.shape, host.dtype, dim, dtype, strategy, block)
    if out is None:
        out = _dispatch.host_empty(host.shape, call.out_dtype)
    else:
        out = _host_out(host, out, call.out_dtype, fn)
    if call.size == 0:
        return out
    x3 = cpu_input(host.reshape(call.view), call.casts)
    target = cpu_target(out, call.acc)
    log = kind == "log_softmax"
    if call.plan.cpu_regime == "rows":
        cpu_softmax.rows(x3, target.reshape(call.view), log, call.lowest, call.parallel)
    else:
        cpu_softmax.columns(
            x3,
            target.reshape(call.view),
            call.plan.cpu_strip,
            log,
            call.lowest,
            call.parallel,
        )
    cpu_store(out, target)
    return out


def _forward_gpu(
    kind: str,
    x: Any,
    dim: int | None,
    dtype: DTypeLike,
    out: Any,
    strategy: int,
    block: int | None,
) -> Any:
    fn = f"softkern.{kind}"
    a = _dispatch.Operand(x, "x")
    if dim is None:
        dim = legacy_softmax_dim(len(a.shape), fn)
    call = forward_plan(kind, a.shape, a.dtype, dim, dtype, strategy, block)
    plan = call.plan
    if out is None:
        native, out = a.empty(a.shape, call.out_dtype)
    else:
        native, out = _gpu_out(a, out, call.out_dtype, fn)
    if call.size == 0:
        return native
    x3 = a.around((plan.dim,))
    out3 = _contiguous_view(out, (plan.outer, plan.n, plan.inner))
    if plan.regime != "columns":
        x3, out3 = _rows(x3), _rows(out3, True)
    with a.call.on_device():
        if plan.regime == "split":
            cuda_softmax.launch_split_forward(
                kind, x3, out3, plan, call.strategy, a.call.stream, a.dtype,
                call.out_dtype, lambda s, d: a.empty(s, d)[1],
            )  # fmt: skip
        else:
            cuda_softmax.launch_forward(
                kind, x3, out3, plan, call.strategy, a.call.stream, a.dtype,
                call.out_dtype,
            )  # fmt: skip
    return native


def _gpu_out(
    a: _dispatch.Operand, out: Any, dtype: np.dtype, fn: str
) -> tuple[Any, Any]:
    """(native, kernel view) of a caller's GPU `out=` array, checked."""
    if isinstance(out, (int, float, complex, bool, list, tuple)):
        raise TypeError(f"{fn}: out must be an array, got {type(out).__name__}")
    o = _dispatch.Operand(out, "out")
    if o.device != a.device:
        raise TypeError(
            f"{fn}: x is on the {a.device.upper()} but out is on the "
            f"{o.device.upper()}; pass them on one device"
        )
    _check_out(o.shape, o.dtype, tuple(o.array.strides), a.shape, dtype, fn)
    return out, o.array


@_dispatch.public_function
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


@_dispatch.public_function
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


class LogsumexpCall(NamedTuple):
    """logsumexp of one argument shape: reduced dims, result shape, the
    shared plan over (outer, n, inner) and the CPU kernels' view."""

    dims: tuple[int, ...]
    out_shape: tuple[int, ...]
    call: SoftmaxCall


@_dispatch.plan_cache
def logsumexp_plan(
    shape: tuple[int, ...],
    dtype: np.dtype,
    dim: int | Sequence[int],
    keepdim: bool,
    strategy: int,
    block: int | None,
) -> LogsumexpCall:
    fn = "softkern.logsumexp"
    _launch.check_strategy(strategy)
    if is_softmax_float(dtype):
        out_dtype = dtype
    elif dtype.kind in "biu":
        out_dtype = _FLOAT32
    else:
        raise TypeError(f"{fn}: x has dtype {dtype}; expected a real dtype")
    if dim is None:
        raise TypeError(f"{fn}: dim is required (an int or a tuple of ints)")
    dims = _layout.normalize_dims(dim, len(shape))
    out_shape = _layout.reduced_shape(shape, dims, bool(keepdim))
    sizes = _layout.around_sizes(shape, dims)
    plan = _launch.softmax_plan(
        sizes, 1, out_dtype, block, _launch.SPLIT_MIN_SOFTMAX_ROW
    )
    call = _softmax_call(plan, strategy, dtype, out_dtype, math.prod(shape))
    return LogsumexpCall(dims, out_shape, call)


@_dispatch.public_function
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
    host = _dispatch.cpu_array(x)
    if host is None:
        return _logsumexp_gpu(x, dim, keepdim, reduce, block)
    lse = logsumexp_plan(
        host.shape, host.dtype, _dispatch.key(dim), keepdim, reduce, block
    )
    call = lse.call
    out = _dispatch.host_empty(lse.out_shape, call.out_dtype)
    if math.prod(lse.out_shape) == 0:
        return out
    target = cpu_target(out, call.acc)
    _cpu_logsumexp(host, lse, target)
    cpu_store(out, target)
    return out


def _cpu_logsumexp(
    x: np.ndarray, lse: LogsumexpCall, target: np.ndarray, part_zero: Any = None
) -> None:
    """The CPU kernels of `lse` over `x` into `target`; `part_zero` as
    ``cpu.softmax.row_logsumexp`` (default: 0 of the compute type)."""
    call, plan = lse.call, lse.call.plan
    x3 = cpu_input(_dispatch.three_d(x, lse.dims, call.view), call.casts)
    if plan.cpu_regime == "rows":
        part_zero = call.lowest.dtype.type(0) if part_zero is None else part_zero
        cpu_softmax.logsumexp_rows(
            x3, target.reshape(-1), call.lowest, part_zero, call.parallel
        )
    else:  # the strips sum in float64 already
        cpu_softmax.logsumexp_columns(
            x3,
            target.reshape(plan.outer, plan.inner),
            plan.cpu_strip,
            call.lowest,
            call.parallel,
        )


def logsumexp_float64(x: np.ndarray, dim: int) -> np.ndarray:
    """logsumexp of a float32 or float64 NumPy array over `dim`, keepdim, as
    float64 with sums in float64 (~1e-8 relative for float32 input): the
    statistic softkern._dask merges over a class dim split into chunks.
    Each chunk's float32 value carried ~2e-7 relative error (float32
    partial sums, then the rounding) into the merged loss and gradient,
    3-5x the eager call's."""
    lse = logsumexp_plan(x.shape, x.dtype, dim, True, 2, None)
    out = _dispatch.host_empty(lse.out_shape, _FLOAT64)
    if out.size:
        _cpu_logsumexp(x, lse, out, _FLOAT64.type(0))
    return out


def _logsumexp_gpu(
    x: Any, dim: Any, keepdim: bool, strategy: int, block: int | None
) -> Any:
    a = _dispatch.Operand(x, "x")
    lse = logsumexp_plan(a.shape, a.dtype, _dispatch.key(dim), keepdim, strategy, block)
    call, plan = lse.call, lse.call.plan
    native, out = a.empty(lse.out_shape, call.out_dtype)
    if math.prod(lse.out_shape) == 0:
        return native
    x3 = a.around(lse.dims)
    out2 = _contiguous_view(out, (plan.outer, plan.inner))
    if plan.regime != "columns":
        x3 = _rows(x3)
        out2 = _dispatch.strided_view(
            out2, (plan.outer,), out2.strides[:1], writeable=True
        )
    with a.call.on_device():
        if plan.regime == "split":
            cuda_softmax.launch_split_logsumexp(
                x3, out2, plan, call.strategy, a.call.stream, call.out_dtype,
                lambda s, d: a.empty(s, d)[1],
            )  # fmt: skip
        else:
            cuda_softmax.launch_logsumexp(
                x3, out2, plan, call.strategy, a.call.stream, call.out_dtype
            )
    return native


@_dispatch.plan_cache
def backward_plan(
    kind: str,
    g_shape: tuple[int, ...],
    g_dtype: np.dtype,
    y_shape: tuple[int, ...],
    y_dtype: np.dtype,
    dim: int,
    strategy: int,
    block: int | None,
) -> SoftmaxCall:
    fn = f"softkern.{kind}"
    _launch.check_strategy(strategy)
    for name, dtype in (("grad_output", g_dtype), ("output", y_dtype)):
        if not is_softmax_float(dtype):
            raise TypeError(f"{fn}: {name} has dtype {dtype}; supported: {FLOATS_SAID}")
    if g_dtype != y_dtype:
        raise TypeError(
            f"{fn}: grad_output and output must have one dtype, got {g_dtype} "
            f"and {y_dtype}"
        )
    if g_shape != y_shape:
        raise ValueError(
            f"{fn}: grad_output has shape {g_shape} but output has shape {y_shape}"
        )
    if dim is None:
        raise TypeError(f"{fn}: dim is required")
    plan = _launch.softmax_plan(g_shape, dim, g_dtype, block)
    return _softmax_call(plan, strategy, g_dtype, g_dtype, math.prod(g_shape))


def _backward(
    kind: str,
    grad_output: Any,
    output: Any,
    dim: int,
    strategy: int,
    block: int | None,
) -> Any:
    if type(grad_output) is not np.ndarray or type(output) is not np.ndarray:
        if _dispatch.device_of(grad_output, output) == "cuda":
            return _backward_gpu(kind, grad_output, output, dim, strategy, block)
        grad_output, output = np.asarray(grad_output), np.asarray(output)
    g, y = grad_output, output
    call = backward_plan(kind, g.shape, g.dtype, y.shape, y.dtype, dim, strategy, block)
    out = _dispatch.host_empty(g.shape, g.dtype)
    if call.size == 0:
        return out
    g3 = cpu_input(g.reshape(call.view), call.casts)
    y3 = cpu_input(y.reshape(call.view), call.casts)
    target = cpu_target(out, call.acc)
    log = kind == "log_softmax_backward"
    out3 = target.reshape(call.view)
    if call.plan.cpu_regime == "rows":
        cpu_softmax.rows_backward(g3, y3, out3, log, call.lowest, call.parallel)
    else:
        cpu_softmax.columns_backward(
            g3, y3, out3, call.plan.cpu_strip, log, call.lowest, call.parallel
        )
    cpu_store(out, target)
    return out


def _backward_gpu(
    kind: str,
    grad_output: Any,
    output: Any,
    dim: int,
    strategy: int,
    block: int | None,
) -> Any:
    g = _dispatch.Operand(grad_output, "grad_output")
    y = _dispatch.Operand(output, "output")
    call = backward_plan(kind, g.shape, g.dtype, y.shape, y.dtype, dim, strategy, block)
    plan = call.plan
    native, out = g.empty(g.shape, g.dtype)
    if call.size == 0:
        return native
    g3, y3 = g.around((plan.dim,)), y.around((plan.dim,))
    out3 = _contiguous_view(out, (plan.outer, plan.n, plan.inner))
    if plan.regime != "columns":
        g3, y3, out3 = _rows(g3), _rows(y3), _rows(out3, True)
    with g.call.on_device():
        cuda_softmax.launch_backward(
            kind, g3, y3, out3, plan, call.strategy, g.call.stream, g.dtype
        )
    return native


@_dispatch.public_function
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


@_dispatch.public_function
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
        tuple(shape),
        dim,
        _as_dtype(dtype, "softkern.softmax_plan"),
        block,
        _launch.SPLIT_MIN_SOFTMAX_ROW,
    )


__all__ = [
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "softmax",
    "softmax_backward",
    "softmax_plan",
]
