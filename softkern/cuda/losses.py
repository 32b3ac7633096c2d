"""GPU cross_entropy (forward and backward) and nll_loss.

The input is an (outer, C, inner) view around the class dim; the GPU regimes
are ``softkern._launch.softmax_plan``'s, with one difference: no regime
caches the row, because the forward pass reads each element once anyway.

- ``warp`` / ``shared`` / ``stream`` (inner == 1): a group of threads owns a
  row (a warp for rows of at most 1 KiB, the whole block otherwise); member r
  reads elements r, r + group, ... and keeps an online max and the sum of
  exponentials less the max's own 1 (``rest_update``), which the group
  merges (``group_rest_stats``).
- ``columns`` (inner > 1): tiles of 32 positions by block / 32 threads along
  C, so a warp reads 32 neighbouring addresses of one class row.

The forward pass reads x once. The row's member 0 reads the target's logit
itself (one load per row) and computes the loss. Label smoothing and
probability targets also fold u_c = the weighted target distribution:
mass = sum u_c and spread = sum u_c (pivot - x_c), the pivot being the
slice's first element (so near-equal logits do not cancel against a large
lse): loss = (1 - eps) w_t (lse - x_t) + eps / C (mass (lse - pivot) +
spread) for class indices, mass (lse - pivot) + spread for probabilities,
each lse - v computed as (max - v) + log1p(rest).

For reduction "sum"/"mean" no per-row loss is stored: each owner thread adds
its rows' losses and weights, the block folds them into one partial per
block, and ``finish_kernel`` (one block) folds the partials into the 0-d
result on the device. A target outside [0, C) is never used as an index:
its position is recorded in `bad` (the smallest such, by an atomic min, so
the host raises after the launch naming the same target as the CPU).

The backward pass reads x twice (statistics, then the gradient written as
p_j a - b w_j minus the one-hot term), like the softmax stream regime.

- ``split`` (at most SPLIT_MAX_ROWS rows of many classes): a block per
  segment of a row folds the segment's (max, rest, mass, spread)
  (``split_stats_kernel``), one block per row merges them (``rest_merge``,
  then ``group_rest_stats``) and computes the row's loss
  (``split_forward_kernel``: two launches instead of one) or the merged
  statistics that a grid-stride pass turns into the gradient
  (``split_merge_kernel``, ``split_backward_kernel``). Each row's loss and
  gradient come from the same formulas (``_slice_loss``, ``_gradient``) as
  the other regimes'; only the statistics are folded in another order.

softcap (``cap``, 0 for none) caps each logit as it is read, cap tanh(x /
cap), and multiplies each gradient element by the slope of the capping;
the z-loss (``zscale``) adds zscale lse**2 to each counted slice's loss and
2 zscale lse to the factor on p_j (``cap_functions``; both scalars are
uniform over the launch, so their branches never diverge).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from numba import cuda, int64
from numba.np.numpy_support import from_dtype

from softkern._dtypes import dtype_named
from softkern._launch import WARP, softmax_acc_dtype
from softkern.cuda.convert import kernel_dtype, loader
from softkern.cuda.reduce import group_reducer
from softkern.cuda.softmax import (
    _group_layout,
    _types,
    bounded_kernel,
    group_broadcaster,
    tile_column,
)

KINDS = ("index", "probs")
# finish_kernel's modes
SUM, MEAN, WEIGHT, MEAN_OR_NAN = 0, 1, 2, 3


@functools.cache
def _slices(regime: str, block: int):
    """Device function: (o, c, valid, first, step) of the slice a thread
    works on in work item `item`, and which of its elements it reads: rows
    regimes give o = row, c = 0; columns give a position of a 32-wide tile."""
    group, _ = _group_layout(regime, block)
    rows_per_block = block // group
    lanes = block // WARP

    if regime == "columns":

        @cuda.jit(device=True, inline=True)
        def column_slice(item, outer, inner):
            tid = cuda.threadIdx.x
            tiles = (inner + WARP - 1) // WARP
            o, c = tile_column(item, tiles, tid % WARP)
            return o, c, c < inner, tid // WARP, lanes

        return column_slice

    @cuda.jit(device=True, inline=True)
    def row_slice(item, outer, inner):
        tid = cuda.threadIdx.x
        o = item * rows_per_block + tid // group
        return o, int64(0), o < outer, tid % group, group

    return row_slice


@functools.cache
def rest_update(dtype):
    """Device function folding element v into a running max m and r, the
    sum of exp(x - m) over the elements other than the max itself (the sum
    of exponentials is 1 + r). A confident prediction's loss is
    log(1 + r) with r tiny: kept apart, r stays exact to its own rounding,
    where a float32 1 + r would round r away (a loss of 1e-3 to 1e-4
    relative error). Start from (-inf, -1): no elements, a sum of 0.
    -inf adds nothing; NaN makes r NaN (both tests fail).
    """
    one = np.dtype(dtype).type(1)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def update(m, r, v):
        if v > m:
            return v, (r + one) * math.exp(m - v)
        if v != neg_inf:
            r += math.exp(v - m)
        return m, r

    return update


@functools.cache
def group_rest_stats(strategy: int, group: int, pitch: int, block: int, dtype):
    """Device function merging the members' (m, r) of ``rest_update`` into
    the group's (M, R), given to every member: M = max m; R = sum over the
    members of r (a member holding M) or (r + 1) exp(m - M) (the others),
    plus ties - 1 for the `ties` members that hold a finite M (each counted
    its max as its own 1). A member that saw no finite element adds
    (r + 1) * 0: 0, or NaN if it saw a NaN, which then reaches the slice.

    Launch config: as ``group_reducer`` and ``group_broadcaster``.
    """
    fold_max = group_reducer("amax", strategy, group, pitch, block, dtype)
    fold_sum = group_reducer("sum", strategy, group, pitch, block, dtype)
    broadcast = group_broadcaster(group, pitch, block, dtype)
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def merge(m, r):
        top = broadcast(fold_max(m))
        holds_top = m == top and m != neg_inf
        if holds_top:
            part = r
        elif m != neg_inf:
            part = (r + one) * math.exp(m - top)
        else:
            part = (r + one) * zero
        # Two folds, each exact in its own terms: ties is a small integer.
        ties = broadcast(fold_sum(one if holds_top else zero))
        return top, broadcast(fold_sum(part)) + (ties - one)

    return merge


@functools.cache
def log1p_of(dtype):
    """Device function: log(1 + r), -inf at r = -1 (Python's math.log1p,
    which the simulator runs, raises there); NaN stays NaN."""
    minus_one = np.dtype(dtype).type(-1)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def safe_log1p(r):
        return neg_inf if r == minus_one else math.log1p(r)

    return safe_log1p


@functools.cache
def cap_functions(dtype):
    """Device functions of logit soft-capping in `dtype` (the compute type):
    ``capped(v, cap)`` = cap tanh(v / cap), v itself for cap 0; and
    ``slope(v, cap)``, its derivative 1 - tanh(v / cap)**2, written
    4e / (1 + e)**2 with e = exp(-2 |v / cap|) (no cancellation where tanh
    is near 1, no overflow), 1 for cap 0."""
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)
    two = np.dtype(dtype).type(2)
    four = np.dtype(dtype).type(4)

    @cuda.jit(device=True, inline=True)
    def capped(v, cap):
        return v if cap == zero else cap * math.tanh(v / cap)

    @cuda.jit(device=True, inline=True)
    def slope(v, cap):
        if cap == zero:
            return one
        e = math.exp(-two * abs(v / cap))
        return four * e / ((one + e) * (one + e))

    return capped, slope


@functools.cache
def _target_terms(kind: str, dtype):
    """Device functions reading the target side of a slice, per kind of
    target: ``term(target, weight, smoothing, o, k, c, n)`` is u_k, the
    weighted (smoothed) target distribution at class k (the weight alone for
    class indices, where only smoothing needs it)."""
    acc, _, acc_dt = _types(dtype)
    one = acc_dt.type(1)

    if kind == "probs":

        @cuda.jit(device=True, inline=True)
        def probability_term(target, weight, smoothing, o, k, c, n):
            q = acc(target[o, k, c])
            return acc(weight[k]) * (q * (one - smoothing) + smoothing / acc(n))

        return probability_term

    @cuda.jit(device=True, inline=True)
    def index_term(target, weight, smoothing, o, k, c, n):
        return acc(weight[k])

    return index_term


@functools.cache
def pivot_of(dtype):
    """Device function: the pivot of slice (o, c), its first (capped)
    logit, 0 when that is not finite (the spread's reference point, module
    docstring)."""
    _, _, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)  # x's elements
    zero = acc_dt.type(0)
    capped, _ = cap_functions(acc_dt)

    @cuda.jit(device=True, inline=True)
    def pivot(x, cap, o, c):
        v = capped(load(x[o, 0, c]), cap)
        return v if math.isfinite(v) else zero

    return pivot


@functools.cache
def _stats(kind: str, regime: str, strategy: int, block: int, dtype):
    """Device function: one pass over the classes first, first + step, ...
    below `end` of slice (o, c) of x giving every member (top, rest): the
    max, and the sum of exp(x - max) less the max's own 1 (``rest_update``)
    of the (capped) logits, and member 0 the folded mass and spread of u
    (module docstring; 0 when neither smoothing nor probabilities need
    them) and the pivot. A whole slice has `end` = C; the split regime's
    segments a part of it.

    Launch config: as ``group_stats``; every thread of the block calls it.
    """
    _, _, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)  # x's elements
    zero = acc_dt.type(0)
    one = acc_dt.type(1)
    neg_inf = acc_dt.type(-np.inf)
    group, pitch = _group_layout(regime, block)
    merge = group_rest_stats(strategy, group, pitch, block, acc_dt)
    fold_sum = group_reducer("sum", strategy, group, pitch, block, acc_dt)
    update = rest_update(acc_dt)
    term = _target_terms(kind, dtype)
    capped, _ = cap_functions(acc_dt)
    pivot_at = pivot_of(dtype)
    probs = kind == "probs"

    @cuda.jit(device=True, inline=True)
    def slice_stats(x, target, weight, smoothing, cap, o, c, valid, first, step, end):
        n = x.shape[1]
        top = neg_inf
        rest = -one
        mass = zero
        spread = zero
        pivot = zero
        needs_mass = probs or smoothing > 0
        if valid and n > 0:
            pivot = pivot_at(x, cap, o, c)
        if valid:
            k = first
            while k < end:
                v = capped(load(x[o, k, c]), cap)
                top, rest = update(top, rest, v)
                if needs_mass:
                    u = term(target, weight, smoothing, o, k, c, n)
                    mass += u
                    spread += u * (pivot - v)
                k += step
        top, rest = merge(top, rest)
        if needs_mass:  # uniform over the block: the folds hold barriers
            mass = fold_sum(mass)
            spread = fold_sum(spread)
        return top, rest, mass, spread, pivot

    return slice_stats


@functools.cache
def _target_of(kind: str):
    """Device function: the class index of slice (o, c) as int64, -1 for an
    ignored or a bad one (a bad one's position o * inner + c also goes into
    bad[0] by atomic min: the first in the target's order, whichever thread
    finds it first). -1 for probability targets."""

    if kind == "probs":

        @cuda.jit(device=True, inline=True)
        def no_index(target, o, c, n, ignore_index, bad):
            return int64(-1)

        return no_index

    @cuda.jit(device=True, inline=True)
    def checked_index(target, o, c, n, ignore_index, bad):
        t = int64(target[o, c])
        if t == ignore_index:
            return int64(-1)
        if t < 0 or t >= n:
            # the first bad position in the target's order, as the CPU
            # reports it (a plain store from every thread would race)
            cuda.atomic.min(bad, 0, o * target.shape[1] + c)
            return int64(-1)
        return t

    return checked_index


@functools.cache
def _slice_loss(kind: str, dtype):
    """Device function: (loss, w_t) of slice (o, c) from its statistics
    (``_stats``, or the split regime's merge): the weighted, smoothed cross
    entropy plus the z-loss, and the weight it counts with in a mean (w_t
    of a class index, 0 when ignored or bad; 1 for probabilities). Each
    lse - v is (top - v) + log(1 + rest): exact for v = top. A +inf max
    makes the loss NaN, as PyTorch's log_softmax."""
    acc, _, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)  # x's elements
    zero = acc_dt.type(0)
    one = acc_dt.type(1)
    inf = acc_dt.type(np.inf)
    nan = acc_dt.type(np.nan)
    target_of = _target_of(kind)
    safe_log1p = log1p_of(acc_dt)
    capped, _ = cap_functions(acc_dt)
    probs = kind == "probs"

    @cuda.jit(device=True, inline=True)
    def slice_loss(
        x,
        target,
        weight,
        ignore_index,
        smoothing,
        cap,
        zscale,
        o,
        c,
        top,
        rest,
        mass,
        spread,
        pivot,
        bad,
    ):
        n = x.shape[1]
        log_sum = safe_log1p(rest) if top != inf else nan
        loss = zero
        w_t = one
        counted = probs
        if probs:
            loss = mass * ((top - pivot) + log_sum) + spread
        else:
            t = target_of(target, o, c, n, ignore_index, bad)
            w_t = zero
            if t >= 0:
                counted = True
                w_t = acc(weight[t])
                logit = capped(load(x[o, t, c]), cap)
                loss = w_t * ((top - logit) + log_sum)
                if smoothing > 0:
                    uniform = mass * ((top - pivot) + log_sum) + spread
                    loss = (one - smoothing) * loss + smoothing / acc(n) * uniform
        if zscale > 0 and counted:
            lse = top + log_sum
            loss += zscale * lse * lse
        return loss, w_t

    return slice_loss


