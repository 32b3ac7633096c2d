"""CPU sigmoid and logsigmoid over a flat array, and the one-hot of the
argmax along a dim (gumbel_softmax's hard sample).

Both activations read e = exp(-|x|), which never overflows: sigmoid is
1 / (1 + e) for x >= 0 and e / (1 + e) below, logsigmoid is
min(x, 0) - log1p(e). The exp is ``simd_exp``'s (the loop vectorises); the
select keeps it branch-free.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from softkern._index import first_argmax as _first_argmax
from softkern.cpu.softmax import as_acc, exp

first_argmax = njit(inline="always", cache=True)(_first_argmax)


@njit(parallel=True, cache=True)
def sigmoid(x, out, lowest):
    for i in prange(x.size):
        v = as_acc(x[i], lowest)
        e = exp(-abs(v))
        s = as_acc(1, lowest) / (as_acc(1, lowest) + e)
        out[i] = s if v >= 0 else e * s


@njit(parallel=True, cache=True)
def logsigmoid(x, out, lowest):
    for i in prange(x.size):
        v = as_acc(x[i], lowest)
        out[i] = min(v, as_acc(0, lowest)) - np.log1p(exp(-abs(v)))


@njit(parallel=True, cache=True)
def one_hot_max(y, out):
    """out[o, :, c] = the one-hot of the first index of the max of
    y[o, :, c] (NaN counts as the max, as torch.argmax)."""
    outer, n, inner = y.shape
    for o in prange(outer):
        for c in range(inner):
            best = first_argmax(y, o, c)
            for k in range(n):
                out[o, k, c] = 1 if k == best else 0
