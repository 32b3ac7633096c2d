"""expand, where and broadcast_shapes: validate, plan, dispatch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from softkern import _dispatch, _launch, _layout
from softkern.cpu import broadcast as cpu_broadcast
from softkern.cuda import broadcast as cuda_broadcast
from softkern.ops.reduce import _flat, _Operand

# Real and bool dtypes: what both devices' kernels copy and convert.
DTYPES = frozenset(
    np.dtype(n)
    for n in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)
_SCALARS = (bool, int, float)  # weak in the result dtype, as NumPy 2


def broadcast_shapes(*shapes: Any) -> tuple[int, ...]:
    """The shape that arrays of `shapes` broadcast to, like
    ``torch.broadcast_shapes``; a ValueError names the shapes that do not."""
    return _layout.broadcast_shapes(*shapes)


class _Source:
    """One operand as the kernels read it: a 1-D view of its memory from its
    first element, and its element strides broadcast to the output."""

    def __init__(self, a: _Operand, out_shape: tuple[int, ...], dtype: np.dtype):
        arr = a.array
        # The kernels index a 1-D view from the first element with whole-
        # element strides: negative strides (a view starting elsewhere) and
        # strides that are not a multiple of the item size (a field of a
        # structured array) are copied first.
        if any(s < 0 or s % arr.dtype.itemsize for s in arr.strides):
            if a.call is None:
                arr = np.ascontiguousarray(arr)
            else:
                with a.call.on_device():
                    arr = _dispatch.gpu_contiguous(arr, a.call)
        if a.call is None and arr.dtype != dtype and np.float16 in (arr.dtype, dtype):
            arr = arr.astype(dtype)  # Numba has no float16 arithmetic on the CPU
        itemsize = arr.dtype.itemsize
        shape = tuple(arr.shape)
        strides = tuple(s // itemsize for s in arr.strides)
        self.strides = _layout.broadcast_strides(shape, strides, out_shape)
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        self.flat = _dispatch.strided_view(arr, (span,), (itemsize,))
        if a.call is None and arr.dtype == np.float16 == dtype:
            self.flat = self.flat.view(np.uint16)  # a bitwise copy
        if a.call is None and arr.dtype == np.bool_:
            self.flat = self.flat.view(np.uint8)  # see cpu/broadcast.py


def _is_scalar(value: Any) -> bool:
    """Python scalars and NumPy scalars: they go with either device."""
    return isinstance(value, (*_SCALARS, np.generic))


def _operand(value: Any, name: str, dtype: np.dtype | None, like: _Operand | None):
    """An _Operand for an array, or for a scalar: a 0-d array on the device
    of `like`, of `dtype` for a Python scalar (weak), of its own for a NumPy
    scalar (strong)."""
    if _is_scalar(value):
        host = np.asarray(value, dtype=None if isinstance(value, np.generic) else dtype)
        if like is not None and like.call is not None:
            from numba import cuda

            with like.call.on_device():
                return _Operand(cuda.to_device(host), name)
        return _Operand(host, name)
    return _Operand(value, name)


def _check_dtype(a: _Operand, fn: str) -> None:
    if a.dtype not in DTYPES:
        raise TypeError(
            f"{fn}: {a.name} has dtype {a.dtype}; supported: bool, integers, "
            "float16, float32, float64"
        )


def _int64(values: tuple[int, ...], a: _Operand) -> Any:
    """A small int64 array of `values` on `a`'s device (shapes, strides)."""
    host = np.asarray(values, dtype=np.int64)
    if a.call is None:
        return host
    from numba import cuda

    return cuda.to_device(host, stream=a.call.stream)


def _flat_out(out: Any) -> Any:
    """The output as one dim (``ops.reduce._flat``), with float16 and bool
    seen as same-size integers on the CPU (see cpu/broadcast.py)."""
    view = _flat(out)
    if isinstance(view, np.ndarray) and view.dtype == np.float16:
        view = view.view(np.uint16)  # a bitwise copy: no float16 on the CPU
    if isinstance(view, np.ndarray) and view.dtype == np.bool_:
        view = view.view(np.uint8)  # bytes: see cpu/broadcast.py
    return view