@functools.cache
def forward_kernel(
    kind: str, regime: str, strategy: int, block: int, total: bool, dtype
):
    """cross_entropy of every slice into out[o, c] (reduction "none"), or,
    with `total`, folded into out[0, blockIdx] (losses) and out[1, blockIdx]
    (weights of the non-ignored targets; 1 per slice for probabilities).

    Arguments: x (outer, C, inner) of any real dtype; target (outer, inner)
    class indices of any integer dtype, or (outer, C, inner) probabilities;
    weight (C,); ignore_index; smoothing; cap (softcap, 0 for none) and
    zscale (the z-loss's scale) in the compute type; items (the plan's
    work items); out; bad (1,) int64, the first bad target's position.
    `dtype` is the output dtype (float16 computes in float32; partials are
    in the compute dtype).

    Launch config: ``SoftmaxPlan`` of (outer, C, inner) over dim 1:
    [grid, block].
    """
    _, out_type, acc_dt = _types(dtype)
    zero = acc_dt.type(0)
    slices = _slices(regime, block)
    stats = _stats(kind, regime, strategy, block, dtype)
    slice_loss = _slice_loss(kind, dtype)
    fold_block = group_reducer("sum", strategy, block, 1, block, acc_dt)

    @bounded_kernel(block)
    def cross_entropy_forward(
        x, target, weight, ignore_index, smoothing, cap, zscale, items, out, bad
    ):
        outer, n, inner = x.shape
        loss_sum = zero
        weight_sum = zero
        item = int64(cuda.blockIdx.x)
        while item < items:  # uniform over the block
            o, c, valid, first, step = slices(item, outer, inner)
            top, rest, mass, spread, pivot = stats(
                x, target, weight, smoothing, cap, o, c, valid, first, step, n
            )
            if valid and first == 0:
                loss, w_t = slice_loss(
                    x, target, weight, ignore_index, smoothing, cap, zscale,
                    o, c, top, rest, mass, spread, pivot, bad,
                )  # fmt: skip
                if total:
                    loss_sum += loss
                    weight_sum += w_t
                else:
                    out[o, c] = out_type(loss)
            item += cuda.gridDim.x
        if total:
            loss_sum = fold_block(loss_sum)
            weight_sum = fold_block(weight_sum)
            if cuda.threadIdx.x == 0:
                out[0, cuda.blockIdx.x] = loss_sum
                out[1, cuda.blockIdx.x] = weight_sum

    return cross_entropy_forward


