"""The argument path shared by every operation: where an array lives, the
plans cached per argument shape, and how results go back in the caller's kind.

NumPy arrays, PyTorch CPU tensors (the public functions view them as NumPy
arrays: see ``public_function``), NumPy and Python scalars and sequences run
on the CPU. Anything that exports ``__cuda_array_interface__`` (Numba device
arrays, CuPy arrays, PyTorch CUDA tensors) and the CUDA simulator's device
arrays run on the GPU. A GPU call returns the caller's kind of object (CuPy
in, CuPy out; torch in, torch out) whose memory came from the caller's own
allocator, and it launches on the caller's current stream, because PyTorch's
interface carries no stream: launching on torch's stream orders our kernels
after torch's pending work on the input and before torch's later work on our
output, with no host sync.

The CPU path is built to cost about a microsecond before the kernel runs:
``cpu_array`` returns a NumPy array untouched, and each operation computes
its plan (checks, output shape, kernel choice) in a function decorated with
``plan_cache``, keyed by the arguments' shapes, dtypes and options, so a
repeated call of the same shape skips straight to ``np.empty`` and the
kernel.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from numba import config as numba_config
from numba import cuda

from softkern import _layout
from softkern._dtypes import BFLOAT16_BITS, bfloat16, is_bfloat16

Device = Literal["cpu", "cuda", "dask"]

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
_CPU_TYPES = (np.ndarray, np.generic, int, float, bool, list, tuple)
ACCEPTED = (
    "NumPy arrays, PyTorch CPU tensors, Python or NumPy scalars and sequences "
    "(CPU); Numba device "
    "arrays, CuPy arrays, PyTorch CUDA tensors or any object with "
    "__cuda_array_interface__ (GPU); dask.array.Array (chunk by chunk)"
)

# --- plans cached per argument shape ---------------------------------------

# Distinct argument shapes a process keeps plans for, per operation.
PLAN_CACHE_SIZE = 1024
_PLAN_CACHES: list[Any] = []
F = TypeVar("F", bound=Callable[..., Any])


def plan_cache(fn: F) -> F:
    """Cache `fn`, a pure function of hashable arguments (shapes, dtypes,
    options) that checks them and returns a plan. Errors are not cached, so
    a bad call raises every time. An argument that cannot be hashed (a dim
    given as an array, say) skips the cache: `fn` then raises its own error
    or plans as usual."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE, typed=True)(fn)
    _PLAN_CACHES.append(cached)

    @functools.wraps(fn)
    def lookup(*args: Any) -> Any:
        try:
            return cached(*args)
        except TypeError:
            return fn(*args)

    lookup.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return lookup  # type: ignore[return-value]


def clear_plan_caches() -> None:
    """Forget every cached plan (after changing a limit in ``_launch``)."""
    for cached in _PLAN_CACHES:
        cached.cache_clear()


def key(value: Any) -> Any:
    """A dim or sizes argument as a plan key: a list becomes a tuple; a
    sequence holding a bool stays a list, which cannot be a key, so that the
    plan is made afresh and rejects it (as a key, True would equal 1)."""
    if type(value) is tuple or type(value) is list:
        if any(isinstance(v, (bool, np.bool_)) for v in value):
            return list(value)
        return tuple(value)
    return value


