"""sigmoid, logsigmoid and gumbel_softmax: validate, dispatch to the CPU or
GPU kernels."""

from __future__ import annotations

import math
import numbers
import os
import secrets
import threading
from typing import Any, NamedTuple

import numpy as np

from softkern import _dispatch, _launch, _layout
from softkern.cpu import activations as cpu_activations
from softkern.cuda import activations as cuda_activations
from softkern.ops.reduce import _flat
from softkern.ops.softmax import (
    FLOAT_NAMES,
    _contiguous_view,
    cpu_input,
    cpu_store,
    cpu_target,
    softmax,
)

_FLOAT_KERNEL_INPUT = frozenset(np.dtype(n) for n in ("float32", "float64"))


class UnaryCall(NamedTuple):
    """An elementwise activation of one argument dtype and size."""

    out_dtype: np.dtype
    acc: np.dtype
    lowest: np.generic
    cast: np.dtype | None  # the CPU kernels' input dtype when x's is another
    size: int
    parallel: bool


@_dispatch.plan_cache
def unary_plan(name: str, shape: tuple[int, ...], dtype: np.dtype) -> UnaryCall:
    fn = f"softkern.{name}"
    if dtype.kind not in "biuf":
        raise TypeError(f"{fn}: x has dtype {dtype}; expected a real dtype")
    # Integer and bool input gives float32, as torch.sigmoid does.
    out_dtype = dtype if dtype.name in FLOAT_NAMES else np.dtype(np.float32)
    acc = _launch.softmax_acc_dtype(out_dtype)
    # Integers and float16 become a float32 copy: one kernel per float dtype
    # (Numba compiles one per input dtype; float16 it cannot load).
    cast = None if dtype in _FLOAT_KERNEL_INPUT else np.dtype(np.float32)
    size = math.prod(shape)
    return UnaryCall(
        out_dtype,
        acc,
        acc.type(-np.inf),
        cast,
        size,
        _launch.cpu_parallel(size * acc.itemsize),
    )


def _unary(name: str, x: Any, block: int | None) -> Any:
    host = _dispatch.cpu_array(x)
    if host is None:
        return _unary_gpu(name, x, block)
    call = unary_plan(name, host.shape, host.dtype)
    out = _dispatch.host_empty(host.shape, call.out_dtype)
    if call.size == 0:
        return out
    x1 = host.reshape(-1)  # a 0-d x too; copies only if needed
    if call.cast is not None:
        x1 = x1.astype(call.cast)
    target = cpu_target(out, call.acc)
    kernel = (
        cpu_activations.sigmoid if name == "sigmoid" else cpu_activations.logsigmoid
    )
    kernel(x1, target.reshape(-1), call.lowest, call.parallel)
    cpu_store(out, target)
    return out


def _unary_gpu(name: str, x: Any, block: int | None) -> Any:
    a = _dispatch.Operand(x, "x")
    call = unary_plan(name, a.shape, a.dtype)
    native, out = a.empty(a.shape, call.out_dtype)
    if call.size == 0:
        return native
    x1 = a.view([(0, len(a.shape))])  # 1-D, a 0-d x too; copies only if needed
    plan = _launch.full_reduce_plan(x1.shape[0], _launch.check_block(block))
    with a.call.on_device():
        kernel = cuda_activations.unary_kernel(name, plan.block, call.out_dtype)
        kernel[plan.grid, plan.block, a.call.stream](x1, _flat(out))
    return native


@_dispatch.public_function
def sigmoid(x: Any, *, block: int | None = None) -> Any:
    """1 / (1 + exp(-x)) elementwise, like ``torch.sigmoid``: computed from
    exp(-|x|), so it never overflows (sigmoid(-1000) is 0, not NaN). Integer
    and bool input gives float32; float16 computes in float32. Returns a new
    C-contiguous array of x's kind and shape."""
    return _unary("sigmoid", x, block)


@_dispatch.public_function
def logsigmoid(x: Any, *, block: int | None = None) -> Any:
    """log(sigmoid(x)) elementwise, like ``torch.nn.functional.logsigmoid``,
    computed stably as min(x, 0) - log1p(exp(-|x|)): logsigmoid(-1000) is
    -1000, not -inf. Dtypes as ``sigmoid``."""
    return _unary("logsigmoid", x, block)


_generators = threading.local()


def _host_generator() -> np.random.Generator:
    """This thread's generator for calls without a seed, seeded once from
    the OS (a fresh generator per call costs more than a small softmax). A
    forked child makes its own, so it never repeats its parent's noise."""
    pid = os.getpid()
    if getattr(_generators, "pid", None) != pid:
        _generators.generator = np.random.default_rng()
        _generators.pid = pid
    return _generators.generator