@functools.cache
def _gradient(kind: str, dtype):
    """Device functions of the gradient of slice (o, c) with respect to its
    logits, g (p_k a - b u_k - g (1 - eps) w_t [k == t]) times the slope of
    the cap at x_k (``backward_kernel``'s docstring):

    - ``factors(x, target, weight, ignore_index, smoothing, zscale, o, c,
      top, rest, mass, g, bad)``: the slice's coefficients (t, live, a, b,
      hot, top) from its statistics: live is False for an ignored or bad
      target (gradient 0), hot the one-hot term g (1 - eps) w_t.
    - ``element(x, target, weight, smoothing, cap, o, k, c, coefficients)``:
      the gradient at class k.
    """
    acc, _, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)  # x's elements
    zero = acc_dt.type(0)
    one = acc_dt.type(1)
    two = acc_dt.type(2)
    inf = acc_dt.type(np.inf)
    nan = acc_dt.type(np.nan)
    target_of = _target_of(kind)
    term = _target_terms(kind, dtype)
    safe_log1p = log1p_of(acc_dt)
    capped, slope = cap_functions(acc_dt)
    probs = kind == "probs"

    @cuda.jit(device=True, inline=True)
    def factors(
        x,
        target,
        weight,
        ignore_index,
        smoothing,
        zscale,
        o,
        c,
        top,
        rest,
        mass,
        g,
        bad,
    ):
        n = x.shape[1]
        den = rest + one if top != inf else nan  # +inf: NaN, as PyTorch
        # d z-loss / d lse = 2 zscale lse, times p_j like the mass
        zslope = zero
        if zscale > 0:
            zslope = two * zscale * (top + safe_log1p(rest))
        t = int64(-1)
        a = zero
        b = zero
        hot = zero
        live = probs
        if probs:
            a = g * (mass + zslope) / den
            b = g
        else:
            t = target_of(target, o, c, n, ignore_index, bad)
            if t >= 0:
                live = True
                w_t = acc(weight[t])
                uniform = smoothing / acc(n) * mass if smoothing > 0 else zero
                a = g * ((one - smoothing) * w_t + uniform + zslope) / den
                b = g * smoothing / acc(n)
                hot = g * (one - smoothing) * w_t
        return t, live, a, b, hot, top

    @cuda.jit(device=True, inline=True)
    def element(x, target, weight, smoothing, cap, o, k, c, coefficients):
        t, live, a, b, hot, top = coefficients
        if not live:
            return zero  # an ignored target's slice
        v = load(x[o, k, c])
        grad = math.exp(capped(v, cap) - top) * a
        grad -= b * term(target, weight, smoothing, o, k, c, x.shape[1])
        if k == t:
            grad -= hot
        return grad * slope(v, cap)

    return factors, element


