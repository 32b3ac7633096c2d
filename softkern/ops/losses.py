"""nll_loss, cross_entropy and its gradient: validate as PyTorch does, plan,
dispatch to the CPU or GPU kernels, reduce."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from softkern import _dispatch, _launch
from softkern.cpu import losses as cpu_losses
from softkern.cuda import losses as cuda_losses
from softkern.ops.reduce import _flat, _Operand
from softkern.ops.softmax import (
    FLOAT_NAMES,
    _computed_in,
    _contiguous_view,
    _cpu_input,
    _frozen,
)

REDUCTIONS = ("none", "mean", "sum")


@dataclass
class _Loss:
    """One call's checked arguments, as the kernels read them."""

    fn: str
    a: _Operand  # the input
    x3: Any  # (outer, C, inner) view of the input
    target3: Any  # (outer, inner) class indices or (outer, C, inner) probabilities
    kind: str  # "index" or "probs"
    weight: Any  # (C,) weights (None: all ones)
    ignore_index: int
    smoothing: float
    reduction: str
    batch_shape: tuple[int, ...]  # the shape of reduction="none"'s result
    plan: _launch.SoftmaxPlan

    @property
    def classes(self) -> int:
        return self.x3.shape[1]

    @property
    def positions(self) -> int:
        return self.x3.shape[0] * self.x3.shape[2]

    @property
    def out_dtype(self) -> np.dtype:
        return self.a.dtype  # float16 results are computed in float32

    @property
    def acc(self) -> np.dtype:
        return _launch.softmax_acc_dtype(self.out_dtype)


def _check_reduction(reduction: str, fn: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}"
        )
    return reduction


def _check_smoothing(label_smoothing: float, fn: str) -> float:
    if (
        not isinstance(label_smoothing, numbers.Real)
        or isinstance(label_smoothing, bool)
        or not 0.0 <= float(label_smoothing) <= 1.0
    ):
        raise ValueError(
            f"{fn}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}"
        )
    return float(label_smoothing)


def _check_ignore_index(ignore_index: int, fn: str) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


def _prepare(
    fn: str,
    input: Any,
    target: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    block: int | None,
    probabilities: bool,
) -> _Loss:
    reduction = _check_reduction(reduction, fn)
    smoothing = _check_smoothing(label_smoothing, fn)
    ignore_index = _check_ignore_index(ignore_index, fn)
    _dispatch.device_of(*(v for v in (input, target, weight) if v is not None))
    a = _Operand(input, "input")
    if a.dtype.name not in FLOAT_NAMES:
        raise TypeError(
            f"{fn}: input has dtype {a.dtype}; expected float16, float32 or float64"
        )
    if not a.shape:
        raise ValueError(
            f"{fn}: input must have a class dim: shape (C,), (N, C) or "
            f"(N, C, d1, ..., dK), got a 0-d array"
        )
    class_dim = 0 if len(a.shape) == 1 else 1
    classes = a.shape[class_dim]
    batch_shape = a.shape[:class_dim] + a.shape[class_dim + 1 :]
    t = _Operand(target, "target")
    if probabilities and t.shape == a.shape and t.dtype.kind == "f":
        kind = "probs"
        target3 = t.around((class_dim,))
    elif t.shape == a.shape and probabilities:
        raise TypeError(
            f"{fn}: a target of the input's shape {a.shape} holds class "
            f"probabilities and must be floating point, got {t.dtype}"
        )
    else:
        kind = "index"
        if t.dtype.kind not in "iu":
            probs = " (or class probabilities of the input's shape)"
            raise TypeError(
                f"{fn}: target must hold class indices of an integer dtype"
                f"{probs if probabilities else ''}, got {t.dtype} of shape {t.shape}"
            )
        if t.shape != batch_shape:
            raise ValueError(
                f"{fn}: input of shape {a.shape} needs a target of shape "
                f"{batch_shape} (batch size {a.shape[0] if class_dim else 'none'}), "
                f"got {t.shape}"
            )
        target3 = _positions(t, a.shape, class_dim)
    w = None
    if weight is not None:
        w = _Operand(weight, "weight")
        if w.dtype.kind not in "fiu":
            raise TypeError(f"{fn}: weight has dtype {w.dtype}; expected a real dtype")
        if w.shape != (classes,):
            raise ValueError(
                f"{fn}: weight must have shape ({classes},), one value per class, "
                f"got {w.shape}"
            )
    x3 = a.around((class_dim,))
    plan = _launch.softmax_plan(x3.shape, 1, a.dtype, block)
    loss = _Loss(
        fn=fn,
        a=a,
        x3=x3,
        target3=target3,
        kind=kind,
        weight=w,
        ignore_index=ignore_index,
        smoothing=smoothing,
        reduction=reduction,
        batch_shape=batch_shape,
        plan=plan,
    )
    if classes == 0 and loss.positions:
        raise ValueError(f"{fn}: input of shape {a.shape} has no classes")
    return loss