@_dispatch.public_function
def gumbel_softmax(
    logits: Any,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    seed: int | None = None,
    *,
    block: int | None = None,
) -> Any:
    """A sample of the Gumbel-softmax (concrete) distribution over `dim`,
    like ``torch.nn.functional.gumbel_softmax``: softmax((logits + g) / tau)
    with g standard Gumbel noise, g = -log(E), E ~ Exp(1).

    `hard=True` returns the exact one-hot (0 and 1) of the soft sample's
    argmax instead (PyTorch returns the same values, plus a straight-through
    gradient that softkern does not track). `seed` (an int; None draws one)
    makes the noise reproducible on one device: on the CPU it comes from
    NumPy's ``default_rng(seed)`` (without a seed, from a generator per
    thread seeded by the OS), on the GPU from Numba's xoroshiro128+
    states seeded with it, a state per thread of the plan's grid. The two
    devices give different samples for one seed. float16 computes in
    float32. Returns a new C-contiguous array of the logits' kind, shape and
    dtype.
    """
    fn = "softkern.gumbel_softmax"
    a = _dispatch.Operand(logits, "logits")
    if a.dtype.name not in FLOAT_NAMES:
        raise TypeError(
            f"{fn}: logits have dtype {a.dtype}; expected float16, float32 or float64"
        )
    if (
        not isinstance(tau, numbers.Real)
        or isinstance(tau, bool)
        or not (0 < float(tau) < math.inf)
    ):
        raise ValueError(f"{fn}: tau must be a positive finite number, got {tau!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise TypeError(f"{fn}: seed must be a non-negative int or None, got {seed!r}")
    dims = _layout.normalize_dims(dim, len(a.shape))
    if isinstance(dim, (tuple, list)) or len(dims) > 1:
        raise TypeError(f"{fn}: dim must be one int, got {dim!r}")
    dim = dims[0] if dims else 0
    acc = _launch.softmax_acc_dtype(a.dtype)
    if math.prod(a.shape) == 0:
        return a.empty(a.shape, a.dtype)[0]
    layout = _launch.softmax_plan(a.shape, dim, a.dtype)  # (outer, n, inner)
    shape3 = (layout.outer, layout.n, layout.inner)
    if a.call is None:
        rng = _host_generator() if seed is None else np.random.default_rng(seed)
        # g = -log(E), E ~ Exp(1): NumPy draws E 4x faster than Gumbels.
        noise = np.log(rng.standard_exponential(size=a.shape))
        # np.array, not .astype: a 0-d input's arithmetic gives a NumPy
        # scalar, which softmax's out= cannot write into.
        casts = (np.dtype(np.float32),) if a.dtype == np.float16 else ()
        z = np.array((cpu_input(a.array, casts) - noise) / float(tau), dtype=acc)
        soft = softmax(z, dim, out=z)
        native, out = a.empty(a.shape, a.dtype)
        if hard:
            hot = cpu_target(out, acc)
            parallel = _launch.cpu_parallel(soft.nbytes)
            cpu_activations.one_hot_max(
                soft.reshape(shape3), hot.reshape(shape3), parallel
            )
            cpu_store(out, hot)
        else:
            out[...] = soft
        return native
    if seed is None:
        seed = secrets.randbits(63)
    block = _launch.check_block(block)
    x1 = a.view([(0, len(a.shape))])  # 1-D, a 0-d x too; copies only if needed
    plan = _launch.gumbel_plan(x1.shape[0], block)
    stream = a.call.stream
    # Imported here: numba.cuda.random warns on import (numba-cuda's own
    # deprecated jit options), which `import softkern` should not.
    from numba.cuda.random import create_xoroshiro128p_states

    with a.call.on_device():
        z_native, z = a.empty(a.shape, acc)
        states = create_xoroshiro128p_states(
            plan.grid * plan.block, seed=seed, stream=stream
        )
        cuda_activations.gumbel_kernel(plan.block, acc)[plan.grid, plan.block, stream](
            x1, states, acc.type(tau), _flat(z)
        )
        soft_native = softmax(z_native, dim, out=z_native)
        if not hard and a.dtype == acc:
            return soft_native
        native, out = a.empty(a.shape, a.dtype)
        z3 = _contiguous_view(z, shape3)
        out3 = _contiguous_view(out, shape3)
        if hard:
            positions = _launch.full_reduce_plan(shape3[0] * shape3[2], block)
            kernel = cuda_activations.one_hot_kernel(positions.block, a.dtype)
            kernel[positions.grid, positions.block, stream](z3, out3)
        else:  # float16: round the float32 sample
            kernel = cuda_activations.unary_kernel("identity", plan.block, a.dtype)
            kernel[plan.grid, plan.block, stream](_flat(z), _flat(out))
    return native


__all__ = ["gumbel_softmax", "logsigmoid", "sigmoid"]