@functools.cache
def _upstream(dtype):
    """Device function: the gradient reaching slice i, grads[i] (grads[0]
    when it holds one value) * scale / denominator[0], in the compute
    type."""
    acc, _, _ = _types(dtype)

    @cuda.jit(device=True, inline=True)
    def upstream(grads, scale, denominator, i):
        g = acc(grads[i] if grads.size > 1 else grads[0])
        return g * acc(scale) / acc(denominator[0])

    return upstream


@functools.cache
def backward_kernel(kind: str, regime: str, strategy: int, block: int, dtype):
    """Gradient of cross_entropy with respect to x into out (outer, C,
    inner): g (p_j a' - eps/C w_j - (1 - eps) w_t [j == t]) for class indices
    (a' = (1 - eps) w_t + eps/C sum w), g (p_j mass - u_j) for probabilities,
    g = grads[i] (grads[0] when it has one element) * scale / denominator[0];
    0 for an ignored target; a z-loss adds 2 zscale lse to a' and mass, a
    cap multiplies by the slope of the capping at x_j. Arguments as
    ``forward_kernel`` plus grads, scale, denominator; out has x's shape
    and `dtype`.

    Launch config: ``SoftmaxPlan`` of (outer, C, inner) over dim 1:
    [grid, block].
    """
    _, out_type, acc_dt = _types(dtype)
    slices = _slices(regime, block)
    stats = _stats(kind, regime, strategy, block, dtype)
    factors, element = _gradient(kind, dtype)
    upstream = _upstream(dtype)
    group, pitch = _group_layout(regime, block)
    broadcast = group_broadcaster(group, pitch, block, acc_dt)
    probs = kind == "probs"

    @bounded_kernel(block)
    def cross_entropy_backward(
        x,
        target,
        weight,
        ignore_index,
        smoothing,
        cap,
        zscale,
        items,
        grads,
        scale,
        denominator,
        out,
        bad,
    ):
        outer, n, inner = x.shape
        item = int64(cuda.blockIdx.x)
        while item < items:  # uniform over the block
            o, c, valid, first, step = slices(item, outer, inner)
            top, rest, mass, _, _ = stats(
                x, target, weight, smoothing, cap, o, c, valid, first, step, n
            )
            if probs or smoothing > 0:  # uniform over the block
                mass = broadcast(mass)  # the fold left it in member 0 only
            if valid:
                g = upstream(grads, scale, denominator, o * inner + c)
                coefficients = factors(
                    x, target, weight, ignore_index, smoothing, zscale,
                    o, c, top, rest, mass, g, bad,
                )  # fmt: skip
                k = first
                while k < n:
                    grad = element(
                        x, target, weight, smoothing, cap, o, k, c, coefficients
                    )
                    out[o, k, c] = out_type(grad)
                    k += step
            item += cuda.gridDim.x

    return cross_entropy_backward