def expand(x: Any, *sizes: Any, block: int | None = None) -> Any:
    """`x` broadcast to `sizes`, like ``torch.Tensor.expand``: -1 keeps a
    size, new dims only in front, only size-1 dims grow. `sizes` are ints or
    one tuple. Unlike ``torch.Tensor.expand``, which returns a view with
    stride 0, this writes a new array of the expanded shape (a kernel reads
    each output element's source through the broadcast strides)."""
    fn = "softkern.expand"
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    a = _Operand(x, "x")
    _check_dtype(a, fn)
    out_shape = _layout.expand_shape(a.shape, sizes)
    native, out = a.empty(out_shape, a.dtype)
    if math.prod(out_shape) == 0:
        return native
    source = _Source(a, out_shape, a.dtype)
    plan = _launch.broadcast_plan(out_shape, [source.strides], block)
    flat = _flat_out(out)
    if a.call is None:
        if plan.contiguous:
            cpu_broadcast.copy_flat(source.flat, flat, plan.chunk, plan.items)
        else:
            cpu_broadcast.expand(
                source.flat,
                flat,
                _int64(plan.shape, a),
                _int64(plan.strides[0], a),
                plan.last,
                plan.chunk,
                plan.items,
            )
        return native
    with a.call.on_device():
        launch = (plan.grid, plan.block, a.call.stream)
        if plan.contiguous:
            cuda_broadcast.copy_kernel[launch](source.flat, flat)
        else:
            cuda_broadcast.expand_kernel[launch](
                source.flat, flat, _int64(plan.shape, a), _int64(plan.strides[0], a)
            )
    return native


def where(condition: Any, x: Any, y: Any, *, block: int | None = None) -> Any:
    """`x` where `condition` is true, else `y`, like ``torch.where`` and
    ``np.where``: the three broadcast together (a ValueError names shapes
    that do not). `condition` must be bool; `x` and `y` are arrays or
    scalars, and the result has NumPy's ``result_type`` of the two with
    Python scalars weak (``where(c, float32_array, 0.0)`` is float32) and
    NumPy scalars strong. A Python int that does not fit the result dtype
    (``where(c, int8_array, 1000)``) is an OverflowError, as in PyTorch,
    where NumPy 2 wraps it."""
    fn = "softkern.where"
    arrays = [v for v in (condition, x, y) if not _is_scalar(v)]
    _dispatch.device_of(*arrays)
    if _is_scalar(condition):
        raise TypeError(f"{fn}: condition must be a bool array, got a Python scalar")
    c = _Operand(condition, "condition")
    if c.dtype != np.bool_:
        raise TypeError(
            f"{fn}: condition must have dtype bool, got {c.dtype}; compare it "
            "first (e.g. condition != 0)"
        )
    types = [
        v
        if isinstance(v, _SCALARS) and not isinstance(v, np.generic)
        else _Operand(v, name).dtype
        for v, name in ((x, "x"), (y, "y"))
    ]
    dtype = np.result_type(*types)
    a = _operand(x, "x", dtype, c)
    b = _operand(y, "y", dtype, c)
    for v in (a, b):
        _check_dtype(v, fn)
    if dtype not in DTYPES:
        raise TypeError(f"{fn}: result dtype {dtype} is not supported")
    out_shape = _layout.broadcast_shapes(c.shape, a.shape, b.shape)
    native, out = c.empty(out_shape, dtype)
    if math.prod(out_shape) == 0:
        return native
    sources = [_Source(v, out_shape, dtype) for v in (c, a, b)]
    plan = _launch.broadcast_plan(out_shape, [s.strides for s in sources], block)
    flat = _flat_out(out)
    flats = [s.flat for s in sources]
    if c.call is None:
        if plan.contiguous:
            cpu_broadcast.where_flat(*flats, flat, plan.chunk, plan.items)
        else:
            cpu_broadcast.where(
                *flats,
                flat,
                _int64(plan.shape, c),
                *(_int64(s, c) for s in plan.strides),
                plan.last,
                plan.chunk,
                plan.items,
            )
        return native
    with c.call.on_device():
        launch = (plan.grid, plan.block, c.call.stream)
        if plan.contiguous:
            cuda_broadcast.where_flat_kernel[launch](*flats, flat)
        else:
            cuda_broadcast.where_kernel[launch](
                *flats,
                flat,
                _int64(plan.shape, c),
                *(_int64(s, c) for s in plan.strides),
            )
    return native


__all__ = ["broadcast_shapes", "expand", "where"]