def _positions(t: _Operand, shape: tuple[int, ...], class_dim: int) -> Any:
    """Class-index targets as an (outer, inner) view (a copy only where
    strides cannot merge)."""
    if not t.shape:  # input (C,), target ()
        return _dispatch.strided_view(t.array, (1, 1), (0, 0))
    flat = t.view([(0, len(t.shape))])
    outer = shape[0] if class_dim else 1
    inner = math.prod(shape[class_dim + 1 :])
    step = flat.strides[0]
    return _dispatch.strided_view(flat, (outer, inner), (inner * step, step))


def _check_targets_cpu(loss: _Loss) -> np.ndarray:
    """The class indices as int64, after checking each is a class or
    ignore_index (before any kernel reads x with them)."""
    t = np.asarray(loss.target3)
    ignored = t == loss.ignore_index
    bad = ~ignored & ((t < 0) | (t >= loss.classes))
    if bad.any():
        _raise_bad_target(loss, t[bad].flat[0])
    return _frozen(np.ascontiguousarray(t, dtype=np.int64))


def _raise_bad_target(loss: _Loss, value: int) -> None:
    raise IndexError(
        f"{loss.fn}: target {int(value)} is out of bounds for {loss.classes} "
        f"classes (expected 0 to {loss.classes - 1}, or ignore_index="
        f"{loss.ignore_index})"
    )


def _cpu_weight(loss: _Loss) -> np.ndarray:
    if loss.weight is None:
        return _frozen(np.ones(loss.classes, loss.acc))
    return _frozen(np.ascontiguousarray(loss.weight.array, dtype=loss.acc))


def _empty_result(loss: _Loss) -> Any:
    """The result of a batch of no positions: mean NaN, sum 0, none empty."""
    shape = loss.batch_shape if loss.reduction == "none" else ()
    native, out = loss.a.empty(shape, loss.out_dtype)
    if loss.reduction != "none":
        value = np.full((), np.nan if loss.reduction == "mean" else 0, loss.out_dtype)
        if isinstance(out, np.ndarray):
            out[...] = value
        else:
            _flat(out).copy_to_device(value.reshape(1))
    return native


def _reduce_cpu(loss: _Loss, losses: np.ndarray, weights: np.ndarray | None) -> Any:
    shape = loss.batch_shape if loss.reduction == "none" else ()
    native, out = loss.a.empty(shape, loss.out_dtype)
    if loss.reduction == "none":
        out[...] = losses.reshape(shape)
        return native
    total = np.sum(losses)
    if loss.reduction == "mean":
        count = loss.positions if weights is None else np.sum(weights)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / count  # all ignored: 0 / 0 = NaN, as PyTorch
    out[...] = total
    return native