# --- few rows of many classes: the "split" regime -------------------------------

# the columns of the split regime's per-segment statistics
TOP, REST, MASS, SPREAD = 0, 1, 2, 3
SEGMENT_STATS = 4


@functools.cache
def rest_merge(dtype):
    """Device function merging the ``rest_update`` pair (m2, r2) of a run of
    elements into a running pair (m, r): the sum of exponentials of the
    union is (r + 1) exp(m - M) + (r2 + 1) exp(m2 - M) with M the larger max,
    and its rest that less the new max's own 1; equal finite maxes add
    both rests and the second max's 1. An empty run (-inf, -1) adds
    nothing, one that saw a NaN (r2 NaN) makes r NaN."""
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)
    neg_inf = np.dtype(dtype).type(-np.inf)

    @cuda.jit(device=True, inline=True)
    def merge(m, r, m2, r2):
        if m2 > m:
            # m = -inf: (r + 1) * 0, 0 or NaN, as group_rest_stats
            return m2, r2 + (r + one) * math.exp(m - m2)
        if m2 == m and m2 != neg_inf:
            return m, r + r2 + one
        if m2 != neg_inf:
            return m, r + (r2 + one) * math.exp(m2 - m)
        return m, r + (r2 + one) * zero

    return merge


@functools.cache
def split_stats_kernel(kind: str, strategy: int, block: int, dtype):
    """Stage 1 of the split regime: a block per segment of a row (one pass,
    ``_stats`` over the segment's classes) writing the segment's top, rest,
    mass and spread into stats[row, segment, TOP..SPREAD] (the pivot is the
    row's, so that spreads add across segments).

    Launch config: ``SoftmaxPlan`` "split": [plan.grid, plan.block], items
    = rows * segments walked grid-stride; x (rows, C, 1), target as
    ``forward_kernel``; stats (rows, segments, SEGMENT_STATS) of the
    compute type.
    """
    stats = _stats(kind, "split", strategy, block, dtype)

    @bounded_kernel(block)
    def split_loss_stats(x, target, weight, smoothing, cap, out):
        rows, n, _ = x.shape
        segments = out.shape[1]
        width = (n + segments - 1) // segments
        item = int64(cuda.blockIdx.x)
        while item < rows * segments:  # uniform over the block
            row = item // segments
            segment = item - row * segments
            lo = segment * width
            top, rest, mass, spread, _ = stats(
                x, target, weight, smoothing, cap, row, int64(0), True,
                lo + cuda.threadIdx.x, block, min(n, lo + width),
            )  # fmt: skip
            if cuda.threadIdx.x == 0:
                out[row, segment, TOP] = top
                out[row, segment, REST] = rest
                out[row, segment, MASS] = mass
                out[row, segment, SPREAD] = spread
            item += cuda.gridDim.x

    return split_loss_stats


@functools.cache
def _segment_merge(strategy: int, block: int, dtype):
    """Device function: a row's (top, rest, mass, spread) from its
    segments' in stats[row] (stage 1): each thread merges the segments
    s = tid, tid + block, ... (``rest_merge``), the block then its threads'
    pairs (``group_rest_stats``); every thread gets top and rest, thread 0
    the folded mass and spread.

    Launch config: every thread of the block calls it.
    """
    _, _, acc_dt = _types(dtype)
    one = acc_dt.type(1)
    neg_inf = acc_dt.type(-np.inf)
    zero = acc_dt.type(0)
    merge_pair = rest_merge(acc_dt)
    merge_block = group_rest_stats(strategy, block, 1, block, acc_dt)
    fold_sum = group_reducer("sum", strategy, block, 1, block, acc_dt)

    @cuda.jit(device=True, inline=True)
    def merge_segments(stats, row):
        top = neg_inf
        rest = -one
        mass = zero
        spread = zero
        s = cuda.threadIdx.x
        while s < stats.shape[1]:
            top, rest = merge_pair(top, rest, stats[row, s, TOP], stats[row, s, REST])
            mass += stats[row, s, MASS]
            spread += stats[row, s, SPREAD]
            s += block
        top, rest = merge_block(top, rest)
        return top, rest, fold_sum(mass), fold_sum(spread)

    return merge_segments


