"""nll_loss, cross_entropy and its gradient: validate as PyTorch does, plan,
dispatch to the CPU or GPU kernels, reduce."""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from softkern import _dispatch, _dtypes, _launch, _layout
from softkern.cpu import losses as cpu_losses
from softkern.cuda import convert
from softkern.cuda import losses as cuda_losses
from softkern.ops.reduce import _flat
from softkern.ops.softmax import (
    FLOATS_SAID,
    _contiguous_view,
    _cpu_casts,
    _gpu_out,
    _host_out,
    cpu_input,
    cpu_store,
    cpu_target,
    is_softmax_float,
)

REDUCTIONS = ("none", "mean", "sum")
_INT64 = np.dtype(np.int64)
CACHE_LINE = 64


def _check_reduction(reduction: str, fn: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}"
        )
    return reduction


def _check_number(
    value: Any, name: str, fn: str, lo: float, hi: float, expected: str
) -> float:
    """`value` as a float if it is a real number (not a bool) with lo <=
    value <= hi (lo, hi exclusive where infinite or, for softcap, 0);
    otherwise ValueError naming `name` and what was `expected`."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not lo <= float(value) <= hi
    ):
        raise ValueError(f"{fn}: {name} must be {expected}, got {value!r}")
    return float(value)


def _check_smoothing(label_smoothing: float, fn: str) -> float:
    return _check_number(
        label_smoothing, "label_smoothing", fn, 0.0, 1.0, "a number in [0, 1]"
    )


def _check_softcap(softcap: float | None, fn: str) -> float:
    """softcap as the kernels take it: 0 for none."""
    if softcap is None:
        return 0.0
    return _check_number(
        softcap, "softcap", fn, math.ulp(0.0), sys.float_info.max,
        "None or a finite number > 0",
    )  # fmt: skip


def _check_lse_square_scale(scale: float, fn: str) -> float:
    return _check_number(
        scale, "lse_square_scale", fn, 0.0, sys.float_info.max,
        "a finite number >= 0",
    )  # fmt: skip


def _check_ignore_index(ignore_index: int, fn: str) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


class LossPlan(NamedTuple):
    """One loss call's checked arguments for one argument shape: what both
    devices need (the (outer, C, inner) view, the plan, the reduction) and
    what the CPU kernels need (casts first, -inf of the compute type, the
    weight of ones when none is given, threading)."""

    fn: str
    kind: str  # "index" or "probs"
    class_dim: int
    batch_shape: tuple[int, ...]  # the shape of reduction="none"'s result
    view: tuple[int, int, int]  # (outer, C, inner)
    plan: _launch.SoftmaxPlan
    out_dtype: np.dtype  # float16 results are computed in float32
    acc: np.dtype
    lowest: np.generic
    casts: tuple[np.dtype, ...]  # of the input, before the CPU kernels
    target_casts: tuple[np.dtype, ...]  # of probability targets
    ignore_index: int
    smoothing: float
    cap: np.generic  # softcap in the compute type, 0 for none
    zscale: float  # lse_square_scale
    reduction: str
    ones: np.ndarray  # the CPU weight when none is given
    parallel: bool  # the CPU kernels that read every logit
    nll_parallel: bool  # nll_loss, which reads one logit per position

    @property
    def classes(self) -> int:
        return self.view[1]

    @property
    def positions(self) -> int:
        return self.view[0] * self.view[2]

    @property
    def weightless_mean_is_nan(self) -> bool:
        """Whether a mean over a zero total weight is NaN whatever the sum
        of losses: PyTorch's smoothed mean adds (1 - eps) nll_sum / W and
        eps / C smooth_sum / W, and with every counted target weighing 0
        the first is 0 / 0; the z-loss follows the same denominator.
        Without either option the sum over W is PyTorch's own division."""
        return self.kind == "index" and (self.smoothing > 0 or self.zscale > 0)