def _cpu_forward(loss: _Loss) -> Any:
    x3 = _cpu_input(loss.x3)
    lowest = loss.acc.type(-np.inf)
    weight = _cpu_weight(loss)
    outer, _, inner = x3.shape
    losses = np.empty((outer, inner), np.float64)
    rows = loss.plan.cpu_regime == "rows"
    if loss.kind == "probs":
        q3 = _cpu_input(loss.target3)
        if rows:
            cpu_losses.probs_rows(
                x3[:, :, 0], q3[:, :, 0], weight, loss.smoothing, losses[:, 0], lowest
            )
        else:
            cpu_losses.probs_columns(
                x3, q3, weight, loss.smoothing, loss.plan.cpu_strip, losses, lowest
            )
        return _reduce_cpu(loss, losses, None)
    target = _check_targets_cpu(loss)
    weights = np.empty((outer, inner), np.float64)
    if rows:
        cpu_losses.index_rows(
            x3[:, :, 0],
            target[:, 0],
            weight,
            loss.ignore_index,
            loss.smoothing,
            losses[:, 0],
            weights[:, 0],
            lowest,
        )
    else:
        cpu_losses.index_columns(
            x3,
            target,
            weight,
            loss.ignore_index,
            loss.smoothing,
            loss.plan.cpu_strip,
            losses,
            weights,
            lowest,
        )
    return _reduce_cpu(loss, losses, weights)


# --- GPU ---------------------------------------------------------------------


class _GpuScratch:
    """Device scratch of one GPU call: the bad-target record and small
    arrays, on the call's stream."""

    def __init__(self, loss: _Loss):
        self.loss = loss
        self.call = loss.a.call
        self.stream = self.call.stream
        self.bad = cuda.to_device(np.zeros(2, np.int64), stream=self.stream)

    def small(self, values: Any, dtype: np.dtype) -> Any:
        return cuda.to_device(np.asarray(values, dtype).reshape(-1), stream=self.stream)

    def weight(self) -> Any:
        if self.loss.weight is None:
            return self.small(np.ones(self.loss.classes), self.loss.acc)
        return self.loss.weight.view([(0, 1)])

    def check(self) -> None:
        """Raise IndexError if a kernel met a bad target (waits for them)."""
        bad = self.bad.copy_to_host(stream=self.stream)
        if self.stream:
            self.stream.synchronize()
        if bad[0]:
            _raise_bad_target(self.loss, bad[1])


def _gpu_losses(loss: _Loss, launch: Any, grid: int, strategy: int) -> Any:
    """Run ``launch(weight, out, total, scratch)`` on the GPU: into the
    per-position losses for reduction "none", else into per-block partials
    (total=True) that one more launch folds into the 0-d result. Raises
    IndexError after the launches if a kernel met a bad target."""
    scratch = _GpuScratch(loss)
    with loss.a.call.on_device():
        weight = scratch.weight()
        if loss.reduction == "none":
            native, out = loss.a.empty(loss.batch_shape, loss.out_dtype)
            positions = (loss.x3.shape[0], loss.x3.shape[2])
            launch(weight, _contiguous_view(out, positions), False, scratch)
        else:
            partials = loss.a.empty((2, grid), loss.acc)[1]
            launch(weight, partials, True, scratch)
            native = _finish(loss, partials, strategy, scratch.stream)
        scratch.check()
    return native


def _gpu_forward(loss: _Loss, strategy: int) -> Any:
    def launch(weight: Any, out: Any, total: bool, scratch: _GpuScratch) -> None:
        cuda_losses.launch_forward(
            loss.kind,
            loss.x3,
            loss.target3,
            weight,
            loss.ignore_index,
            loss.smoothing,
            out,
            total,
            loss.plan,
            strategy,
            scratch.stream,
            scratch.bad,
        )

    return _gpu_losses(loss, launch, loss.plan.grid, strategy)