def host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Every CPU array a kernel is to write comes from here (the tests fill
    them with NaN to prove that each element is written)."""
    return np.empty(shape, dtype)


def _module_of(obj: Any) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_torch(obj: Any) -> bool:
    return _module_of(obj) == "torch" and hasattr(obj, "is_cuda")


def _torch_module() -> Any:
    # sys.modules, not functools.cache: torch.compile traces this call.
    module = sys.modules.get("softkern._torch")
    if module is None:
        from softkern import _torch as module
    return module


def _holds(tensor: type, args: tuple, kwargs: dict) -> bool:
    for value in args:
        if isinstance(value, tensor):
            return True
    for value in kwargs.values():
        if isinstance(value, tensor):
            return True
    return False


def _dask_module() -> Any:
    module = sys.modules.get("softkern._dask")
    if module is None:
        from softkern import _dask as module
    return module


def public_function(fn: F) -> F:
    """Let the public function `fn` take PyTorch tensors and Dask arrays.

    A call holding neither costs two dict lookups more (torch and dask not
    imported) or a type check per argument. A call with a tensor goes to
    ``softkern._torch.call``: CPU tensors are viewed as NumPy arrays (no
    copy) and results come back as tensors of the same memory, and a tensor
    that requires grad, or a call under ``torch.compile``, goes through the
    ``softkern::`` custom ops, which autograd and the compiler know. A call
    with a ``dask.array.Array`` goes to ``softkern._dask.call``, which
    builds a lazy Dask array that runs our kernels chunk by chunk.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and _holds(getattr(torch, "Tensor", ()), args, kwargs):
            return _torch_module().call(name, fn, args, kwargs)
        dask_array = sys.modules.get("dask.array")
        if dask_array is not None and _holds(dask_array.Array, args, kwargs):
            return _dask_module().call(name, fn, args, kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


def _is_sim_array(obj: Any) -> bool:
    if not SIMULATOR:
        return False
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return isinstance(obj, FakeCUDAArray)


def _is_dask(obj: Any) -> bool:
    return _module_of(obj) == "dask" and hasattr(obj, "__dask_graph__")


def _device_of_one(obj: Any) -> Device:
    if _is_torch(obj):
        return "cuda" if obj.is_cuda else "cpu"
    if _is_sim_array(obj) or hasattr(obj, "__cuda_array_interface__"):
        return "cuda"
    if isinstance(obj, _CPU_TYPES):
        return "cpu"
    if _is_dask(obj):
        return "dask"
    raise TypeError(f"softkern cannot use {type(obj).__name__}; accepted: {ACCEPTED}")


def device_of(*arrays: Any) -> Device:
    """Return "cpu", "cuda" or "dask": where the kernels for these arguments
    run ("dask": chunk by chunk, on the CPU or GPU as the chunks are).

    Python scalars go with anything (``where(c, x, 0.0)``), and NumPy and
    CuPy arrays go with Dask arrays (Dask wraps them). Arrays on both
    devices in one call, or a tensor with a Dask array, are a TypeError
    naming both.
    """
    found: dict[Device, Any] = {}
    for a in arrays:
        if a is None:
            continue
        dev = _device_of_one(a)
        if isinstance(a, (int, float, bool)):
            continue
        found.setdefault(dev, a)
    if "dask" in found:
        for other in found.values():
            if _is_torch(other):
                raise TypeError(
                    "softkern got a Dask array and a PyTorch tensor in one call; "
                    "pass NumPy (or CuPy) arrays with Dask arrays"
                )
        return "dask"
    if len(found) == 2:
        cpu, gpu = found["cpu"], found["cuda"]
        raise TypeError(
            "softkern got arrays on two devices in one call: "
            f"{type(cpu).__name__} on the CPU and {type(gpu).__name__} on the "
            "GPU; move them to one device first"
        )
    return "cuda" if "cuda" in found else "cpu"


def cpu_array(obj: Any) -> np.ndarray | None:
    """`obj` as the NumPy array the CPU kernels read (a NumPy array itself,
    untouched), or None when it lives on the GPU; a TypeError names what is
    accepted."""
    if type(obj) is np.ndarray:
        return obj
    if _device_of_one(obj) == "cuda":
        return None
    return np.asarray(obj)


class Operand:
    """One array argument, as the kernels of its device read it.

    Holds the kernel-side array (a NumPy array, or a Numba or simulator device
    array) and, for the GPU, the caller's kind of array, allocator and stream.
    """

    def __init__(self, x: Any, name: str):
        self.device = device_of(x)
        if self.device == "cpu":
            self.array = np.asarray(x)
            self.call = None
            self.dtype = np.dtype(self.array.dtype)
        else:
            self.array, self.call, self.dtype = gpu_operand(x)
        self.name = name
        self.shape = tuple(self.array.shape)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any]:
        """A new array on the operand's device: (native, kernel view)."""
        if self.call is None:
            arr = host_empty(shape, dtype)
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
                    arr = gpu_contiguous(arr, self.call)
            merged = _layout.merge_strides(
                shape, tuple(arr.strides), groups, self.dtype.itemsize
            )
        return strided_view(arr, *merged)

    def around(self, dims: Sequence[int]) -> Any:
        """The operand as an (outer, n, inner) view, n the product of the
        sorted `dims` (at least one). Dims apart are first moved last (a
        strided view); a copy happens only where strides cannot merge."""
        ndim = len(self.shape)
        if not self.shape:
            return strided_view(self.array, (1, 1, 1), (0, 0, 0))
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
        return strided_view(
            self.array,
            tuple(self.shape[d] for d in order),
            tuple(strides[d] for d in order),
        )