@_dispatch.plan_cache
def loss_plan(
    fn: str,
    probabilities: bool,
    x_shape: tuple[int, ...],
    x_dtype: np.dtype,
    t_shape: tuple[int, ...],
    t_dtype: np.dtype,
    weight: tuple[tuple[int, ...], np.dtype] | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    block: int | None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
) -> LossPlan:
    reduction = _check_reduction(reduction, fn)
    smoothing = _check_smoothing(label_smoothing, fn)
    cap = _check_softcap(softcap, fn)
    zscale = _check_lse_square_scale(lse_square_scale, fn)
    ignore_index = _check_ignore_index(ignore_index, fn)
    if not is_softmax_float(x_dtype):
        raise TypeError(f"{fn}: input has dtype {x_dtype}; expected {FLOATS_SAID}")
    if not x_shape:
        raise ValueError(
            f"{fn}: input must have a class dim: shape (C,), (N, C) or "
            f"(N, C, d1, ..., dK), got a 0-d array"
        )
    class_dim = 0 if len(x_shape) == 1 else 1
    classes = x_shape[class_dim]
    batch_shape = x_shape[:class_dim] + x_shape[class_dim + 1 :]
    if probabilities and t_shape == x_shape and _dtypes.is_float(t_dtype):
        kind = "probs"
    elif t_shape == x_shape and probabilities:
        raise TypeError(
            f"{fn}: a target of the input's shape {x_shape} holds class "
            f"probabilities and must be floating point, got {t_dtype}"
        )
    else:
        kind = "index"
        if t_dtype.kind not in "iu":
            probs = " (or class probabilities of the input's shape)"
            raise TypeError(
                f"{fn}: target must hold class indices of an integer dtype"
                f"{probs if probabilities else ''}, got {t_dtype} of shape {t_shape}"
            )
        if t_shape != batch_shape:
            raise ValueError(
                f"{fn}: input of shape {x_shape} needs a target of shape "
                f"{batch_shape} (batch size {x_shape[0] if class_dim else 'none'}), "
                f"got {t_shape}"
            )
    if weight is not None:
        w_shape, w_dtype = weight
        if w_dtype.kind not in "fiu" and not _dtypes.is_bfloat16(w_dtype):
            raise TypeError(f"{fn}: weight has dtype {w_dtype}; expected a real dtype")
        if w_shape != (classes,):
            raise ValueError(
                f"{fn}: weight must have shape ({classes},), one value per class, "
                f"got {w_shape}"
            )
    view = _layout.outer_n_inner(x_shape, (class_dim,))
    if classes == 0 and view[0] * view[2]:
        raise ValueError(f"{fn}: input of shape {x_shape} has no classes")
    plan = _launch.softmax_plan(view, 1, x_dtype, block, _launch.SPLIT_MIN_LOSS_ROW)
    acc = _launch.softmax_acc_dtype(x_dtype)
    ones = np.ones(classes, acc)
    ones.flags.writeable = False  # shared by every call of this plan
    return LossPlan(
        fn=fn,
        kind=kind,
        class_dim=class_dim,
        batch_shape=batch_shape,
        view=view,
        plan=plan,
        out_dtype=x_dtype,
        acc=acc,
        lowest=acc.type(-np.inf),
        casts=_cpu_casts(x_dtype, x_dtype),
        # Probabilities in the compute type: Numba cannot load float16 on
        # the CPU, and one dtype means one compiled kernel (PyTorch wants
        # the input's dtype anyway)
        target_casts=(acc,) if kind == "probs" and t_dtype != acc else (),
        ignore_index=ignore_index,
        smoothing=smoothing,
        cap=acc.type(cap),
        zscale=zscale,
        reduction=reduction,
        ones=ones,
        parallel=_launch.cpu_parallel(math.prod(x_shape) * x_dtype.itemsize),
        # each position's logit is a load from its own cache line
        nll_parallel=_launch.cpu_parallel(view[0] * view[2] * CACHE_LINE),
    )


def plan_of(
    fn: str,
    probabilities: bool,
    x: Any,
    t: Any,
    w: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    block: int | None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
) -> LossPlan:
    """``loss_plan`` of operands given as anything with a shape and a dtype
    (NumPy arrays, or ``_dispatch.Operand``s of device arrays)."""
    return loss_plan(
        fn,
        probabilities,
        x.shape,
        x.dtype,
        t.shape,
        t.dtype,
        None if w is None else (w.shape, w.dtype),
        ignore_index,
        reduction,
        label_smoothing,
        block,
        softcap,
        lse_square_scale,
    )


def _raise_bad_target(p: LossPlan, value: int) -> None:
    raise IndexError(
        f"{p.fn}: target {int(value)} is out of bounds for {p.classes} "
        f"classes (expected 0 to {p.classes - 1}, or ignore_index="
        f"{p.ignore_index})"
    )


def _empty_result(p: LossPlan, empty: Any) -> Any:
    """The result of a batch of no positions: mean NaN, sum 0, none empty;
    `empty(shape, dtype)` allocates (native, kernel view) on the device."""
    shape = p.batch_shape if p.reduction == "none" else ()
    native, out = empty(shape, p.out_dtype)
    if p.reduction != "none":
        value = np.full((), np.nan if p.reduction == "mean" else 0, p.out_dtype)
        if isinstance(out, np.ndarray):
            out[...] = value
        else:
            _flat(out).copy_to_device(value.reshape(1))
    return native


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any]:
    out = _dispatch.host_empty(shape, dtype)
    return out, out


