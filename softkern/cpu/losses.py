"""CPU cross_entropy (forward and backward) and nll_loss.

cross_entropy never stores the log-probabilities. The input is viewed as
(outer, C, inner) around the class dim. Rows regime (inner == 1): rows in
parallel; each row in tiles of ``TILE`` elements, two sweeps per tile that
stay in L1: the max (``llvm.maxnum``), then the sum of exp(x - max) in
float64, kept apart from the max's own 1 (``tile_stats``); the tiles' (max,
rest) pairs merge online, so the row is read from memory once. The loss
follows as (max - x_t) + log1p(rest), the target's logit read once. Label
smoothing and probability targets add one more sweep over the row for
sum_c u_c (max - x_c) (u = the weighted target distribution): written against
the max, every term is >= 0, so nothing cancels. Columns regime (inner > 1,
(N, C, d1..dK) inputs): strips of neighbouring positions whose C rows fit in
cache, the same sweeps top to bottom, as the softmax columns regime.

The backward pass is one more sweep per row: p_j * a - b * w_j, with a and b
per row (weights, smoothing and the reduction's scale folded in), minus the
target's one-hot term.

Per-position losses and weights come back in float64 arrays of the batch's
size (O(N) memory); ops/losses.py reduces them. Targets were checked before
the kernels run (``ops.losses``), so the kernels index with them freely.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from softkern.cpu.fma import maxnum
from softkern.cpu.softmax import (
    FASTMATH,
    ROW_CHUNKS,
    as_acc,
    exp,
    strip_max,
    strip_of,
)

# A long row is read in tiles of this many elements: each tile's two sweeps
# (max, then exponentials) hit L1, so the row is read from memory once; the
# tiles' statistics merge as the GPU threads' do. (Measured on (512, 65536)
# float32: three whole-row sweeps of 256 KiB rows fell out of L2.)
TILE = 4096


@njit(inline="always", cache=True)
def tile_stats(x, r, j0, j1, lowest):
    """(max, rest) of x[r, j0:j1]: rest = the sum of exp(x - max) less 1, in
    float64, summed without the elements equal to the max (each adds exactly
    1): a confident prediction's loss is log(1 + rest) with rest tiny, which
    1 + rest would round away even in float64."""
    # A slice indexed from 0: indices Numba can see are never negative, so
    # no wraparound check keeps the loops from vectorising.
    xr = x[r, j0:j1]
    top = lowest
    for j in range(xr.shape[0]):
        top = maxnum(top, as_acc(xr[j], lowest))
    rest = 0.0
    ties = 0
    for j in range(xr.shape[0]):
        v = as_acc(xr[j], lowest)
        hit = v == top
        rest += 0.0 if hit else exp(v - top)
        ties += hit
    return top, rest + (ties - 1)


@njit(inline="always", cache=True)
def merge_stats(top, rest, m, r):
    """(max, rest) of two parts from each part's: the part with the smaller
    max is rescaled by exp(its max - the max) (rest + 1 is its whole sum);
    equal finite maxima each counted their max as their own 1, so one 1
    comes back. A part of -inf (or NaN only) adds (r + 1) * 0: 0, or NaN."""
    if m > top:
        return m, (rest + 1.0) * np.exp(np.float64(top) - m) + r
    if m == top and m != -np.inf:
        return top, rest + r + 1.0
    if m == -np.inf:
        return top, rest + (r + 1.0) * 0.0
    return top, rest + (r + 1.0) * np.exp(np.float64(m) - top)


@njit(inline="always", cache=True)
def row_stats(x, r, lowest):
    """(max, rest) of row r, tile by tile."""
    n = x.shape[1]
    top, rest = tile_stats(x, r, 0, min(n, TILE), lowest)
    for j0 in range(TILE, n, TILE):
        m, part = tile_stats(x, r, j0, min(n, j0 + TILE), lowest)
        top, rest = merge_stats(top, rest, m, part)
    return top, rest


@njit(inline="always", cache=True)
def exp_sum(top, rest):
    """The sum of exp(x - top), 1 + rest; NaN when the max is +inf."""
    return np.nan if top == np.inf else 1.0 + rest


@njit(inline="always", cache=True)
def log_sum(top, rest):
    """log(sum of exp(x - top)) = log1p(rest); NaN when the max is +inf
    (PyTorch's log_softmax of such a slice is NaN throughout)."""
    return np.nan if top == np.inf else np.log1p(rest)


@njit(inline="always", cache=True)
def total_of(weight):
    """The sum of the class weights, in float64."""
    total = 0.0
    for c in range(weight.size):
        total += weight[c]
    return total


@njit(inline="always", cache=True)
def smoothed(q, smoothing, n):
    """A class probability after label smoothing: q (1 - eps) + eps / C."""
    return q * (1.0 - smoothing) + smoothing / n


@njit(inline="always", cache=True)
def grad_of(grads, i):
    """The upstream gradient of position i: one per position ("none") or
    one for all (a 1-element array)."""
    return grads[i] if grads.size > 1 else grads[0]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def index_rows(x, target, weight, ignore_index, smoothing, losses, weights, lowest):
    """Loss of each row with a class-index target into losses[r] and the
    target's weight into weights[r] (both 0 for an ignored row)."""
    count, n = x.shape
    weight_sum = total_of(weight)
    chunks = min(count, ROW_CHUNKS)
    for chunk in prange(chunks):
        for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
            t = target[r]
            if t == ignore_index:
                losses[r] = 0.0
                weights[r] = 0.0
                continue
            top, rest = row_stats(x, r, lowest)
            shift = log_sum(top, rest)
            w_t = np.float64(weight[t])
            loss = w_t * ((top - as_acc(x[r, t], lowest)) + shift)
            if smoothing > 0:
                spread = 0.0
                for j in range(n):
                    spread += weight[j] * (top - as_acc(x[r, j], lowest))
                uniform = weight_sum * shift + spread
                loss = (1.0 - smoothing) * loss + smoothing / n * uniform
            losses[r] = loss
            weights[r] = w_t


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def probs_rows(x, q, weight, smoothing, losses, lowest):
    """Loss of each row with a class-probability target row q[r]:
    sum_j u_j (lse - x_j), u_j = weight[j] * smoothed(q[r, j])."""
    count, n = x.shape
    for r in prange(count):
        top, rest = row_stats(x, r, lowest)
        shift = log_sum(top, rest)
        mass = 0.0
        spread = 0.0
        for j in range(n):
            u = weight[j] * smoothed(np.float64(q[r, j]), smoothing, n)
            mass += u
            spread += u * (top - as_acc(x[r, j], lowest))
        losses[r] = mass * shift + spread


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def index_rows_backward(
    x, target, weight, ignore_index, smoothing, grads, scale, out, lowest
):
    """d loss / d x of each row: g (p_j ((1 - eps) w_t + eps/C sum w)
    - eps/C w_j - (1 - eps) w_t [j == t]), g = grads[r] * scale."""
    count, n = x.shape
    weight_sum = total_of(weight)
    chunks = min(count, ROW_CHUNKS)
    for chunk in prange(chunks):
        for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
            t = target[r]
            if t == ignore_index:
                for j in range(n):
                    out[r, j] = 0
                continue
            g = grad_of(grads, r) * scale
            top, rest = row_stats(x, r, lowest)
            total = exp_sum(top, rest)
            w_t = np.float64(weight[t])
            a = as_acc(
                g * ((1.0 - smoothing) * w_t + smoothing / n * weight_sum) / total,
                lowest,
            )
            if smoothing > 0:
                b = as_acc(g * smoothing / n, lowest)
                for j in range(n):
                    out[r, j] = exp(as_acc(x[r, j], lowest) - top) * a - b * weight[j]
            else:
                for j in range(n):
                    out[r, j] = exp(as_acc(x[r, j], lowest) - top) * a
            out[r, t] -= as_acc(g * (1.0 - smoothing) * w_t, lowest)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def probs_rows_backward(x, q, weight, smoothing, grads, scale, out, lowest):
    """d loss / d x of each row: g (p_j sum_c u_c - u_j)."""
    count, n = x.shape
    for r in prange(count):
        g = grad_of(grads, r) * scale
        top, rest = row_stats(x, r, lowest)
        total = exp_sum(top, rest)
        mass = 0.0
        for j in range(n):
            mass += weight[j] * smoothed(np.float64(q[r, j]), smoothing, n)
        a = as_acc(g * mass / total, lowest)
        for j in range(n):
            u = as_acc(
                g * weight[j] * smoothed(np.float64(q[r, j]), smoothing, n), lowest
            )
            out[r, j] = exp(as_acc(x[r, j], lowest) - top) * a - u


@njit(inline="always", cache=True)
def strip_stats(x, o, c0, width, lowest):
    """Column maxima of the strip and each column's rest (the sum of
    exp(x - max) less 1, kept apart from the max as in ``tile_stats``)."""
    top = strip_max(x, o, c0, width, lowest)
    rest = np.zeros(width, dtype=np.float64)
    ties = np.zeros(width, dtype=np.int64)
    for i in range(x.shape[1]):
        xr = x[o, i, c0 : c0 + width]
        for c in range(width):
            v = as_acc(xr[c], lowest)
            hit = v == top[c]
            rest[c] += 0.0 if hit else exp(v - top[c])
            ties[c] += hit
    for c in range(width):
        rest[c] += ties[c] - 1
    return top, rest


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def index_columns(
    x, target, weight, ignore_index, smoothing, strip, losses, weights, lowest
):
    """``index_rows`` for (outer, C, inner) inputs and (outer, inner) targets."""
    outer, n, inner = x.shape
    weight_sum = total_of(weight)
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
        o, c0, width = strip_of(item, strips, strip, inner)
        top, rest = strip_stats(x, o, c0, width, lowest)
        spread = np.zeros(width, dtype=np.float64)
        if smoothing > 0:
            for i in range(n):
                xr = x[o, i, c0 : c0 + width]
                for c in range(width):
                    spread[c] += weight[i] * (top[c] - as_acc(xr[c], lowest))
        for c in range(width):
            t = target[o, c0 + c]
            if t == ignore_index:
                losses[o, c0 + c] = 0.0
                weights[o, c0 + c] = 0.0
                continue
            w_t = np.float64(weight[t])
            shift = log_sum(top[c], rest[c])
            loss = w_t * ((top[c] - as_acc(x[o, t, c0 + c], lowest)) + shift)
            if smoothing > 0:
                uniform = weight_sum * shift + spread[c]
                loss = (1.0 - smoothing) * loss + smoothing / n * uniform
            losses[o, c0 + c] = loss
            weights[o, c0 + c] = w_t


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def probs_columns(x, q, weight, smoothing, strip, losses, lowest):
    """``probs_rows`` for (outer, C, inner) inputs and targets."""
    outer, n, inner = x.shape
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
        o, c0, width = strip_of(item, strips, strip, inner)
        top, rest = strip_stats(x, o, c0, width, lowest)
        mass = np.zeros(width, dtype=np.float64)
        spread = np.zeros(width, dtype=np.float64)
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            qr = q[o, i, c0 : c0 + width]
            for c in range(width):
                u = weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
                mass[c] += u
                spread[c] += u * (top[c] - as_acc(xr[c], lowest))
        for c in range(width):
            losses[o, c0 + c] = mass[c] * log_sum(top[c], rest[c]) + spread[c]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def index_columns_backward(
    x, target, weight, ignore_index, smoothing, grads, scale, strip, out, lowest
):
    """``index_rows_backward`` for (outer, C, inner) inputs."""
    outer, n, inner = x.shape
    weight_sum = total_of(weight)
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
        o, c0, width = strip_of(item, strips, strip, inner)
        top, rest = strip_stats(x, o, c0, width, lowest)
        # Per column: the softmax's factor a, the uniform term's factor b and
        # the one-hot's size d at class t (an ignored column: all zero, and
        # t = -1 matches no class).
        a = np.zeros(width, dtype=top.dtype)
        b = np.zeros(width, dtype=top.dtype)
        d = np.zeros(width, dtype=top.dtype)
        t = np.full(width, -1, dtype=np.int64)
        for c in range(width):
            tc = target[o, c0 + c]
            if tc == ignore_index:
                continue
            g = grad_of(grads, o * inner + c0 + c) * scale
            w_t = np.float64(weight[tc])
            uniform = smoothing / n * weight_sum
            total = exp_sum(top[c], rest[c])
            a[c] = as_acc(g * ((1.0 - smoothing) * w_t + uniform) / total, lowest)
            b[c] = as_acc(g * smoothing / n, lowest)
            d[c] = as_acc(g * (1.0 - smoothing) * w_t, lowest)
            t[c] = tc
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            orow = out[o, i, c0 : c0 + width]
            w = weight[i]
            for c in range(width):
                hit = d[c] if t[c] == i else as_acc(0, lowest)
                orow[c] = exp(as_acc(xr[c], lowest) - top[c]) * a[c] - b[c] * w - hit


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def probs_columns_backward(x, q, weight, smoothing, grads, scale, strip, out, lowest):
    """``probs_rows_backward`` for (outer, C, inner) inputs."""
    outer, n, inner = x.shape
    strips = (inner + strip - 1) // strip
    for item in prange(outer * strips):
        o, c0, width = strip_of(item, strips, strip, inner)
        top, rest = strip_stats(x, o, c0, width, lowest)
        mass = np.zeros(width, dtype=np.float64)
        for i in range(n):
            qr = q[o, i, c0 : c0 + width]
            for c in range(width):
                mass[c] += weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
        a = np.zeros(width, dtype=top.dtype)
        g = np.zeros(width, dtype=np.float64)
        for c in range(width):
            g[c] = grad_of(grads, o * inner + c0 + c) * scale
            a[c] = as_acc(g[c] * mass[c] / exp_sum(top[c], rest[c]), lowest)
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            qr = q[o, i, c0 : c0 + width]
            orow = out[o, i, c0 : c0 + width]
            for c in range(width):
                u = g[c] * weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
                orow[c] = exp(as_acc(xr[c], lowest) - top[c]) * a[c] - as_acc(u, lowest)


@njit(parallel=True, cache=True)
def nll(x, target, weight, ignore_index, losses, weights):
    """-weight[t] * x[o, t, c] for every position (o, c) of (outer, C, inner)
    log-probabilities and (outer, inner) targets."""
    outer, _, inner = x.shape
    for o in prange(outer):
        for c in range(inner):
            t = target[o, c]
            if t == ignore_index:
                losses[o, c] = 0.0
                weights[o, c] = 0.0
            else:
                w_t = np.float64(weight[t])
                losses[o, c] = -w_t * x[o, t, c]
                weights[o, c] = w_t