def check_dtype(dtype: np.dtype, allowed: tuple, what: str, name: str) -> None:
    """A TypeError naming the argument and the dtypes `what` supports."""
    if dtype.type not in allowed:
        names = ", ".join(np.dtype(t).name for t in allowed)
        raise TypeError(f"{what}: {name} has dtype {dtype}; supported: {names}")


def three_d(x: np.ndarray, dims: tuple[int, ...], shape3: tuple[int, ...]):
    """A NumPy array as the (outer, n, inner) view around `dims` (sorted; a
    0-d array has none), of ``_layout.around_sizes`` (or (outer, n) when
    inner is 1): a view when the strides allow, else a copy, as
    ``np.reshape`` decides. Dims that are not consecutive move last first."""
    if dims and not _layout.is_consecutive(dims):
        kept = [d for d in range(x.ndim) if d not in dims]
        x = x.transpose(kept + list(dims))
    return x.reshape(shape3)


# --- the GPU side of a call ------------------------------------------------


@dataclass
class GpuCall:
    """The caller's array kind, device and stream for one GPU call."""

    kind: str  # "numba", "cupy", "torch" or "sim"
    device_id: int | None = None
    owner: Any = field(default=None, repr=False)
    view: Any = field(default=None, repr=False)

    @property
    def stream(self) -> Any:
        if self.kind == "torch":
            import torch

            ptr = torch.cuda.current_stream(self.device_id).cuda_stream
            return cuda.external_stream(ptr) if ptr else 0
        if self.kind == "cupy":
            import cupy

            ptr = cupy.cuda.get_current_stream().ptr
            return cuda.external_stream(ptr) if ptr else 0
        return 0

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        if self.device_id is None or self.kind == "sim":
            yield
        else:
            with cuda.gpus[self.device_id]:
                yield

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any]:
        """Allocate with the caller's allocator: (native object, kernel view)."""
        if self.kind == "torch":
            import torch

            if is_bfloat16(dtype):
                t = torch.empty(
                    shape, dtype=torch.bfloat16, device=f"cuda:{self.device_id}"
                )
                return t, _bits_of_torch(t)
            tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
            t = torch.empty(shape, dtype=tdtype, device=f"cuda:{self.device_id}")
            return t, _view_of_cai(t)
        if self.kind == "cupy":
            import cupy

            if is_bfloat16(dtype):
                raise TypeError(
                    "softkern: CuPy has no bfloat16 arrays; pass a torch CUDA "
                    "tensor or a Numba device array of ml_dtypes.bfloat16"
                )
            with cupy.cuda.Device(self.device_id):
                c = cupy.empty(shape, dtype)
            return c, _view_of_cai(c)
        if shape == ():
            arr = _device_scalar_class()(dtype)
        else:
            arr = cuda.device_array(shape, dtype)
        return arr, _bits_view(arr)


def _scalar_conversions(cls):
    """Add float()/int()/bool() to a 0-d device array class, as torch and CuPy
    scalars have; each is a (synchronizing) copy of one value to the host."""

    class DeviceScalar(cls):
        def __float__(self):
            return float(self.copy_to_host())

        def __int__(self):
            return int(self.copy_to_host())

        def __bool__(self):
            return bool(self.copy_to_host())

    DeviceScalar.__name__ = DeviceScalar.__qualname__ = f"{cls.__name__}Scalar"
    return DeviceScalar