@functools.cache
def split_forward_kernel(kind: str, strategy: int, block: int, total: bool, dtype):
    """Stage 2 of the split regime's forward pass: a block per row merges
    its segments' statistics (``_segment_merge``) and thread 0 computes the
    row's loss (``_slice_loss``) into out[row, 0] (reduction "none"), or,
    with `total`, adds the block's rows into out[0, blockIdx] (losses) and
    out[1, blockIdx] (weights), as ``forward_kernel``.

    Launch config: [rows, plan.block] (at most SPLIT_MAX_ROWS blocks), rows
    walked grid-stride; stats from ``split_stats_kernel``; other arguments
    as ``forward_kernel``.
    """
    _, out_type, acc_dt = _types(dtype)
    zero = acc_dt.type(0)
    merge_segments = _segment_merge(strategy, block, dtype)
    slice_loss = _slice_loss(kind, dtype)
    pivot_at = pivot_of(dtype)

    @bounded_kernel(block)
    def split_loss(
        x, target, weight, ignore_index, smoothing, cap, zscale, stats, out, bad
    ):
        loss_sum = zero
        weight_sum = zero
        row = int64(cuda.blockIdx.x)
        while row < x.shape[0]:  # uniform over the block
            top, rest, mass, spread = merge_segments(stats, row)
            if cuda.threadIdx.x == 0:
                loss, w_t = slice_loss(
                    x, target, weight, ignore_index, smoothing, cap, zscale,
                    row, int64(0), top, rest, mass, spread,
                    pivot_at(x, cap, row, 0), bad,
                )  # fmt: skip
                if total:
                    loss_sum += loss
                    weight_sum += w_t
                else:
                    out[row, 0] = out_type(loss)
            row += cuda.gridDim.x
        if total and cuda.threadIdx.x == 0:
            out[0, cuda.blockIdx.x] = loss_sum
            out[1, cuda.blockIdx.x] = weight_sum

    return split_loss


@functools.cache
def split_merge_kernel(strategy: int, block: int, dtype):
    """Stage 2 of the split regime's backward pass: a block per row merges
    its segments' statistics (``_segment_merge``) into
    merged[row, TOP..SPREAD].

    Launch config: [rows, plan.block], rows walked grid-stride; stats from
    ``split_stats_kernel``; merged (rows, SEGMENT_STATS) of the compute
    type.
    """
    merge_segments = _segment_merge(strategy, block, dtype)

    @bounded_kernel(block)
    def split_loss_merge(stats, merged):
        row = int64(cuda.blockIdx.x)
        while row < stats.shape[0]:  # uniform over the block
            top, rest, mass, spread = merge_segments(stats, row)
            if cuda.threadIdx.x == 0:
                merged[row, TOP] = top
                merged[row, REST] = rest
                merged[row, MASS] = mass
                merged[row, SPREAD] = spread
            row += cuda.gridDim.x

    return split_loss_merge


@functools.cache
def split_backward_kernel(kind: str, block: int, dtype):
    """Stage 3 of the split regime's backward pass: the gradient, one
    thread per element of x (rows, C, 1), grid-stride, from its row's
    merged statistics (``split_merge_kernel``), as ``backward_kernel``
    writes it. Each thread derives its row's factors itself (a few loads
    that every thread of the row shares in cache).

    Launch config: [plan.grid, plan.block]; arguments as ``backward_kernel``
    with merged (rows, SEGMENT_STATS) in place of items.
    """
    _, out_type, _ = _types(dtype)
    factors, element = _gradient(kind, dtype)
    upstream = _upstream(dtype)

    @bounded_kernel(block)
    def split_loss_backward(
        x,
        target,
        weight,
        ignore_index,
        smoothing,
        cap,
        zscale,
        merged,
        grads,
        scale,
        denominator,
        out,
        bad,
    ):
        rows, n, _ = x.shape
        stride = int64(cuda.gridDim.x) * block
        i = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        while i < rows * n:
            row = i // n
            k = i - row * n
            top = merged[row, TOP]
            g = upstream(grads, scale, denominator, row)
            coefficients = factors(
                x, target, weight, ignore_index, smoothing, zscale,
                row, 0, top, merged[row, REST], merged[row, MASS], g, bad,
            )  # fmt: skip
            grad = element(x, target, weight, smoothing, cap, row, k, 0, coefficients)
            out[row, k, 0] = out_type(grad)
            i += stride

    return split_loss_backward


@functools.cache
def nll_kernel(strategy: int, block: int, total: bool, dtype):
    """nll_loss of every position (o, c): -weight[t] x[o, t, c], into
    out[o, c] or, with `total`, folded into out (2, grid) as
    ``forward_kernel``. A thread per position, grid-stride.

    Launch config: ``FullReducePlan`` of outer * inner positions.
    """
    acc, out_type, acc_dt = _types(dtype)
    load = loader(np.dtype(dtype), acc_dt)  # x's elements
    zero = acc_dt.type(0)
    target_of = _target_of("index")
    fold_block = group_reducer("sum", strategy, block, 1, block, acc_dt)

    @bounded_kernel(block)
    def nll_loss(x, target, weight, ignore_index, out, bad):
        outer, n, inner = x.shape
        loss_sum = zero
        weight_sum = zero
        i = int64(cuda.blockIdx.x) * block + cuda.threadIdx.x
        while i < outer * inner:
            o = i // inner
            c = i - o * inner
            t = target_of(target, o, c, n, ignore_index, bad)
            loss = zero
            w_t = zero
            if t >= 0:
                w_t = acc(weight[t])
                loss = -w_t * load(x[o, t, c])
            if total:
                loss_sum += loss
                weight_sum += w_t
            else:
                out[o, c] = out_type(loss)
            i += int64(cuda.gridDim.x) * block
        if total:  # uniform: every thread leaves the loop
            loss_sum = fold_block(loss_sum)
            weight_sum = fold_block(weight_sum)
            if cuda.threadIdx.x == 0:
                out[0, cuda.blockIdx.x] = loss_sum
                out[1, cuda.blockIdx.x] = weight_sum

    return nll_loss


