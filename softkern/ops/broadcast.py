"""expand, where and broadcast_shapes: validate, plan, dispatch."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from softkern import _dispatch, _launch, _layout
from softkern.cpu import broadcast as cpu_broadcast
from softkern.cuda import broadcast as cuda_broadcast
from softkern.ops.reduce import _flat

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
# What the CPU kernels see of a dtype they cannot compute with: float16 as
# its bits (a copy needs no arithmetic), bool as bytes (see cpu/broadcast.py).
_CPU_BITS = {np.dtype(np.float16): np.dtype(np.uint16), np.dtype(np.bool_): np.uint8}


def broadcast_shapes(*shapes: Any) -> tuple[int, ...]:
    """The shape that arrays of `shapes` broadcast to, like
    ``torch.broadcast_shapes``; a ValueError names the shapes that do not."""
    if all(type(s) is tuple and all(type(d) is int for d in s) for s in shapes):
        return _broadcast_shapes(*shapes)
    return _layout.broadcast_shapes(*shapes)  # checks what a cache key cannot


# Tuples of plain ints are remembered (True == 1 as a key: bools go above).
_broadcast_shapes = _dispatch.plan_cache(_layout.broadcast_shapes)


class Source(NamedTuple):
    """How the kernels read one operand: `copy` first (negative strides, or
    strides that are not whole elements), `cast` to the result dtype first
    where float16 meets another dtype (Numba has no float16 arithmetic on
    the CPU), then a 1-D view of `span` elements from its first element.
    A `scalar` (one element, broadcast everywhere) is read on the CPU as a
    0-d array by the flat kernels."""

    copy: bool
    cast: np.dtype | None
    span: int
    strides: tuple[int, ...]  # in elements, broadcast to the output
    scalar: bool
    contiguous: bool  # C-contiguous once copied or cast
    bits: np.dtype | None  # how the CPU kernels see float16 and bool

    def host(self, arr: np.ndarray, flat: bool) -> np.ndarray:
        """The NumPy array the CPU kernels read (`flat`: the flat kernels')."""
        if self.copy:
            arr = np.ascontiguousarray(arr)
        if self.cast is not None:
            arr = arr.astype(self.cast)
        if flat and self.scalar:
            view = arr.reshape(()) if arr.ndim else arr
        elif self.contiguous:
            view = arr.reshape(-1)
        else:
            # writeable as the caller's array: one compiled kernel serves
            # this view and a contiguous array's reshape alike
            view = np.lib.stride_tricks.as_strided(
                arr, (self.span,), (arr.itemsize,), writeable=arr.flags.writeable
            )
        return view if self.bits is None else view.view(self.bits)

    def device(self, arr: Any, call: Any) -> Any:
        """The 1-D device view the GPU kernels read."""
        if self.copy:
            with call.on_device():
                arr = _dispatch.gpu_contiguous(arr, call)
        return _dispatch.strided_view(arr, (self.span,), (arr.dtype.itemsize,))


def _source(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: np.dtype,
    out_shape: tuple[int, ...],
    out_dtype: np.dtype,
    on_cpu: bool,
) -> Source:
    itemsize = dtype.itemsize
    copy = any(s < 0 or s % itemsize for s in strides)
    if copy:
        strides = _dispatch._c_strides(shape, itemsize)
    cast = None
    if on_cpu and dtype != out_dtype and np.float16 in (dtype, out_dtype):
        cast, dtype = out_dtype, out_dtype
        strides = _dispatch._c_strides(shape, out_dtype.itemsize)
        itemsize = out_dtype.itemsize
    elements = tuple(s // itemsize for s in strides)
    span = 1 + sum((n - 1) * s for n, s in zip(shape, elements, strict=True))
    wide = _layout.broadcast_strides(shape, elements, out_shape)
    contiguous = _layout.merge_strides(shape, strides, [(0, len(shape))], itemsize)
    return Source(
        copy=copy,
        cast=cast,
        span=span,
        strides=wide,
        scalar=math.prod(shape) == 1,
        contiguous=contiguous is not None and contiguous[1][0] == itemsize,
        bits=_CPU_BITS.get(dtype),
    )


class BroadcastCall(NamedTuple):
    """An expand or where of one argument shape: the result, each operand's
    reading, the plan and, for the CPU, its geometry array (row 0 the
    collapsed shape, then each operand's strides), whether the flat kernels
    apply (every operand read at the output's own index, or a scalar) and
    threading."""

    out_shape: tuple[int, ...]
    dtype: np.dtype
    out_bits: np.dtype | None  # what the CPU kernels write float16/bool as
    sources: tuple[Source, ...]
    plan: _launch.BroadcastPlan
    geometry: np.ndarray
    flat: bool
    parallel: bool

    def host_out(self) -> tuple[np.ndarray, np.ndarray]:
        """(result, the 1-D view the CPU kernels write)."""
        out = _dispatch.host_empty(self.out_shape, self.dtype)
        flat = out.reshape(-1)
        return out, flat if self.out_bits is None else flat.view(self.out_bits)


def _broadcast_call(
    out_shape: tuple[int, ...],
    dtype: np.dtype,
    operands: tuple[tuple[tuple[int, ...], tuple[int, ...], np.dtype], ...],
    block: int | None,
    on_cpu: bool,
) -> BroadcastCall:
    sources = tuple(
        _source(shape, strides, d, out_shape, dtype, on_cpu)
        for shape, strides, d in operands
    )
    plan = _launch.broadcast_plan(out_shape, [s.strides for s in sources], block)
    geometry = np.array((plan.shape, *plan.strides), np.int64).reshape(
        1 + len(sources), len(plan.shape)
    )
    geometry.flags.writeable = False  # shared by every call of this plan
    flat = len(plan.shape) == 1 and all(
        s.scalar or stride == (1,)
        for s, stride in zip(sources, plan.strides, strict=True)
    )
    return BroadcastCall(
        out_shape,
        dtype,
        _CPU_BITS.get(dtype),
        sources,
        plan,
        geometry,
        flat,
        _launch.cpu_parallel(plan.n * dtype.itemsize, copy=True),
    )


def _check_dtype(dtype: np.dtype, name: str, fn: str) -> None:
    if dtype not in DTYPES:
        raise TypeError(
            f"{fn}: {name} has dtype {dtype}; supported: bool, integers, "
            "float16, float32, float64"
        )


@_dispatch.plan_cache
def expand_plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: np.dtype,
    sizes: tuple[Any, ...],
    block: int | None,
    on_cpu: bool,
) -> BroadcastCall:
    _check_dtype(dtype, "x", "softkern.expand")
    out_shape = _layout.expand_shape(shape, sizes)
    return _broadcast_call(out_shape, dtype, ((shape, strides, dtype),), block, on_cpu)


@_dispatch.public_function
def expand(x: Any, *sizes: Any, block: int | None = None) -> Any:
    """`x` broadcast to `sizes`, like ``torch.Tensor.expand``: -1 keeps a
    size, new dims only in front, only size-1 dims grow. `sizes` are ints or
    one tuple. Unlike ``torch.Tensor.expand``, which returns a view with
    stride 0, this writes a new array of the expanded shape (a kernel reads
    each output element's source through the broadcast strides)."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    host = _dispatch.cpu_array(x)
    if host is None:
        return _expand_gpu(x, sizes, block)
    call = expand_plan(
        host.shape, host.strides, host.dtype, _dispatch.key(sizes), block, True
    )
    out, flat = call.host_out()
    if call.plan.n == 0:
        return out
    source = call.sources[0].host(host, call.plan.contiguous)
    if call.plan.contiguous:
        cpu_broadcast.copy_flat(source, flat, call.plan.chunk, call.parallel)
    else:
        cpu_broadcast.expand(
            source, flat, call.geometry, call.plan.chunk, call.parallel
        )
    return out


def _expand_gpu(x: Any, sizes: tuple[Any, ...], block: int | None) -> Any:
    a = _dispatch.Operand(x, "x")
    call = expand_plan(
        a.shape, a.array.strides, a.dtype, _dispatch.key(sizes), block, False
    )
    native, out = a.empty(call.out_shape, call.dtype)
    if call.plan.n == 0:
        return native
    plan = call.plan
    source = call.sources[0].device(a.array, a.call)
    with a.call.on_device():
        launch = (plan.grid, plan.block, a.call.stream)
        if plan.contiguous:
            cuda_broadcast.copy_kernel[launch](source, _flat(out))
        else:
            cuda_broadcast.expand_kernel[launch](
                source, _flat(out), *_device_geometry(call, a.call.stream)
            )
    return native


def _device_geometry(call: BroadcastCall, stream: Any) -> list[Any]:
    """The geometry rows as small int64 device arrays (shape, then strides)."""
    from numba import cuda

    return [
        cuda.to_device(np.ascontiguousarray(r), stream=stream) for r in call.geometry
    ]


def _is_scalar(value: Any) -> bool:
    """Python scalars and NumPy scalars: they go with either device."""
    return isinstance(value, (*_SCALARS, np.generic))


def _meta(value: Any) -> Any:
    """The plan key of one operand of `where`: the type of a Python scalar
    (weak), or an array's (shape, strides, dtype)."""
    if type(value) in _SCALARS:
        return type(value)
    return (value.shape, value.strides, value.dtype)


@_dispatch.plan_cache
def where_plan(
    c: Any, x: Any, y: Any, block: int | None, on_cpu: bool
) -> BroadcastCall:
    fn = "softkern.where"
    c_shape, c_strides, c_dtype = c
    if c_dtype != np.bool_:
        raise TypeError(
            f"{fn}: condition must have dtype bool, got {c_dtype}; compare it "
            "first (e.g. condition != 0)"
        )
    for v, name in ((x, "x"), (y, "y")):
        if not isinstance(v, type):
            _check_dtype(v[2], name, fn)
    # A Python scalar of the key's type stands for the value: weak in NumPy
    # 2's promotion, whatever its value.
    dtype = np.result_type(*(v(0) if isinstance(v, type) else v[2] for v in (x, y)))
    if dtype not in DTYPES:
        raise TypeError(f"{fn}: result dtype {dtype} is not supported")
    arrays = [(c_shape, c_strides, c_dtype)]
    for v in (x, y):
        # a Python scalar becomes a 0-d array of the result dtype
        arrays.append(((), (), dtype) if isinstance(v, type) else v)
    out_shape = _layout.broadcast_shapes(*(a[0] for a in arrays))
    return _broadcast_call(out_shape, dtype, tuple(arrays), block, on_cpu)


@_dispatch.public_function
def where(condition: Any, x: Any, y: Any, *, block: int | None = None) -> Any:
    """`x` where `condition` is true, else `y`, like ``torch.where`` and
    ``np.where``: the three broadcast together (a ValueError names shapes
    that do not). `condition` must be bool; `x` and `y` are arrays or
    scalars, and the result has NumPy's ``result_type`` of the two with
    Python scalars weak (``where(c, float32_array, 0.0)`` is float32) and
    NumPy scalars strong. A Python int that does not fit the result dtype
    (``where(c, int8_array, 1000)``) is an OverflowError, as in PyTorch,
    where NumPy 2 wraps it."""
    fast = (
        type(condition) is np.ndarray
        and (type(x) is np.ndarray or type(x) in _SCALARS)
        and (type(y) is np.ndarray or type(y) in _SCALARS)
    )
    if not fast:
        arrays = [v for v in (condition, x, y) if not _is_scalar(v)]
        on_gpu = _dispatch.device_of(*arrays) == "cuda"
        if _is_scalar(condition):
            raise TypeError(
                "softkern.where: condition must be a bool array, got a Python scalar"
            )
        if on_gpu:
            return _where_gpu(condition, x, y, block)
        condition, x, y = (
            v if type(v) in _SCALARS else np.asarray(v) for v in (condition, x, y)
        )
    call = where_plan(_meta(condition), _meta(x), _meta(y), block, True)
    out, flat = call.host_out()
    if call.plan.n == 0:
        return out
    c_source, x_source, y_source = call.sources
    c = c_source.host(condition, call.flat)
    if type(x) is not np.ndarray:
        x = np.asarray(x, call.dtype)  # a Python scalar, in the result dtype
    if type(y) is not np.ndarray:
        y = np.asarray(y, call.dtype)
    xs, ys = x_source.host(x, call.flat), y_source.host(y, call.flat)
    if call.flat:
        cpu_broadcast.where_flat(c, xs, ys, flat, call.plan.chunk, call.parallel)
    else:
        cpu_broadcast.where(
            c, xs, ys, flat, call.geometry, call.plan.chunk, call.parallel
        )
    return out


def _gpu_operand(value: Any, name: str, dtype: np.dtype, like: Any) -> Any:
    """An Operand for an array, or for a scalar: a 0-d array on the device
    of `like`, of `dtype` for a Python scalar (weak), of its own for a NumPy
    scalar (strong)."""
    if _is_scalar(value):
        from numba import cuda

        host = np.asarray(value, dtype=None if isinstance(value, np.generic) else dtype)
        with like.call.on_device():
            return _dispatch.Operand(cuda.to_device(host), name)
    return _dispatch.Operand(value, name)


def _where_gpu(condition: Any, x: Any, y: Any, block: int | None) -> Any:
    c = _dispatch.Operand(condition, "condition")
    metas = [
        v if type(v) in _SCALARS else _dispatch.Operand(v, name)
        for v, name in ((x, "x"), (y, "y"))
    ]
    keys = [
        type(v) if type(v) in _SCALARS else (v.shape, v.array.strides, v.dtype)
        for v in metas
    ]
    call = where_plan((c.shape, c.array.strides, c.dtype), *keys, block, False)
    a, b = (_gpu_operand(v, name, call.dtype, c) for v, name in ((x, "x"), (y, "y")))
    native, out = c.empty(call.out_shape, call.dtype)
    if call.plan.n == 0:
        return native
    plan = call.plan
    # Operands as the plan reads them: NumPy scalars arrived as Operands of
    # their own dtype above and are 0-d, so their sources match the plan's.
    flats = [
        s.device(v.array, c.call) for v, s in zip((c, a, b), call.sources, strict=True)
    ]
    with c.call.on_device():
        launch = (plan.grid, plan.block, c.call.stream)
        if plan.contiguous:
            cuda_broadcast.where_flat_kernel[launch](*flats, _flat(out))
        else:
            cuda_broadcast.where_kernel[launch](
                *flats, _flat(out), *_device_geometry(call, c.call.stream)
            )
    return native


__all__ = ["broadcast_shapes", "expand", "where"]