def _finish(loss: _Loss, partials: Any, strategy: int, stream: Any) -> Any:
    native, out = loss.a.empty((), loss.out_dtype)
    if loss.reduction == "sum":
        mode, count = cuda_losses.SUM, 0
    else:
        mode = cuda_losses.MEAN
        count = loss.positions if loss.kind == "probs" else 0
    cuda_losses.launch_finish(
        partials, mode, count, _flat(out), loss.plan.block, strategy, stream
    )
    return native


def _forward(loss: _Loss, strategy: int) -> Any:
    if loss.positions == 0:
        return _empty_result(loss)
    if loss.a.call is None:
        return _cpu_forward(loss)
    return _gpu_forward(loss, strategy)


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
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
    positions for probabilities). A target that is neither a class nor
    `ignore_index` raises IndexError, on the GPU too (checked after the
    kernel, which never reads out of bounds). `reduce` and `block` pick the
    GPU's in-block strategy and block size, as in ``softkern.softmax``.
    Returns an array of the input's kind and dtype (0-d unless "none").
    """
    strategy = _launch.check_strategy(reduce)
    loss = _prepare(
        "softkern.cross_entropy",
        input,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        block,
        probabilities=True,
    )
    return _forward(loss, strategy)


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
    loss = _prepare(
        "softkern.nll_loss",
        input,
        target,
        weight,
        ignore_index,
        reduction,
        0.0,
        block,
        probabilities=False,
    )
    if loss.positions == 0:
        return _empty_result(loss)
    if loss.a.call is None:
        x3 = _cpu_input(loss.x3)
        target = _check_targets_cpu(loss)
        losses = np.empty(target.shape, np.float64)
        weights = np.empty(target.shape, np.float64)
        cpu_losses.nll(
            x3, target, _cpu_weight(loss), loss.ignore_index, losses, weights
        )
        return _reduce_cpu(loss, losses, weights)
    plan = _launch.full_reduce_plan(loss.positions, loss.plan.block)

    def launch(weight: Any, out: Any, total: bool, scratch: _GpuScratch) -> None:
        cuda_losses.launch_nll(
            loss.x3,
            loss.target3,
            weight,
            loss.ignore_index,
            out,
            total,
            plan,
            strategy,
            scratch.stream,
            scratch.bad,
        )

    return _gpu_losses(loss, launch, plan.grid, strategy)


# --- backward ----------------------------------------------------------------


def _grads(loss: _Loss, grad_output: Any) -> tuple[Any, bool]:
    """grad_output as the kernels read it: a 1-D array of one value, or of
    one per position for reduction "none"; and whether it is on the host."""
    fn = loss.fn
    if isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool):
        return _frozen(np.array([grad_output], np.float64)), True
    g = _Operand(grad_output, "grad_output")
    if g.device != loss.a.device:
        raise TypeError(
            f"{fn}: input is on the {loss.a.device.upper()} but grad_output is "
            f"on the {g.device.upper()}; pass them on one device"
        )
    if g.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: grad_output has dtype {g.dtype}; expected a real dtype")
    want = loss.batch_shape if loss.reduction == "none" else ()
    if g.shape not in ((), want):
        raise ValueError(
            f"{fn}: grad_output must be a number or an array of the loss's shape "
            f"{want} (reduction={loss.reduction!r}), got shape {g.shape}"
        )
    if not g.shape:
        flat = _dispatch.strided_view(g.array, (1,), (0,))
    else:
        flat = g.view([(0, len(g.shape))])
    if g.call is None:
        return _frozen(np.ascontiguousarray(flat, dtype=np.float64)), True
    return flat, False


def cross_entropy_backward(
    input: Any,
    target: Any,
    grad_output: Any = 1.0,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    reduce: int = 2,
    block: int | None = None,
) -> Any:
    """The gradient of ``cross_entropy(input, target, ...)`` with respect to
    `input`, given the gradient `grad_output` of the loss (a number or 0-d
    array for "sum"/"mean", or an array of the loss's shape for "none"):
    ``softmax(input) - onehot(target)``, weighted, smoothed and scaled by the
    reduction, in one pass per row that never stores the softmax. Arguments
    and errors as ``cross_entropy``; returns an array of the input's shape,
    kind and dtype. Targets that are ignored get a zero gradient."""
    strategy = _launch.check_strategy(reduce)
    loss = _prepare(
        "softkern.cross_entropy_backward",
        input,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        block,
        probabilities=True,
    )
    grads, on_host = _grads(loss, grad_output)
    native, out = loss.a.empty(loss.a.shape, loss.out_dtype)
    if math.prod(loss.a.shape) == 0:
        return native
    mean_of_probs = loss.reduction == "mean" and loss.kind == "probs"
    scale = 1.0 / loss.positions if mean_of_probs else 1.0
    if loss.a.call is None:
        _cpu_backward(loss, grads, scale, out)
        return native
    scratch = _GpuScratch(loss)
    plan = loss.plan
    with loss.a.call.on_device():
        weight = scratch.weight()
        if on_host:
            grads = scratch.small(grads, loss.acc)
        denominator = scratch.small([1.0], loss.acc)
        if loss.reduction == "mean" and loss.kind == "index":
            # The mean divides by the summed weights of the counted targets:
            # folded on the device by nll_loss's kernel, never copied back.
            positions = _launch.full_reduce_plan(loss.positions, plan.block)
            partials = loss.a.empty((2, positions.grid), loss.acc)[1]
            cuda_losses.launch_nll(
                loss.x3,
                loss.target3,
                weight,
                loss.ignore_index,
                partials,
                True,
                positions,
                strategy,
                scratch.stream,
                scratch.bad,
            )
            cuda_losses.launch_finish(
                partials,
                cuda_losses.WEIGHT,
                0,
                denominator,
                plan.block,
                strategy,
                scratch.stream,
            )
        cuda_losses.launch_backward(
            loss.kind,
            loss.x3,
            loss.target3,
            weight,
            loss.ignore_index,
            loss.smoothing,
            grads,
            scale,
            denominator,
            _contiguous_view(out, loss.x3.shape),
            plan,
            strategy,
            scratch.stream,
            scratch.bad,
        )
        scratch.check()
    return native


def _cpu_backward(loss: _Loss, grads: np.ndarray, scale: float, out: Any) -> None:
    x3 = _cpu_input(loss.x3)
    lowest = loss.acc.type(-np.inf)
    weight = _cpu_weight(loss)
    rows = loss.plan.cpu_regime == "rows"
    strip = loss.plan.cpu_strip
    with _computed_in(out, loss.acc) as target:
        out3 = _contiguous_view(target, x3.shape)
        if loss.kind == "probs":
            q3 = _cpu_input(loss.target3)
            if rows:
                cpu_losses.probs_rows_backward(
                    x3[:, :, 0],
                    q3[:, :, 0],
                    weight,
                    loss.smoothing,
                    grads,
                    scale,
                    out3[:, :, 0],
                    lowest,
                )
            else:
                cpu_losses.probs_columns_backward(
                    x3, q3, weight, loss.smoothing, grads, scale, strip, out3, lowest
                )
        else:
            index = _check_targets_cpu(loss)
            if loss.reduction == "mean":
                counted = index != loss.ignore_index
                total_weight = np.sum(weight[index[counted]], dtype=np.float64)
                with np.errstate(divide="ignore"):  # all ignored: every row is 0
                    scale = np.float64(scale) / total_weight
            args = (weight, loss.ignore_index, loss.smoothing, grads, scale)
            if rows:
                cpu_losses.index_rows_backward(
                    x3[:, :, 0], index[:, 0], *args, out3[:, :, 0], lowest
                )
            else:
                cpu_losses.index_columns_backward(x3, index, *args, strip, out3, lowest)