@functools.cache
def finish_kernel(strategy: int, block: int, dtype):
    """One block folding partials (2, P) into out[0]: the loss sum (mode
    SUM); the loss sum over `count` (MEAN, count > 0) or over the weight sum
    (MEAN, count 0: all targets ignored gives 0 / 0 = NaN, as PyTorch); the
    same, NaN whenever the weight sum is 0 (MEAN_OR_NAN: smoothing and the
    z-loss, ``LossPlan.weightless_mean_is_nan``); or the weight sum
    (WEIGHT). `dtype` is out's dtype.

    Launch config: [1, block].
    """
    acc, out_type, acc_dt = _types(dtype)
    zero = acc_dt.type(0)
    nan = acc_dt.type(np.nan)
    fold = group_reducer("sum", strategy, block, 1, block, acc_dt)

    @bounded_kernel(block)
    def finish(partials, mode, count, out):
        tid = cuda.threadIdx.x
        loss = zero
        weight = zero
        i = tid
        while i < partials.shape[1]:
            loss += partials[0, i]
            weight += partials[1, i]
            i += block
        loss = fold(loss)
        weight = fold(weight)
        if tid == 0:
            if mode == SUM:
                out[0] = out_type(loss)
            elif mode == WEIGHT:
                out[0] = out_type(weight)
            elif count > 0:
                out[0] = out_type(loss / acc(count))
            elif mode == MEAN_OR_NAN and weight == zero:
                out[0] = out_type(nan)
            else:
                out[0] = out_type(loss / weight)

    return finish


# --- host launchers ----------------------------------------------------------


def forward_partials(plan) -> int:
    """Columns of the (2, P) partials a total's forward pass writes: a
    block's each, and in the split regime a merging block's (one per row)."""
    return plan.outer if plan.regime == "split" else plan.grid


def _split_stats(kind, x, target, weight, options, plan, strategy, stream, empty,
                 dtype):  # fmt: skip
    """Stage 1 of the split regime: the segments' statistics, in a scratch
    array from `empty`; `options` (smoothing, cap, zscale) in the compute
    type, as the launchers cast them."""
    smoothing, cap, _ = options
    stats = empty((plan.outer, plan.segments, SEGMENT_STATS), softmax_acc_dtype(dtype))
    split_stats_kernel(kind, strategy, plan.block, dtype)[
        plan.grid, plan.block, stream
    ](x, target, weight, smoothing, cap, stats)
    return stats


def launch_forward(
    kind,
    x,
    target,
    weight,
    ignore_index,
    smoothing,
    cap,
    zscale,
    out,
    total,
    plan,
    strategy,
    stream,
    bad,
    dtype,
    empty,
):
    """cross_entropy of x (outer, C, inner) of `dtype` elements (bfloat16:
    their bits) into out: losses (outer, inner) of `dtype`, or partials
    (2, ``forward_partials(plan)``) in the compute type when `total`. The
    split regime takes two launches and a scratch array from `empty`."""
    dtype = np.dtype(dtype)
    acc = softmax_acc_dtype(dtype).type
    options = (acc(smoothing), acc(cap), acc(zscale))
    if plan.regime == "split":
        stats = _split_stats(kind, x, target, weight, options, plan, strategy,
                             stream, empty, dtype)  # fmt: skip
        kernel = split_forward_kernel(kind, strategy, plan.block, total, dtype)
        kernel[plan.outer, plan.block, stream](
            x, target, weight, ignore_index, *options, stats, out, bad
        )
        return
    kernel = forward_kernel(kind, plan.regime, strategy, plan.block, total, dtype)
    kernel[plan.grid, plan.block, stream](
        x, target, weight, ignore_index, *options, plan.items, out, bad
    )


def launch_backward(
    kind,
    x,
    target,
    weight,
    ignore_index,
    smoothing,
    cap,
    zscale,
    grads,
    scale,
    denominator,
    out,
    plan,
    strategy,
    stream,
    bad,
    dtype,
    empty,
):
    """The gradient of cross_entropy into out, as ``launch_forward`` (the
    split regime: three launches)."""
    dtype = np.dtype(dtype)
    acc = softmax_acc_dtype(dtype).type
    options = (acc(smoothing), acc(cap), acc(zscale))
    upstream = (grads, acc(scale), denominator)
    if plan.regime == "split":
        stats = _split_stats(kind, x, target, weight, options, plan, strategy,
                             stream, empty, dtype)  # fmt: skip
        merged = empty((plan.outer, SEGMENT_STATS), stats.dtype)
        split_merge_kernel(strategy, plan.block, dtype)[plan.outer, plan.block, stream](
            stats, merged
        )
        split_backward_kernel(kind, plan.block, dtype)[plan.grid, plan.block, stream](
            x, target, weight, ignore_index, *options, merged, *upstream, out, bad
        )
        return
    kernel = backward_kernel(kind, plan.regime, strategy, plan.block, dtype)
    kernel[plan.grid, plan.block, stream](
        x, target, weight, ignore_index, *options, plan.items, *upstream, out, bad
    )


