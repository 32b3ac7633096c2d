"""CPU sigmoid and logsigmoid over a flat array, and the one-hot of the
argmax along a dim (gumbel_softmax's hard sample).

Both activations read e = exp(-|x|), which never overflows: sigmoid is
1 / (1 + e) for x >= 0 and e / (1 + e) below, logsigmoid is
min(x, 0) - log1p(e). The exp (``exp_nonpositive``: -|x| <= 0, 23%
faster than the general one) and the log1p (of e in [0, 1]) are
``simd_exp``'s, so the loops vectorise (a C library log1p per element ran
logsigmoid 13x slower than PyTorch); the select keeps them branch-free.
"""

from __future__ import annotations

from numba import njit, prange

from softkern._index import first_argmax as _first_argmax
from softkern.cpu import parallel_kernel
from softkern.cpu.simd_exp import exp_nonpositive
from softkern.cpu.softmax import as_acc, log1p_unit

first_argmax = njit(inline="always", cache=True)(_first_argmax)
# Parallel work items of an elementwise kernel: contiguous spans, so each
# inner loop vectorises; enough of them for any core count.
SPANS = 256


@njit(inline="always", cache=True)
def sigmoid_span(x, out, first, last, lowest):
    # Slices indexed from 0: Numba sees no negative index, so no wraparound
    # check keeps the loop from vectorising.
    xs, outs = x[first:last], out[first:last]
    for i in range(xs.size):
        v = as_acc(xs[i], lowest)
        e = exp_nonpositive(-abs(v))
        s = as_acc(1, lowest) / (as_acc(1, lowest) + e)
        outs[i] = s if v >= 0 else e * s


@njit(inline="always", cache=True)
def logsigmoid_span(x, out, first, last, lowest):
    xs, outs = x[first:last], out[first:last]
    for i in range(xs.size):
        v = as_acc(xs[i], lowest)
        outs[i] = min(v, as_acc(0, lowest)) - log1p_unit(exp_nonpositive(-abs(v)))


@parallel_kernel()
def sigmoid(x, out, lowest, parallel):
    if not parallel:
        sigmoid_span(x, out, 0, x.size, lowest)
        return
    for c in prange(SPANS):
        sigmoid_span(x, out, c * x.size // SPANS, (c + 1) * x.size // SPANS, lowest)


@parallel_kernel()
def logsigmoid(x, out, lowest, parallel):
    if not parallel:
        logsigmoid_span(x, out, 0, x.size, lowest)
        return
    for c in prange(SPANS):
        first, last = c * x.size // SPANS, (c + 1) * x.size // SPANS
        logsigmoid_span(x, out, first, last, lowest)


@njit(inline="always", cache=True)
def one_hot_slab(y, out, o):
    n, inner = y.shape[1], y.shape[2]
    for c in range(inner):
        best = first_argmax(y, o, c)
        for k in range(n):
            out[o, k, c] = 1 if k == best else 0


@parallel_kernel()
def one_hot_max(y, out, parallel):
    """out[o, :, c] = the one-hot of the first index of the max of
    y[o, :, c] (NaN counts as the max, as torch.argmax)."""
    if not parallel:
        for o in range(y.shape[0]):
            one_hot_slab(y, out, o)
        return
    for o in prange(y.shape[0]):
        one_hot_slab(y, out, o)
