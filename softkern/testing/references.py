"""One table of reference implementations, shared by tests and benchmarks.

``EXACT`` computes in float64 (int64 for integers) and is what tests compare
against; ``BASELINE`` is what a user would otherwise call on the same array
in its own dtype, and is the reference row of every benchmark group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _wide(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.int64 if x.dtype.kind in "iub" else np.float64)


def _axis(dim):
    return None if dim == () else dim


EXACT: dict[str, Callable] = {
    "sum": lambda x, dim=None, keepdim=False: np.sum(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "amax": lambda x, dim=None, keepdim=False: np.max(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "amin": lambda x, dim=None, keepdim=False: np.min(
        _wide(x), axis=_axis(dim), keepdims=keepdim
    ),
    "dot": lambda x, y: np.dot(_wide(x), _wide(y)),
}

BASELINE: dict[str, Callable] = {
    "sum": np.sum,
    "amax": np.max,
    "amin": np.min,
    "dot": np.dot,
}


def numpy_softmax(x, dim: int) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) over `dim`, in x's own dtype: the
    formula a NumPy user writes (one temporary, updated in place)."""
    x = np.asarray(x)
    e = np.subtract(x, np.max(x, axis=dim, keepdims=True))
    np.exp(e, out=e)
    e /= np.sum(e, axis=dim, keepdims=True)
    return e


def numpy_log_softmax(x, dim: int) -> np.ndarray:
    """(x - max) - log(sum(exp(x - max))) over `dim`, in x's own dtype."""
    x = np.asarray(x)
    shifted = np.subtract(x, np.max(x, axis=dim, keepdims=True))
    shifted -= np.log(np.sum(np.exp(shifted), axis=dim, keepdims=True))
    return shifted


EXACT["softmax"] = lambda x, dim: numpy_softmax(_wide(x).astype(np.float64), dim)
EXACT["log_softmax"] = lambda x, dim: numpy_log_softmax(
    _wide(x).astype(np.float64), dim
)

try:
    from scipy import special as _special
except ImportError:  # scipy is a test extra: fall back to the same formulas
    BASELINE["softmax"] = numpy_softmax
    BASELINE["log_softmax"] = numpy_log_softmax
else:
    BASELINE["softmax"] = lambda x, dim: _special.softmax(x, axis=dim)
    BASELINE["log_softmax"] = lambda x, dim: _special.log_softmax(x, axis=dim)


# --- losses (float64, PyTorch's semantics) --------------------------------------


def _loss_operands(input, target, weight, prob_ok=True):
    """input as float64 with the class dim last, target (int64 or float64,
    class dim last for probabilities), weight, and whether target holds
    probabilities."""
    x = np.moveaxis(_wide(input).astype(np.float64), min(1, np.ndim(input) - 1), -1)
    t = np.asarray(target)
    prob = prob_ok and t.dtype.kind == "f" and t.shape == np.shape(input)
    if prob:
        t = np.moveaxis(t.astype(np.float64), min(1, t.ndim - 1), -1)
    else:
        t = t.astype(np.int64)
    c = x.shape[-1]
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    return x, t, w, prob, c


def _index_rows(x, t, w, ignore_index):
    """Ignored mask, safe targets and the target's weight per position."""
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= x.shape[-1]))
    if bad.any():
        value = t[bad].flat[0]
        raise IndexError(f"target {value} is out of bounds for {x.shape[-1]} classes")
    safe = np.where(ignored, 0, t)
    return ignored, safe, np.where(ignored, 0.0, w[safe])


def _reduce_loss(loss, reduction, denominator):
    if reduction == "none":
        return loss
    with np.errstate(invalid="ignore", divide="ignore"):
        total = loss.sum()
        return total if reduction == "sum" else np.float64(total / denominator)


def _index_loss(logp, t, w, ignore_index, reduction, eps, extra=0.0):
    """nll of log-probabilities, smoothed; `extra` adds a loss per position
    (the z-loss) to the counted ones."""
    ignored, safe, wt = _index_rows(logp, t, w, ignore_index)
    picked = np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore"):
        loss = -(1 - eps) * wt * picked
        if eps > 0:  # as torch: no smoothing term at all when eps == 0
            loss -= eps / logp.shape[-1] * (w * logp).sum(-1)
        loss = loss + extra
    return _reduce_loss(np.where(ignored, 0.0, loss), reduction, wt.sum())