def launch_nll(
    x, target, weight, ignore_index, out, total, plan, strategy, stream, bad, dtype
):
    """nll_loss over (outer, C, inner); `plan` a ``FullReducePlan`` of the
    positions; out and `dtype` as ``launch_forward``."""
    kernel = nll_kernel(strategy, plan.block, total, np.dtype(dtype))
    kernel[plan.grid, plan.block, stream](x, target, weight, ignore_index, out, bad)


def launch_finish(partials, mode, count, out, block, strategy, stream, dtype):
    """Fold partials into out[0], a `dtype` element (bfloat16: its bits)."""
    kernel = finish_kernel(strategy, block, np.dtype(dtype))
    kernel[1, block, stream](partials, mode, int64(count), out)


# --- catalogue for compile checks -------------------------------------------


def ptx_cases(block: int = 256):
    """The loss kernels with the argument types they are launched with, as
    ``cuda.reduce.ptx_cases``: each regime of the forward and backward
    passes for both kinds of target in float32 and float64 (float16 and
    bfloat16, which compute in float32, in the stream regime), every
    strategy for the warp regime; nll_loss and the finishing fold."""
    idx = int64[:, :]
    flag = int64[::1]
    for name in ("float32", "float64", "float16", "bfloat16"):
        dtype = dtype_named(name)
        t = from_dtype(kernel_dtype(dtype))
        acc = from_dtype(softmax_acc_dtype(dtype))
        # float32 in every regime; float64 and the 16-bit floats (computed in
        # float32) where registers are tightest; each strategy once, in the
        # warp regime. A bfloat16 loss reads its probabilities in float32.
        regimes = ("warp", "stream", "columns") if name == "float32" else ("stream",)
        for regime, kind in itertools.product(regimes, KINDS):
            target = (
                idx if kind == "index" else (acc if name == "bfloat16" else t)[:, :, :]
            )
            # x, target, weight, ignore_index, smoothing, cap, zscale, items
            common = (t[:, :, :], target, acc[::1], int64, acc, acc, acc, int64)
            strategies = (0, 1, 2) if (regime, kind) == ("warp", "index") else (2,)
            for strategy, total in itertools.product(strategies, (False, True)):
                out = acc[:, ::1] if total else t[:, ::1]
                yield (
                    f"{regime}/cross_entropy/{kind}/{name}/r{strategy}"
                    + ("/total" if total else ""),
                    forward_kernel(kind, regime, strategy, block, total, dtype),
                    (*common, out, flag),
                    name,
                    strategy,
                )
            yield (
                f"{regime}/cross_entropy_backward/{kind}/{name}/r2",
                backward_kernel(kind, regime, 2, block, dtype),
                (*common, acc[::1], acc, acc[::1], t[:, :, ::1], flag),
                name,
                2,
            )
        for total in (False, True):
            out = acc[:, ::1] if total else t[:, ::1]
            yield (
                f"nll_loss/{name}" + ("/total" if total else ""),
                nll_kernel(2, block, total, dtype),
                (t[:, :, :], idx, acc[::1], int64, out, flag),
                name,
                2 if total else None,  # only the total folds
            )
        # the split regime: every kernel per kind, each strategy once in
        # float32 (where stage 1 and the merge fold)
        strategies = (0, 1, 2) if name == "float32" else (2,)
        stats, merged = acc[:, :, ::1], acc[:, ::1]
        for kind, strategy in itertools.product(KINDS, strategies):
            target = (
                idx if kind == "index" else (acc if name == "bfloat16" else t)[:, :, :]
            )
            # x, target, weight, ignore_index, smoothing, cap, zscale
            common = (t[:, :, :], target, acc[::1], int64, acc, acc, acc)
            yield (
                f"split/stats/{kind}/{name}/r{strategy}",
                split_stats_kernel(kind, strategy, block, dtype),
                (t[:, :, :], target, acc[::1], acc, acc, stats),
                name,
                strategy,
            )
            for total in (False, True):
                out = acc[:, ::1] if total else t[:, ::1]
                yield (
                    f"split/forward/{kind}/{name}/r{strategy}"
                    + ("/total" if total else ""),
                    split_forward_kernel(kind, strategy, block, total, dtype),
                    (*common, stats, out, flag),
                    name,
                    strategy,
                )
            if strategy == 2:
                upstream = (acc[::1], acc, acc[::1])
                yield (
                    f"split/backward/{kind}/{name}",
                    split_backward_kernel(kind, block, dtype),
                    (*common, merged, *upstream, t[:, :, ::1], flag),
                    name,
                    None,  # elementwise: no folds
                )
        for strategy in strategies:
            yield (
                f"split/merge/{name}/r{strategy}",
                split_merge_kernel(strategy, block, dtype),
                (stats, merged),
                name,
                strategy,
            )
        yield (
            f"finish/{name}",
            finish_kernel(2, block, dtype),
            (acc[:, ::1], int64, int64, t[::1]),
            name,
            2,
        )