# --- CPU ---------------------------------------------------------------------


class _HostArgs(NamedTuple):
    """A loss call's NumPy arrays as the CPU kernels read them."""

    x3: np.ndarray  # (outer, C, inner), in the compute dtype
    target: np.ndarray  # (outer, inner) int64 indices or (outer, C, inner) probs
    weight: np.ndarray  # (C,) in the compute dtype


def _host_args(p: LossPlan, x: np.ndarray, t: np.ndarray, w: Any) -> _HostArgs:
    x3 = cpu_input(x.reshape(p.view), p.casts)
    if p.kind == "probs":
        target = cpu_input(t.reshape(p.view), p.target_casts)
    else:
        target = t.reshape(p.view[0], p.view[2])
        if target.dtype != _INT64 or not target.flags.c_contiguous:
            target = np.ascontiguousarray(target, dtype=_INT64)
    if w is None:
        weight = p.ones
    else:
        weight = read_only(np.ascontiguousarray(w, dtype=p.acc))
    return _HostArgs(x3, target, weight)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of `a`. Numba compiles a kernel per signature and
    read-only arrays have types of their own: the small arrays the loss
    kernels take (weights, upstream gradients) are always passed read-only,
    as the shared defaults (``LossPlan.ones``, ``_ONE``) must be, so that one
    compiled kernel (the one the warmup caches) serves every call."""
    view = a.view()
    view.flags.writeable = False
    return view


def _loss_result(p: LossPlan, losses: np.ndarray, total: float, count: float) -> Any:
    """The reduced result, from the per-position `losses` and their `total`
    over `count` (the mean's denominator)."""
    if p.reduction == "none":
        out = _dispatch.host_empty(p.batch_shape, p.out_dtype)
        out[...] = losses.reshape(p.batch_shape)
        return out
    if p.reduction == "mean":
        if count == 0 and p.weightless_mean_is_nan:
            total = np.nan
        elif count == 0:  # all ignored: 0 / 0 = NaN, as PyTorch
            with np.errstate(invalid="ignore", divide="ignore"):
                total = np.float64(total) / count
        else:
            total = total / count
    return np.array(total, p.out_dtype)


def _cpu_forward(p: LossPlan, x: np.ndarray, t: np.ndarray, w: Any) -> Any:
    args = _host_args(p, x, t, w)
    outer, _, inner = p.view
    rows = p.plan.cpu_regime == "rows"
    losses = _dispatch.host_empty((outer, inner), np.float64)
    if p.kind == "probs":
        if rows:
            total = cpu_losses.probs_rows(
                args.x3.reshape(outer, p.classes),
                args.target.reshape(outer, p.classes),
                args.weight,
                p.smoothing,
                p.cap,
                p.zscale,
                losses.reshape(-1),
                p.lowest,
                p.parallel,
            )
        else:
            total = cpu_losses.probs_columns(
                args.x3,
                args.target,
                args.weight,
                p.smoothing,
                p.cap,
                p.zscale,
                p.plan.cpu_strip,
                losses,
                p.lowest,
                p.parallel,
            )
        return _loss_result(p, losses, total, p.positions)
    weights = _dispatch.host_empty((outer, inner), np.float64)
    if rows:
        total, count, bad = cpu_losses.index_rows(
            args.x3.reshape(outer, p.classes),
            args.target.reshape(-1),
            args.weight,
            p.ignore_index,
            p.smoothing,
            p.cap,
            p.zscale,
            losses.reshape(-1),
            weights.reshape(-1),
            p.lowest,
            p.parallel,
        )
    else:
        total, count, bad = cpu_losses.index_columns(
            args.x3,
            args.target,
            args.weight,
            p.ignore_index,
            p.smoothing,
            p.cap,
            p.zscale,
            p.plan.cpu_strip,
            losses,
            weights,
            p.lowest,
            p.parallel,
        )
    if bad >= 0:
        _raise_bad_target(p, args.target.flat[bad])
    return _loss_result(p, losses, total, count)


def _cpu_nll(p: LossPlan, x: np.ndarray, t: np.ndarray, w: Any) -> Any:
    args = _host_args(p, x, t, w)
    losses = _dispatch.host_empty(args.target.shape, np.float64)
    weights = _dispatch.host_empty(args.target.shape, np.float64)
    total, count, bad = cpu_losses.nll(
        args.x3,
        args.target,
        args.weight,
        p.ignore_index,
        losses,
        weights,
        p.nll_parallel,
    )
    if bad >= 0:
        _raise_bad_target(p, args.target.flat[bad])
    return _loss_result(p, losses, total, count)


def _host_operands(*values: Any) -> tuple[Any, ...] | None:
    """The arguments as NumPy arrays (None stays None) when the call runs
    on the CPU, or None when it runs on the GPU."""
    if all(type(v) is np.ndarray or v is None for v in values):
        return values
    if _dispatch.device_of(*(v for v in values if v is not None)) == "cuda":
        return None
    return tuple(None if v is None else np.asarray(v) for v in values)


# --- GPU ---------------------------------------------------------------------


@dataclass
class _Loss:
    """A GPU call's operands as the kernels read them, and its plan."""

    p: LossPlan
    a: _dispatch.Operand  # the input
    x3: Any  # (outer, C, inner) view of the input
    target3: Any  # (outer, inner) class indices or (outer, C, inner) probabilities
    weight: _dispatch.Operand | None  # (C,) weights (None: all ones)


def _gpu_loss(
    fn: str,
    probabilities: bool,
    input: Any,
    target: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    block: int | None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
) -> _Loss:
    a = _dispatch.Operand(input, "input")
    t = _dispatch.Operand(target, "target")
    w = None if weight is None else _dispatch.Operand(weight, "weight")
    p = plan_of(
        fn, probabilities, a, t, w, ignore_index, reduction, label_smoothing,
        block, softcap, lse_square_scale,
    )  # fmt: skip
    if p.kind == "probs":
        target3 = t.around((p.class_dim,))
        if _dtypes.is_bfloat16(t.dtype):
            target3 = _device_float32(target3, a.call)
    else:
        target3 = _positions(t, a.shape, p.class_dim)
    return _Loss(p, a, a.around((p.class_dim,)), target3, w)


def _positions(t: _dispatch.Operand, shape: tuple[int, ...], class_dim: int) -> Any:
    """Class-index targets as an (outer, inner) view (a copy only where
    strides cannot merge)."""
    if not t.shape:  # input (C,), target ()
        return _dispatch.strided_view(t.array, (1, 1), (0, 0))
    flat = t.view([(0, len(t.shape))])
    outer = shape[0] if class_dim else 1
    inner = math.prod(shape[class_dim + 1 :])
    step = flat.strides[0]
    return _dispatch.strided_view(flat, (outer, inner), (inner * step, step))


NO_BAD_TARGET = np.iinfo(np.int64).max


class _GpuScratch:
    """Device scratch of one GPU call: the bad-target record and small
    arrays, on the call's stream."""

    def __init__(self, loss: _Loss):
        self.loss = loss
        self.call = loss.a.call
        self.stream = self.call.stream
        # the first bad target's position (kernels lower it by atomic min)
        self.bad = cuda.to_device(np.array([NO_BAD_TARGET]), stream=self.stream)

    def small(self, values: Any, dtype: np.dtype) -> Any:
        return cuda.to_device(np.asarray(values, dtype).reshape(-1), stream=self.stream)

    def weight(self) -> Any:
        if self.loss.weight is None:
            return self.small(np.ones(self.loss.p.classes), self.loss.p.acc)
        flat = self.loss.weight.view([(0, 1)])
        if _dtypes.is_bfloat16(self.loss.weight.dtype):
            return _device_float32(flat, self.call)
        return flat

    def check(self) -> None:
        """Raise IndexError if a kernel met a bad target (waits for them)."""
        position = int(self.bad.copy_to_host(stream=self.stream)[0])
        if self.stream:
            self.stream.synchronize()
        if position != NO_BAD_TARGET:
            targets = self.loss.target3  # (outer, inner)
            inner = targets.shape[1]
            _raise_bad_target(self.loss.p, targets[position // inner, position % inner])


def _gpu_losses(loss: _Loss, launch: Any, grid: int, strategy: int) -> Any:
    """Run ``launch(weight, out, total, scratch)`` on the GPU: into the
    per-position losses for reduction "none", else into per-block partials
    (total=True) that one more launch folds into the 0-d result. Raises
    IndexError after the launches if a kernel met a bad target."""
    scratch = _GpuScratch(loss)
    with loss.a.call.on_device():
        weight = scratch.weight()
        if loss.p.reduction == "none":
            native, out = loss.a.empty(loss.p.batch_shape, loss.p.out_dtype)
            positions = (loss.x3.shape[0], loss.x3.shape[2])
            launch(weight, _contiguous_view(out, positions), False, scratch)
        else:
            partials = loss.a.empty((2, grid), loss.p.acc)[1]
            launch(weight, partials, True, scratch)
            native = _finish(loss, partials, strategy, scratch.stream)
        scratch.check()
    return native


def _gpu_forward(loss: _Loss, strategy: int) -> Any:
    def launch(weight: Any, out: Any, total: bool, scratch: _GpuScratch) -> None:
        cuda_losses.launch_forward(
            loss.p.kind,
            loss.x3,
            loss.target3,
            weight,
            loss.p.ignore_index,
            loss.p.smoothing,
            loss.p.cap,
            loss.p.zscale,
            out,
            total,
            loss.p.plan,
            strategy,
            scratch.stream,
            scratch.bad,
            loss.p.out_dtype,
            _scratch_of(loss),
        )

    partials = cuda_losses.forward_partials(loss.p.plan)
    return _gpu_losses(loss, launch, partials, strategy)


def _scratch_of(loss: _Loss) -> Any:
    """``empty(shape, dtype)``: a device scratch array for the kernels (the
    split regime's statistics)."""
    return lambda shape, dtype: loss.a.empty(shape, dtype)[1]


def _finish(loss: _Loss, partials: Any, strategy: int, stream: Any) -> Any:
    native, out = loss.a.empty((), loss.p.out_dtype)
    if loss.p.reduction == "sum":
        mode, count = cuda_losses.SUM, 0
    elif loss.p.weightless_mean_is_nan:
        mode, count = cuda_losses.MEAN_OR_NAN, 0
    else:
        mode = cuda_losses.MEAN
        count = loss.p.positions if loss.p.kind == "probs" else 0
    cuda_losses.launch_finish(
        partials,
        mode,
        count,
        _flat(out),
        loss.p.plan.block,
        strategy,
        stream,
        loss.p.out_dtype,
    )
    return native


@_dispatch.public_function
def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Cross entropy between the logits `input` and `target`, like
    ``torch.nn.functional.cross_entropy``, fused: log_softmax and nll_loss in
    one pass that never stores the (N, C) log-probabilities.

    `input` is (C,), (N, C) or (N, C, d1, ..., dK) (classes along dim 1, or
    dim 0 for 1-D input), float16/32/64 (float16 computes in float32).
    `target` holds class indices (any integer dtype) of the input's shape
    without the class dim, or class probabilities (float) of the input's own
    shape. `weight` (C,) rescales each class; targets equal to
    `ignore_index` add nothing and do not count in the mean;
    `label_smoothing` mixes the target with the uniform distribution.
    `reduction`: "none" (a loss per position), "sum", or "mean" (the sum
    over the summed weights of the counted targets; over the number of
    positions for probabilities).

    Two options of fused training kernels that PyTorch lacks, both inside
    the kernels (no logit is stored): `softcap` replaces each logit x by
    softcap * tanh(x / softcap) first (Gemma 2's logit soft-capping);
    `lse_square_scale` adds lse_square_scale * lse**2 to the loss of each
    counted position (PaLM's z-loss, lse the log of the sum of exp of the
    row's logits, capped if asked), reduced with it: for "mean" divided by
    the same denominator. A target that is neither a class nor
    `ignore_index` raises IndexError, on the GPU too (checked after the
    kernel, which never reads out of bounds). `reduce` and `block` pick the
    GPU's in-block strategy and block size, as in ``softkern.softmax``.
    Returns an array of the input's kind and dtype (0-d unless "none").
    """
    return _cross_entropy(
        "softkern.cross_entropy", input, target, weight, ignore_index, reduction,
        label_smoothing, softcap, lse_square_scale, reduce, block,
    )  # fmt: skip


def _cross_entropy(
    fn: str,
    input: Any,
    target: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    lse_square_scale: float,
    reduce: int,
    block: int | None,
) -> Any:
    """``cross_entropy``, its errors naming `fn` (the public function called)."""
    strategy = _launch.check_strategy(reduce)
    host = _host_operands(input, target, weight)
    if host is None:
        loss = _gpu_loss(
            fn, True, input, target, weight, ignore_index, reduction,
            label_smoothing, block, softcap, lse_square_scale,
        )  # fmt: skip
        if loss.p.positions == 0:
            return _empty_result(loss.p, loss.a.empty)
        return _gpu_forward(loss, strategy)
    x, t, w = host
    p = plan_of(
        fn, True, x, t, w, ignore_index, reduction, label_smoothing, block,
        softcap, lse_square_scale,
    )  # fmt: skip
    if p.positions == 0:
        return _empty_result(p, _host_empty)
    return _cpu_forward(p, x, t, w)


@_dispatch.public_function
def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """Negative log-likelihood of the log-probabilities `input` at the class
    indices `target`, like ``torch.nn.functional.nll_loss``: -weight[t] *
    input[i, t] per position, reduced as ``cross_entropy`` (shapes, weight,
    ignore_index, reduction and errors as there; no probability targets)."""
    strategy = _launch.check_strategy(reduce)
    fn = "softkern.nll_loss"
    host = _host_operands(input, target, weight)
    if host is not None:
        x, t, w = host
        p = plan_of(fn, False, x, t, w, ignore_index, reduction, 0.0, block)
        if p.positions == 0:
            return _empty_result(p, _host_empty)
        return _cpu_nll(p, x, t, w)
    loss = _gpu_loss(
        fn, False, input, target, weight, ignore_index, reduction, 0.0, block
    )
    if loss.p.positions == 0:
        return _empty_result(loss.p, loss.a.empty)
    plan = _launch.full_reduce_plan(loss.p.positions, loss.p.plan.block)

    def launch(weight: Any, out: Any, total: bool, scratch: _GpuScratch) -> None:
        cuda_losses.launch_nll(
            loss.x3,
            loss.target3,
            weight,
            loss.p.ignore_index,
            out,
            total,
            plan,
            strategy,
            scratch.stream,
            scratch.bad,
            loss.p.out_dtype,
        )

    return _gpu_losses(loss, launch, plan.grid, strategy)


# --- backward ----------------------------------------------------------------


def _grads(p: LossPlan, device: str, grad_output: Any) -> tuple[Any, bool]:
    """grad_output as the kernels read it: a 1-D array of one value, or of
    one per position for reduction "none"; and whether it is on the host."""
    fn = p.fn
    if isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool):
        return read_only(np.array([grad_output], np.float64)), True
    g = _dispatch.Operand(grad_output, "grad_output")
    if g.device != device:
        raise TypeError(
            f"{fn}: input is on the {device.upper()} but grad_output is "
            f"on the {g.device.upper()}; pass them on one device"
        )
    if g.dtype.kind not in "fiu" and not _dtypes.is_bfloat16(g.dtype):
        raise TypeError(f"{fn}: grad_output has dtype {g.dtype}; expected a real dtype")
    want = p.batch_shape if p.reduction == "none" else ()
    if g.shape not in ((), want):
        raise ValueError(
            f"{fn}: grad_output must be a number or an array of the loss's shape "
            f"{want} (reduction={p.reduction!r}), got shape {g.shape}"
        )
    if not g.shape:
        flat = _dispatch.strided_view(g.array, (1,), (0,))
    else:
        flat = g.view([(0, len(g.shape))])
    if g.call is None:
        return read_only(np.ascontiguousarray(flat, dtype=np.float64)), True
    if _dtypes.is_bfloat16(g.dtype):
        return _device_float32(flat, g.call), False
    return flat, False


def _device_float32(bits: Any, call: _dispatch.GpuCall) -> Any:
    """A float32 device copy of a bfloat16 array given as its bits (1-D or
    (outer, n, inner)): the loss kernels read targets, weights and upstream
    gradients in the compute type, not in the input's 16 bits."""
    shape = tuple(bits.shape)
    bits3 = (
        bits
        if len(shape) == 3
        else _dispatch.strided_view(bits, (1, shape[0], 1), (0, bits.strides[0], 0))
    )
    with call.on_device():
        wide = convert.widened(bits3, call.stream)
    return wide if len(shape) == 3 else wide.reshape(shape)


@_dispatch.public_function
def cross_entropy_backward(
    input: Any,
    target: Any,
    grad_output: Any = 1.0,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    out: Any = None,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """The gradient of ``cross_entropy(input, target, ...)`` with respect to
    `input`, given the gradient `grad_output` of the loss (a number or 0-d
    array for "sum"/"mean", or an array of the loss's shape for "none"):
    ``softmax(input) - onehot(target)``, weighted, smoothed and scaled by the
    reduction, in one pass per row that never stores the softmax. Arguments
    and errors as ``cross_entropy``; returns an array of the input's shape,
    kind and dtype, or writes it into `out` (C-contiguous, of that shape
    and dtype, on the input's device, not overlapping it) and returns `out`.
    Targets that are ignored get a zero gradient."""
    return _cross_entropy_backward(
        "softkern.cross_entropy_backward", input, target, grad_output, weight,
        ignore_index, reduction, label_smoothing, softcap, lse_square_scale, out,
        reduce, block,
    )  # fmt: skip


def _cross_entropy_backward(
    fn: str,
    input: Any,
    target: Any,
    grad_output: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    lse_square_scale: float,
    out: Any,
    reduce: int,
    block: int | None,
) -> Any:
    """``cross_entropy_backward``, its errors naming `fn`."""
    strategy = _launch.check_strategy(reduce)
    host = _host_operands(input, target, weight)
    if host is not None:
        x, t, w = host
        p = plan_of(
            fn, True, x, t, w, ignore_index, reduction, label_smoothing, block,
            softcap, lse_square_scale,
        )  # fmt: skip
        grads = _grads(p, "cpu", grad_output)[0]
        out = _grad_out_host(x, out, p)
        if out.size:
            _cpu_backward(p, x, t, w, grads, out)
        return out
    loss = _gpu_loss(
        fn, True, input, target, weight, ignore_index, reduction,
        label_smoothing, block, softcap, lse_square_scale,
    )  # fmt: skip
    grads, on_host = _grads(loss.p, "cuda", grad_output)
    if out is None:
        native, out = loss.a.empty(loss.a.shape, loss.p.out_dtype)
    else:
        native, out = _gpu_out(loss.a, out, loss.p.out_dtype, fn)
    if math.prod(loss.a.shape) == 0:
        return native
    scale = _backward_scale(loss.p)
    scratch = _GpuScratch(loss)
    plan = loss.p.plan
    with loss.a.call.on_device():
        weight = scratch.weight()
        if on_host:
            grads = scratch.small(grads, loss.p.acc)
        denominator = scratch.small([1.0], loss.p.acc)
        if loss.p.reduction == "mean" and loss.p.kind == "index":
            # The mean divides by the summed weights of the counted targets:
            # folded on the device by nll_loss's kernel, never copied back.
            positions = _launch.full_reduce_plan(loss.p.positions, plan.block)
            partials = loss.a.empty((2, positions.grid), loss.p.acc)[1]
            cuda_losses.launch_nll(
                loss.x3,
                loss.target3,
                weight,
                loss.p.ignore_index,
                partials,
                True,
                positions,
                strategy,
                scratch.stream,
                scratch.bad,
                loss.p.out_dtype,
            )
            cuda_losses.launch_finish(
                partials,
                cuda_losses.WEIGHT,
                0,
                denominator,
                plan.block,
                strategy,
                scratch.stream,
                loss.p.acc,
            )
        cuda_losses.launch_backward(
            loss.p.kind,
            loss.x3,
            loss.target3,
            weight,
            loss.p.ignore_index,
            loss.p.smoothing,
            loss.p.cap,
            loss.p.zscale,
            grads,
            scale,
            denominator,
            _contiguous_view(out, loss.x3.shape),
            plan,
            strategy,
            scratch.stream,
            scratch.bad,
            loss.p.out_dtype,
            _scratch_of(loss),
        )
        scratch.check()
    return native


def _grad_out_host(x: np.ndarray, out: Any, p: LossPlan) -> np.ndarray:
    """The CPU array a gradient is written into: a fresh one, or the
    caller's `out=`, checked (the kernels read a row's logits after
    writing its gradient, so out may not overlap the input at all)."""
    if out is None:
        return _dispatch.host_empty(x.shape, p.out_dtype)
    out = _host_out(x, out, p.out_dtype, p.fn)
    if np.may_share_memory(out, x) and np.shares_memory(out, x):
        raise ValueError(f"{p.fn}: out overlaps input; pass a separate array")
    return out


# index_rows_grad's per-row loss and weight arrays when it computes no loss,
# and grad_output = 1 as the kernels read it.
_NO_LOSSES = np.empty(0, np.float64)
_ONE = read_only(np.ones(1, np.float64))


@_dispatch.public_function
def cross_entropy_and_grad(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    out: Any = None,
    reduce: int = 2,
    block: int | None = None,
) -> tuple[Any, Any]:
    """``(cross_entropy(input, target, ...), its gradient with respect to
    input)`` for ``grad_output = 1``: what a training step needs, in one
    call. Arguments, results and errors as ``cross_entropy`` and
    ``cross_entropy_backward``; `out` receives the gradient, as there (a
    training loop can reuse one array step after step).

    On the CPU, class-index targets over contiguous rows (input (N, C) or
    (C,)) take one fused pass per row: the row is read from memory once,
    its exponentials are written into the gradient while they are summed,
    and the loss comes from the same statistics. Other layouts and
    probability targets, and the GPU, run the forward and backward kernels
    one after the other (the input is read twice)."""
    strategy = _launch.check_strategy(reduce)
    fn = "softkern.cross_entropy_and_grad"
    options = (weight, ignore_index, reduction, label_smoothing)
    extras = (softcap, lse_square_scale)
    host = _host_operands(input, target, weight)
    if host is not None:
        x, t, w = host
        p = plan_of(
            fn, True, x, t, w, ignore_index, reduction, label_smoothing, block,
            softcap, lse_square_scale,
        )  # fmt: skip
        if p.kind == "index" and p.plan.cpu_regime == "rows" and p.positions:
            return _cpu_loss_and_grad(p, x, t, w, _grad_out_host(x, out, p))
    loss = _cross_entropy(fn, input, target, *options, *extras, strategy, block)
    grad = _cross_entropy_backward(
        fn, input, target, 1.0, *options, *extras, out, strategy, block
    )
    return loss, grad


def _index_scale(p: LossPlan, args: _HostArgs, scale: float) -> float:
    """The gradient's factor for class-index targets, checked first: `scale`,
    divided for the mean by the summed weights of the counted targets."""
    total_weight, bad = cpu_losses.target_weight(
        args.target, args.weight, p.ignore_index
    )
    if bad >= 0:
        _raise_bad_target(p, args.target.flat[bad])
    if p.reduction == "mean":
        with np.errstate(divide="ignore"):  # all ignored: every row is 0
            scale = np.float64(scale) / total_weight
    return scale


def _cpu_loss_and_grad(
    p: LossPlan, x: np.ndarray, t: np.ndarray, w: Any, out: np.ndarray
) -> tuple[Any, np.ndarray]:
    """``cross_entropy_and_grad``'s fused CPU pass (class indices, rows)."""
    args = _host_args(p, x, t, w)
    scale = _index_scale(p, args, 1.0)
    target = _row_grad_target(out, p)
    rows = p.view[0]
    losses = _dispatch.host_empty((rows,), np.float64)
    weights = _dispatch.host_empty((rows,), np.float64)
    total, count, _ = cpu_losses.index_rows_grad(
        args.x3.reshape(rows, p.classes),
        args.target.reshape(-1),
        args.weight,
        p.ignore_index,
        p.smoothing,
        p.cap,
        p.zscale,
        _ONE,
        scale,
        target.reshape(rows, p.classes),
        losses,
        weights,
        True,
        p.lowest,
        p.parallel,
    )
    cpu_store(out, target)
    return _loss_result(p, losses, total, count), out


def _row_grad_target(out: np.ndarray, p: LossPlan) -> np.ndarray:
    """What ``index_rows_grad`` writes for `out`: a bfloat16 gradient as its
    bits (the kernel rounds each row from a float32 row of its own), else
    ``cpu_target``'s array."""
    if _dtypes.is_bfloat16(out.dtype):
        return out.view(_dtypes.BFLOAT16_BITS)
    return cpu_target(out, p.acc)


def _backward_scale(p: LossPlan) -> float:
    """The reduction's factor on every gradient, but for the mean over
    class-index targets (divided by their summed weights, found apart)."""
    return 1.0 / p.positions if p.reduction == "mean" and p.kind == "probs" else 1.0


def _cpu_backward(
    p: LossPlan, x: np.ndarray, t: np.ndarray, w: Any, grads: np.ndarray, out: Any
) -> None:
    args = _host_args(p, x, t, w)
    scale = _backward_scale(p)
    rows = p.plan.cpu_regime == "rows"
    outer, classes, _ = p.view
    if p.kind == "index" and rows:
        target = _row_grad_target(out, p)
    else:
        target = cpu_target(out, p.acc)
    out3 = target.reshape(p.view)
    if p.kind == "probs":
        if rows:
            cpu_losses.probs_rows_backward(
                args.x3.reshape(outer, classes),
                args.target.reshape(outer, classes),
                args.weight,
                p.smoothing,
                p.cap,
                p.zscale,
                grads,
                scale,
                out3.reshape(outer, classes),
                p.lowest,
                p.parallel,
            )
        else:
            cpu_losses.probs_columns_backward(
                args.x3,
                args.target,
                args.weight,
                p.smoothing,
                p.cap,
                p.zscale,
                grads,
                scale,
                p.plan.cpu_strip,
                out3,
                p.lowest,
                p.parallel,
            )
        cpu_store(out, target)
        return
    scale = _index_scale(p, args, scale)
    common = (args.weight, p.ignore_index, p.smoothing, p.cap, p.zscale, grads, scale)
    if rows:
        cpu_losses.index_rows_grad(
            args.x3.reshape(outer, classes),
            args.target.reshape(-1),
            *common,
            out3.reshape(outer, classes),
            _NO_LOSSES,
            _NO_LOSSES,
            False,
            p.lowest,
            p.parallel,
        )
    else:
        cpu_losses.index_columns_backward(
            args.x3, args.target, *common, p.plan.cpu_strip, out3, p.lowest, p.parallel
        )
    cpu_store(out, target)