def _capped(x, softcap):
    """Logit soft-capping, softcap * tanh(x / softcap); x for None."""
    return x if softcap is None else softcap * np.tanh(x / softcap)


def _lse(x):
    """log(sum(exp(x))) over the last axis, as the loss's z-loss sees it."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = np.max(x, -1, keepdims=True)
        safe = np.where(np.isfinite(top), top, 0.0)
        return (np.log(np.exp(x - safe).sum(-1, keepdims=True)) + safe)[..., 0]


def numpy_cross_entropy(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=None,
    lse_square_scale=0.0,
):
    """torch.nn.functional.cross_entropy in float64: class dim 1 (0 for 1-D
    input), index or (same shape, float) probability targets; `softcap`
    caps the logits first, `lse_square_scale` adds the z-loss scale * lse**2
    per counted position."""
    x, t, w, prob, c = _loss_operands(input, target, weight)
    x = _capped(x, softcap)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as torch
        logp = EXACT["log_softmax"](x, -1)
        extra = lse_square_scale * _lse(x) ** 2 if lse_square_scale else 0.0
    eps = float(label_smoothing)
    if not prob:
        return _index_loss(logp, t, w, ignore_index, reduction, eps, extra)
    q = t * (1 - eps) + eps / c
    with np.errstate(invalid="ignore"):
        loss = -(w * q * logp).sum(-1) + extra
    return _reduce_loss(loss, reduction, loss.size)


def numpy_nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """torch.nn.functional.nll_loss in float64 (input: log-probabilities)."""
    x, t, w, _, _ = _loss_operands(input, target, weight, prob_ok=False)
    return _index_loss(x, t, w, ignore_index, reduction, 0.0)


def numpy_cross_entropy_backward(
    input,
    target,
    grad_output=1.0,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=None,
    lse_square_scale=0.0,
):
    """d cross_entropy / d input in float64, shape of input."""
    x, t, w, prob, c = _loss_operands(input, target, weight)
    raw, x = x, _capped(x, softcap)
    with np.errstate(invalid="ignore"):
        p = EXACT["softmax"](x, -1)
        zslope = 2 * lse_square_scale * _lse(x) if lse_square_scale else 0.0
    eps = float(label_smoothing)
    g = np.asarray(grad_output, np.float64)
    if prob:
        q = t * (1 - eps) + eps / c
        grad = p * ((w * q).sum(-1) + zslope)[..., None] - w * q
        denominator, ignored = q[..., 0].size, np.zeros(q.shape[:-1], bool)
    else:
        ignored, safe, wt = _index_rows(x, t, w, ignore_index)
        a = (1 - eps) * wt + eps / c * w.sum() + zslope
        onehot = np.arange(c) == safe[..., None]
        grad = p * a[..., None] - (1 - eps) * wt[..., None] * onehot - eps / c * w
        denominator = wt.sum()
    if softcap is not None:
        with np.errstate(over="ignore"):  # cosh overflows: a slope of 0
            grad = grad / np.cosh(raw / softcap) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "mean":
            g = g / denominator
        grad = grad * (g if reduction != "none" else g[..., None])
    grad[ignored] = 0.0
    return np.moveaxis(grad, -1, min(1, np.ndim(input) - 1))


def numpy_sigmoid(x) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64, without overflow warnings."""
    x = _wide(x).astype(np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def numpy_logsigmoid(x) -> np.ndarray:
    """min(x, 0) - log1p(exp(-|x|)) in float64."""
    x = _wide(x).astype(np.float64)
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


EXACT["cross_entropy"] = numpy_cross_entropy
EXACT["nll_loss"] = numpy_nll_loss
EXACT["cross_entropy_backward"] = numpy_cross_entropy_backward
EXACT["sigmoid"] = numpy_sigmoid
EXACT["logsigmoid"] = numpy_logsigmoid