@functools.cache
def _device_scalar_class():
    """A 0-d Numba device array (or simulator array) that float() accepts."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        scalar = _scalar_conversions(FakeCUDAArray)
        return lambda dtype: scalar(np.empty((), dtype))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    scalar = _scalar_conversions(DeviceNDArray)
    return lambda dtype: scalar(shape=(), strides=(), dtype=dtype)


def _view_of_cai(obj: Any) -> Any:
    # We launch on the owner's stream, so the interface's stream needs no sync.
    return cuda.as_cuda_array(obj, sync=False)


def gpu_operand(obj: Any) -> tuple[Any, GpuCall, np.dtype]:
    """A Numba (or simulator) device array viewing `obj` as the kernels read
    it (bfloat16 as its bits: ``softkern.cuda.convert``), the call's kind,
    and the elements' dtype."""
    if _is_sim_array(obj):
        return _bits_view(obj), GpuCall("sim"), np.dtype(obj.dtype)
    if _is_torch(obj):
        t = obj.detach() if obj.requires_grad else obj
        if t.dtype == sys.modules["torch"].bfloat16:
            view = _bits_of_torch(t)
            return view, GpuCall("torch", t.device.index, t, view), bfloat16()
        view = _view_of_cai(t)
        return view, GpuCall("torch", t.device.index, t, view), np.dtype(view.dtype)
    if _module_of(obj) == "cupy":
        view = _view_of_cai(obj)
        return view, GpuCall("cupy", obj.device.id, obj, view), np.dtype(view.dtype)
    if not isinstance(obj, cuda.cudadrv.devicearray.DeviceNDArray):
        obj = _view_of_cai(obj)
    return _bits_view(obj), GpuCall("numba"), np.dtype(obj.dtype)


def _bits_view(arr: Any) -> Any:
    """A device array of bfloat16 (ml_dtypes) as its uint16 bits; any other
    as itself."""
    if not is_bfloat16(np.dtype(arr.dtype)):
        return arr
    if _is_sim_array(arr):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(arr._ary.view(BFLOAT16_BITS))
    return arr.view(BFLOAT16_BITS)


def _bits_of_torch(t: Any) -> Any:
    """A bfloat16 CUDA tensor's bits as a uint16 device array (PyTorch's
    ``__cuda_array_interface__`` refuses bfloat16, and has no uint16)."""
    import torch

    return _view_of_cai(t.view(torch.int16)).view(BFLOAT16_BITS)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def strided_view(
    arr: Any,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    *,
    writeable: bool = False,
) -> Any:
    """A view of `arr`'s memory with another shape and byte strides, no copy.

    Views of inputs are read-only on the CPU, so a kernel bug cannot modify a
    caller's array; outputs ask for `writeable`.
    """
    if isinstance(arr, np.ndarray):
        if arr.flags.c_contiguous and strides == _c_strides(shape, arr.itemsize):
            view = arr.reshape(shape)  # as_strided costs ~5 us a call
            view.flags.writeable = writeable and arr.flags.writeable
            return view
        return np.lib.stride_tricks.as_strided(arr, shape, strides, writeable=writeable)
    if _is_sim_array(arr):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = np.lib.stride_tricks.as_strided(arr._ary, shape, strides)
        return FakeCUDAArray(host)
    cai = dict(arr.__cuda_array_interface__)
    cai.update(shape=tuple(shape), strides=tuple(strides), version=3, stream=None)
    return cuda.from_cuda_array_interface(cai, owner=arr, sync=False)


def gpu_contiguous(arr: Any, call: GpuCall) -> Any:
    """A C-contiguous device copy of a strided device array (on its device)."""
    if _is_sim_array(arr):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.ascontiguousarray(arr._ary))
    # The owner's own copy is the best tested; it applies when `arr` is the
    # caller's whole array rather than a view we made of it.
    if call.kind == "torch" and arr is call.view:
        return _view_of_cai(call.owner.contiguous())
    if call.kind == "cupy" and arr is call.view:
        import cupy

        return _view_of_cai(cupy.ascontiguousarray(call.owner))
    from softkern.cuda.copy import gather_contiguous

    return gather_contiguous(arr, call.stream)
