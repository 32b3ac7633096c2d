"""CPU cross_entropy (forward and backward) and nll_loss.

cross_entropy never stores the log-probabilities. The input is viewed as
(outer, C, inner) around the class dim. Rows regime (inner == 1): rows in
parallel; each row in tiles of ``TILE`` elements, two sweeps per tile that
stay in L1: the max (``llvm.maxnum``), then the sum of exp(x - max) (in
blocks, as the softmax's), kept apart from the max's own 1 (``tile_stats``);
the tiles' (max,
rest) pairs merge online, so the row is read from memory once. The loss
follows as (max - x_t) + log1p(rest), the target's logit read once. Label
smoothing and probability targets add one more sweep over the row for
sum_c u_c (max - x_c) (u = the weighted target distribution): written against
the max, every term is >= 0, so nothing cancels. Columns regime (inner > 1,
(N, C, d1..dK) inputs): strips of neighbouring positions whose C rows fit in
cache, the same sweeps top to bottom, as the softmax columns regime.

The gradient (``index_row_grad``, which ``cross_entropy_backward`` and
``cross_entropy_and_grad`` share) reads a row from memory once: a tile at a
time, its max, then its exponentials written into the gradient while they
are summed (hits on the max kept apart, as above); the tiles' statistics
merge; one last sweep rescales each tile in place to p_j * a - b * w_j,
with a and b per row (weights, smoothing and the reduction's scale folded
in), minus the target's one-hot term. With the loss wanted too, it comes
from the same statistics and the target's logit.

Two options of fused training kernels ride along: ``cap`` (softcap, 0 for
none) replaces every logit read by cap * tanh(x / cap) (``capped``; the max
is the capped max of the raw logits, tanh being increasing), and the
gradient takes the factor ``capped_slope`` in one more sweep over the row;
``zscale`` adds zscale * lse**2 to each counted row's loss (``z_loss``) and
2 zscale lse to the factor on p_j (``z_slope``). With both off the kernels
do what they did without them: the extra branches are uniform per call.

Per-position losses and weights come back in float64 arrays of the batch's
size (O(N) memory), and each forward kernel returns their sums, so the host
reduces without another pass. The kernels check every class index before
they read x with it: a bad one is reported (``totals``: its position, which
the host turns into an IndexError), never used. Every kernel takes
``parallel``: False runs it on the calling thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from softkern.cpu import parallel_kernel
from softkern.cpu.bfloat16 import narrow
from softkern.cpu.fma import maxnum
from softkern.cpu.simd_exp import exp_nonpositive
from softkern.cpu.softmax import (
    ALIAS_REACH,
    FASTMATH,
    ROW_CHUNKS,
    SUM_BLOCK,
    TILE,
    as_acc,
    fused_sum_is_safe,
    strip_max,
    strip_of,
)

# tanh's odd Taylor coefficients through y**13: below TANH_SERIES_TOP the
# next term is under 4e-17 of the sum, enough for float64.
TANH_SERIES = (
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155925.0,
    21844.0 / 6081075.0,
)
TANH_SERIES_TOP = 0.1


# Not inlined in Numba's IR: a capped loss kernel reads logits in a dozen
# places, and a copy of this body at each made the warmup 2 minutes longer;
# LLVM still inlines it into the loops and vectorises them.
@njit(cache=True)
def tanh_parts(y):
    """(tanh(y), e = exp(-2|y|)) in y's type, from ``exp_nonpositive``, so
    that loops calling it vectorise (libm's tanh is a call per element, and
    made a capped loss 16x slower than a plain one): tanh |y| = (1 - e) /
    (1 + e), and below TANH_SERIES_TOP, where 1 - e would cancel, the
    series instead. A few ulp either way; tanh(+-inf) = +-1, NaN stays NaN.
    Constants go through ``as_acc``: a bare Python number would widen a
    float32 y to float64."""
    one = as_acc(1, y)
    a = abs(y)
    e = exp_nonpositive(-(a + a))
    far = (one - e) / (one + e)
    s = a * a
    c3, c5, c7, c9, c11, c13 = TANH_SERIES
    series = as_acc(c13, y)
    series = as_acc(c11, y) + s * series
    series = as_acc(c9, y) + s * series
    series = as_acc(c7, y) + s * series
    series = as_acc(c5, y) + s * series
    series = as_acc(c3, y) + s * series
    near = a + a * s * series
    t = near if a < as_acc(TANH_SERIES_TOP, y) else far
    return (t if y >= 0 else -t), e


@njit(inline="always", cache=True)
def capped(v, cap):
    """A logit after soft-capping, cap * tanh(v / cap) (Gemma 2); v itself
    for cap 0 (no cap). cap has v's type, so float32 stays float32."""
    if cap == 0:
        return v
    t, _ = tanh_parts(v / cap)
    return cap * t


@njit(inline="always", cache=True)
def capped_slope(v, cap):
    """d capped(v) / dv = 1 - tanh(v / cap)**2 for cap != 0, written
    4e / (1 + e)**2 with e = exp(-2|v / cap|): no cancellation where tanh is
    near 1, no overflow. In v's type."""
    _, e = tanh_parts(v / cap)
    one = as_acc(1, e)
    return as_acc(4, e) * e / ((one + e) * (one + e))


@njit(inline="always", cache=True)
def z_loss(zscale, top, shift):
    """The z-loss of a counted row, zscale * lse**2 (PaLM), lse = top +
    shift; 0 without one."""
    if zscale == 0:
        return 0.0
    lse = top + shift
    return zscale * lse * lse


@njit(inline="always", cache=True)
def z_slope(zscale, top, shift):
    """d z_loss / d lse = 2 zscale lse: the z-loss adds it times p_j to a
    row's gradient."""
    return 0.0 if zscale == 0 else 2.0 * zscale * (top + shift)


@njit(inline="always", cache=True)
def tile_stats(xt, ot, store, cap, lowest):
    """(max, rest) of the slice xt: rest = the sum of exp(x - max) less 1,
    summed without the elements equal to the max (each adds exactly 1): a
    confident prediction's loss is log(1 + rest) with rest tiny, which
    1 + rest would round away even in float64. Blocks of SUM_BLOCK in the
    accumulator type, added in float64, as in the softmax. With `store`
    the exponentials go into ot too (the gradient's first sweep). With a
    `cap`, of the capped logits: tanh is increasing, so the max of the raw
    logits, capped, is theirs. ``tile_stats_apart`` is the same with the
    store and the sum in separate loops."""
    top = lowest
    for j in range(xt.shape[0]):
        top = maxnum(top, as_acc(xt[j], lowest))
    top = capped(top, cap)
    rest = 0.0
    ties = 0.0
    for b0 in range(0, xt.shape[0], SUM_BLOCK):
        xb = xt[b0 : min(xt.shape[0], b0 + SUM_BLOCK)]
        ob = ot[b0 : min(xt.shape[0], b0 + SUM_BLOCK)]
        part = as_acc(0, lowest)
        hits = as_acc(0, lowest)  # exact: a block has fewer than 2**24
        for j in range(xb.shape[0]):
            v = capped(as_acc(xb[j], lowest), cap)
            hit = v == top
            e = exp_nonpositive(v - top)
            if store:
                ob[j] = e
            part += as_acc(0, lowest) if hit else e
            hits += as_acc(1, lowest) if hit else as_acc(0, lowest)
        rest += part
        ties += hits
    return top, rest + (ties - 1)


@njit(inline="always", cache=True)
def tile_stats_apart(xt, ot, cap, lowest):
    """``tile_stats`` storing the exponentials into ot first and summing them
    from ot in a loop that stores nothing, where an exponential of exactly 1
    counts as a tie: one order whatever the arrays' addresses (see
    softkern.cpu.softmax.ALIAS_REACH). Its own function: a branch between
    the two inside tile_stats cost the fused loop 3x."""
    top = lowest
    for j in range(xt.shape[0]):
        top = maxnum(top, as_acc(xt[j], lowest))
    top = capped(top, cap)
    rest = 0.0
    ties = 0.0
    for b0 in range(0, xt.shape[0], SUM_BLOCK):
        xb = xt[b0 : min(xt.shape[0], b0 + SUM_BLOCK)]
        ob = ot[b0 : min(xt.shape[0], b0 + SUM_BLOCK)]
        part = as_acc(0, lowest)
        hits = as_acc(0, lowest)
        for j in range(xb.shape[0]):
            ob[j] = exp_nonpositive(capped(as_acc(xb[j], lowest), cap) - top)
        for j in range(ob.shape[0]):
            e = as_acc(ob[j], lowest)
            hit = e == 1
            part += as_acc(0, lowest) if hit else e
            hits += as_acc(1, lowest) if hit else as_acc(0, lowest)
        rest += part
        ties += hits
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
def row_stats(x, r, cap, lowest):
    """(max, rest) of row r's (capped) logits, tile by tile."""
    n = x.shape[1]
    # Slices indexed from 0: indices Numba can see are never negative, so
    # no wraparound check keeps the loops from vectorising.
    xr = x[r]
    top, rest = tile_stats(xr[: min(n, TILE)], xr, False, cap, lowest)
    for j0 in range(TILE, n, TILE):
        m, part = tile_stats(xr[j0 : min(n, j0 + TILE)], xr, False, cap, lowest)
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


@njit(inline="always", cache=True)
def is_bad(t, ignore_index, n):
    """A class index that is neither a class nor ignore_index."""
    return t != ignore_index and (t < 0 or t >= n)


@njit(inline="always", cache=True)
def totals(losses, weights, target, ignore_index, n):
    """(sum of losses, sum of weights, first position whose target is no
    class or -1), in position order, over C-contiguous arrays of one size."""
    loss, weight = 0.0, 0.0
    for i in range(losses.size):
        if is_bad(target.flat[i], ignore_index, n):
            return np.nan, np.nan, i
        loss += losses.flat[i]
        weight += weights.flat[i]
    return loss, weight, -1


@njit(inline="always", cache=True)
def index_row(
    x, target, weight, weight_sum, ignore_index, smoothing, cap, zscale, r, lowest
):
    """(loss, weight) of row r with a class-index target (0, 0 if ignored
    or, never read, if the target is no class)."""
    n = x.shape[1]
    t = target[r]
    if t == ignore_index or is_bad(t, ignore_index, n):
        return 0.0, 0.0
    top, rest = row_stats(x, r, cap, lowest)
    shift = log_sum(top, rest)
    w_t = np.float64(weight[t])
    loss = w_t * ((top - capped(as_acc(x[r, t], lowest), cap)) + shift)
    if smoothing > 0:
        spread = 0.0
        for j in range(n):
            spread += weight[j] * (top - capped(as_acc(x[r, j], lowest), cap))
        uniform = weight_sum * shift + spread
        loss = (1.0 - smoothing) * loss + smoothing / n * uniform
    return loss + z_loss(zscale, top, shift), w_t


@parallel_kernel(fastmath=FASTMATH)
def index_rows(
    x, target, weight, ignore_index, smoothing, cap, zscale, losses, weights,
    lowest, parallel,
):  # fmt: skip
    """Loss of each row with a class-index target into losses[r] and the
    target's weight into weights[r] (both 0 for an ignored row); returns
    ``totals``."""
    count = x.shape[0]
    weight_sum = total_of(weight)
    if not parallel:
        for r in range(count):
            losses[r], weights[r] = index_row(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, r, lowest,
            )  # fmt: skip
        return totals(losses, weights, target, ignore_index, x.shape[1])
    chunks = min(count, ROW_CHUNKS)
    for chunk in prange(chunks):
        for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
            losses[r], weights[r] = index_row(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, r, lowest,
            )  # fmt: skip
    return totals(losses, weights, target, ignore_index, x.shape[1])


@njit(inline="always", cache=True)
def probs_row(x, q, weight, smoothing, cap, zscale, r, lowest):
    """Loss of row r with a class-probability target row q[r]:
    sum_j u_j (lse - x_j), u_j = weight[j] * smoothed(q[r, j])."""
    n = x.shape[1]
    top, rest = row_stats(x, r, cap, lowest)
    shift = log_sum(top, rest)
    mass = 0.0
    spread = 0.0
    for j in range(n):
        u = weight[j] * smoothed(np.float64(q[r, j]), smoothing, n)
        mass += u
        spread += u * (top - capped(as_acc(x[r, j], lowest), cap))
    return mass * shift + spread + z_loss(zscale, top, shift)


@parallel_kernel(fastmath=FASTMATH)
def probs_rows(x, q, weight, smoothing, cap, zscale, losses, lowest, parallel):
    """``probs_row`` of every row into losses; returns their sum."""
    count = x.shape[0]
    if not parallel:
        for r in range(count):
            losses[r] = probs_row(x, q, weight, smoothing, cap, zscale, r, lowest)
    else:
        for r in prange(count):
            losses[r] = probs_row(x, q, weight, smoothing, cap, zscale, r, lowest)
    total = 0.0
    for r in range(count):
        total += losses[r]
    return total


@njit(cache=True)
def target_weight(target, weight, ignore_index):
    """(sum of the counted targets' weights, first position whose target is
    no class or -1), over C-contiguous targets and weight.size classes: the
    check before a backward pass, and the denominator of its "mean"."""
    total = 0.0
    for i in range(target.size):
        t = target.flat[i]
        if t == ignore_index:
            continue
        if is_bad(t, ignore_index, weight.size):
            return np.nan, i
        total += weight[t]
    return total, -1


def grad_row(out, r, scratch):
    """The row ``index_row_grad`` computes row r's gradient in: out[r]
    itself, or, when out is a bfloat16 gradient given as its bits, the
    float32 `scratch` row, which ``store_grad_row`` rounds into out[r] (the
    exponentials kept between sweeps stay in float32, and no float32 array
    of the gradient's size is ever written)."""


@overload(grad_row, inline="always")
def _grad_row(out, r, scratch):
    if out.dtype == types.uint16:
        return lambda out, r, scratch: scratch
    return lambda out, r, scratch: out[r]


def store_grad_row(out, r, row):
    """Round `row` into out[r] when out is bfloat16 bits (see ``grad_row``)."""


@overload(store_grad_row, inline="always")
def _store_grad_row(out, r, row):
    if out.dtype == types.uint16:

        def narrow_row(out, r, row):
            dst = out[r]
            for j in range(row.size):
                dst[j] = narrow(row[j])

        return narrow_row
    return lambda out, r, row: None


def row_scratch(out, n, lowest):
    """A float32 row of n for ``grad_row`` (empty when out is not bits)."""


@overload(row_scratch, inline="always")
def _row_scratch(out, n, lowest):
    if out.dtype == types.uint16:
        return lambda out, n, lowest: np.full(n, lowest)
    return lambda out, n, lowest: np.full(0, lowest)


@njit(inline="always", cache=True)
def index_row_grad(
    x, target, weight, weight_sum, ignore_index, smoothing, cap, zscale, grads,
    scale, out, r, with_loss, lowest, tile_top, fused, scratch,
):  # fmt: skip
    """d loss / d x of row r into out[r], and (when `with_loss`) the row's
    (loss, weight) as ``index_row``'s, reading the row from memory once.

    A tile of TILE elements at a time (while it is in L1): its max, then
    exp(x - that max) into out[r] with their sum (``tile_stats``); the
    tiles' (max, rest) merge (``merge_stats``); then one sweep rescales
    each tile in place by exp(its max - the row's max) and writes
    g (p_j ((1 - eps) w_t + eps/C sum w) - eps/C w_j - (1 - eps) w_t
    [j == t]), g = grads[r] * scale. `tile_top` holds the tiles' maxima.
    A z-loss adds g 2 zscale lse p_j; a cap multiplies the whole by
    capped_slope(x_j), in one more sweep that reads the row again."""
    n = x.shape[1]
    xr = x[r]
    orow = grad_row(out, r, scratch)
    t = target[r]
    if t == ignore_index or is_bad(t, ignore_index, n):
        for j in range(n):
            orow[j] = 0
        store_grad_row(out, r, orow)
        return 0.0, 0.0
    top, rest = lowest, 0.0
    for k in range((n + TILE - 1) // TILE):
        ot = orow[k * TILE : min(n, (k + 1) * TILE)]
        xt = xr[k * TILE : min(n, (k + 1) * TILE)]
        if fused:
            m, part = tile_stats(xt, ot, True, cap, lowest)
        else:
            m, part = tile_stats_apart(xt, ot, cap, lowest)
        tile_top[k] = m
        top, rest = (m, part) if k == 0 else merge_stats(top, rest, m, part)
    w_t = np.float64(weight[t])
    loss = 0.0
    shift = log_sum(top, rest)
    if with_loss:
        loss = w_t * ((top - capped(as_acc(xr[t], lowest), cap)) + shift)
        if smoothing > 0:
            # Every term >= 0 (written against the max): nothing cancels.
            spread = 0.0
            for j in range(n):
                spread += weight[j] * (top - capped(as_acc(xr[j], lowest), cap))
            uniform = weight_sum * shift + spread
            loss = (1.0 - smoothing) * loss + smoothing / n * uniform
        loss += z_loss(zscale, top, shift)
    g = grad_of(grads, r) * scale
    mass = (1.0 - smoothing) * w_t + smoothing / n * weight_sum
    a = g * (mass + z_slope(zscale, top, shift)) / exp_sum(top, rest)
    b = as_acc(g * smoothing / n, lowest)
    for k in range((n + TILE - 1) // TILE):
        ot = orow[k * TILE : min(n, (k + 1) * TILE)]
        wt = weight[k * TILE : min(n, (k + 1) * TILE)]
        m = tile_top[k]
        if m == top:  # exp(0) = 1, without a call into libm
            factor = as_acc(a, lowest)
        elif m == -np.inf:
            # A tile of -inf only in a row with a finite max: p = 0 (its
            # exponentials were exp(-inf - -inf) = NaN); 0 * a keeps a NaN.
            factor = as_acc(a, lowest)
            for j in range(ot.shape[0]):
                ot[j] = 0
        else:
            factor = as_acc(a * np.exp(np.float64(m) - top), lowest)
        if smoothing > 0:
            for j in range(ot.shape[0]):
                ot[j] = ot[j] * factor - b * wt[j]
        else:
            for j in range(ot.shape[0]):
                ot[j] *= factor
    orow[t] -= as_acc(g * (1.0 - smoothing) * w_t, lowest)
    if cap != 0:
        for j in range(n):
            orow[j] *= as_acc(capped_slope(as_acc(xr[j], lowest), cap), lowest)
    store_grad_row(out, r, orow)
    return loss, w_t


@parallel_kernel(fastmath=FASTMATH)
def index_rows_grad(
    x, target, weight, ignore_index, smoothing, cap, zscale, grads, scale, out,
    losses, weights, with_loss, lowest, parallel,
):  # fmt: skip
    """``index_row_grad`` of every row: the gradient into out and, when
    `with_loss`, each row's loss and weight into losses and weights
    (returns ``totals``; (0, 0, -1) without). The host checked the targets
    (``target_weight``) first; a bad one gets a zero row here."""
    count, n = x.shape
    weight_sum = total_of(weight)
    tiles = max(1, (n + TILE - 1) // TILE)
    # bfloat16 bits: the exponentials go to a float32 scratch row, another
    # allocation whose stores LLVM checks against x's loads by range (the
    # element sizes differ), a test a separate array always passes; below
    # ALIAS_REACH the separate loops anyway, as for float32 (fused 29 ms,
    # separate 40 ms on (8192, 4096) bfloat16)
    if out.itemsize == 2:
        fused = x.nbytes >= ALIAS_REACH
    else:
        fused = fused_sum_is_safe(x, out)
    if not parallel:
        tile_top = np.full(tiles, lowest)
        scratch = row_scratch(out, n, lowest)
        for r in range(count):
            loss, w_t = index_row_grad(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, grads, scale, out, r, with_loss, lowest, tile_top, fused,
                scratch,
            )  # fmt: skip
            if with_loss:
                losses[r], weights[r] = loss, w_t
    else:
        chunks = min(count, ROW_CHUNKS)
        for chunk in prange(chunks):
            tile_top = np.full(tiles, lowest)
            scratch = row_scratch(out, n, lowest)
            for r in range(chunk * count // chunks, (chunk + 1) * count // chunks):
                loss, w_t = index_row_grad(
                    x, target, weight, weight_sum, ignore_index, smoothing, cap,
                    zscale, grads, scale, out, r, with_loss, lowest, tile_top,
                    fused, scratch,
                )  # fmt: skip
                if with_loss:
                    losses[r], weights[r] = loss, w_t
    if not with_loss:
        return 0.0, 0.0, -1
    return totals(losses, weights, target, ignore_index, x.shape[1])


@njit(inline="always", cache=True)
def probs_row_backward(
    x, q, weight, smoothing, cap, zscale, grads, scale, out, r, lowest
):
    """d loss / d x of row r: g (p_j (sum_c u_c + 2 zscale lse) - u_j),
    times capped_slope(x_j) under a cap."""
    n = x.shape[1]
    g = grad_of(grads, r) * scale
    top, rest = row_stats(x, r, cap, lowest)
    total = exp_sum(top, rest)
    mass = z_slope(zscale, top, log_sum(top, rest))
    for j in range(n):
        mass += weight[j] * smoothed(np.float64(q[r, j]), smoothing, n)
    a = as_acc(g * mass / total, lowest)
    for j in range(n):
        u = as_acc(g * weight[j] * smoothed(np.float64(q[r, j]), smoothing, n), lowest)
        v = as_acc(x[r, j], lowest)
        grad = exp_nonpositive(capped(v, cap) - top) * a - u
        if cap != 0:
            grad *= as_acc(capped_slope(v, cap), lowest)
        out[r, j] = grad


@parallel_kernel(fastmath=FASTMATH)
def probs_rows_backward(
    x, q, weight, smoothing, cap, zscale, grads, scale, out, lowest, parallel
):
    count = x.shape[0]
    if not parallel:
        for r in range(count):
            probs_row_backward(
                x, q, weight, smoothing, cap, zscale, grads, scale, out, r, lowest
            )
        return
    for r in prange(count):
        probs_row_backward(
            x, q, weight, smoothing, cap, zscale, grads, scale, out, r, lowest
        )


@njit(inline="always", cache=True)
def strip_stats(x, o, c0, width, cap, lowest):
    """Column maxima of the strip's (capped) logits and each column's rest
    (the sum of exp(x - max) less 1, kept apart from the max as in
    ``tile_stats``)."""
    top = strip_max(x, o, c0, width, lowest)
    for c in range(width):
        top[c] = capped(top[c], cap)
    rest = np.zeros(width, dtype=np.float64)
    ties = np.zeros(width, dtype=np.int64)
    for i in range(x.shape[1]):
        xr = x[o, i, c0 : c0 + width]
        for c in range(width):
            v = capped(as_acc(xr[c], lowest), cap)
            hit = v == top[c]
            rest[c] += 0.0 if hit else exp_nonpositive(v - top[c])
            ties[c] += hit
    for c in range(width):
        rest[c] += ties[c] - 1
    return top, rest


@njit(inline="always", cache=True)
def index_strip(
    x, target, weight, weight_sum, ignore_index, smoothing, cap, zscale, item,
    strips, strip, losses, weights, lowest,
):  # fmt: skip
    """``index_row`` for the positions of one strip of (outer, C, inner)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top, rest = strip_stats(x, o, c0, width, cap, lowest)
    spread = np.zeros(width, dtype=np.float64)
    if smoothing > 0:
        for i in range(n):
            xr = x[o, i, c0 : c0 + width]
            for c in range(width):
                spread[c] += weight[i] * (top[c] - capped(as_acc(xr[c], lowest), cap))
    for c in range(width):
        t = target[o, c0 + c]
        if t == ignore_index or is_bad(t, ignore_index, n):
            losses[o, c0 + c] = 0.0
            weights[o, c0 + c] = 0.0
            continue
        w_t = np.float64(weight[t])
        shift = log_sum(top[c], rest[c])
        logit = capped(as_acc(x[o, t, c0 + c], lowest), cap)
        loss = w_t * ((top[c] - logit) + shift)
        if smoothing > 0:
            uniform = weight_sum * shift + spread[c]
            loss = (1.0 - smoothing) * loss + smoothing / n * uniform
        losses[o, c0 + c] = loss + z_loss(zscale, top[c], shift)
        weights[o, c0 + c] = w_t


@parallel_kernel(fastmath=FASTMATH)
def index_columns(
    x, target, weight, ignore_index, smoothing, cap, zscale, strip, losses,
    weights, lowest, parallel,
):  # fmt: skip
    """``index_rows`` for (outer, C, inner) inputs and (outer, inner) targets."""
    outer, inner = x.shape[0], x.shape[2]
    weight_sum = total_of(weight)
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            index_strip(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, item, strips, strip, losses, weights, lowest,
            )  # fmt: skip
    else:
        for item in prange(outer * strips):
            index_strip(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, item, strips, strip, losses, weights, lowest,
            )  # fmt: skip
    return totals(losses, weights, target, ignore_index, x.shape[1])


@njit(inline="always", cache=True)
def probs_strip(
    x, q, weight, smoothing, cap, zscale, item, strips, strip, losses, lowest
):
    """``probs_row`` for the positions of one strip of (outer, C, inner)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top, rest = strip_stats(x, o, c0, width, cap, lowest)
    mass = np.zeros(width, dtype=np.float64)
    spread = np.zeros(width, dtype=np.float64)
    for i in range(n):
        xr = x[o, i, c0 : c0 + width]
        qr = q[o, i, c0 : c0 + width]
        for c in range(width):
            u = weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
            mass[c] += u
            spread[c] += u * (top[c] - capped(as_acc(xr[c], lowest), cap))
    for c in range(width):
        shift = log_sum(top[c], rest[c])
        losses[o, c0 + c] = mass[c] * shift + spread[c] + z_loss(zscale, top[c], shift)


@parallel_kernel(fastmath=FASTMATH)
def probs_columns(
    x, q, weight, smoothing, cap, zscale, strip, losses, lowest, parallel
):
    """``probs_rows`` for (outer, C, inner) inputs and targets."""
    outer, inner = x.shape[0], x.shape[2]
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            probs_strip(
                x, q, weight, smoothing, cap, zscale, item, strips, strip, losses,
                lowest,
            )  # fmt: skip
    else:
        for item in prange(outer * strips):
            probs_strip(
                x, q, weight, smoothing, cap, zscale, item, strips, strip, losses,
                lowest,
            )  # fmt: skip
    total = 0.0
    for i in range(losses.size):
        total += losses.flat[i]
    return total


@njit(inline="always", cache=True)
def index_strip_backward(
    x, target, weight, weight_sum, ignore_index, smoothing, cap, zscale, grads,
    scale, item, strips, strip, out, lowest,
):  # fmt: skip
    """``index_row_grad``'s gradient for one strip of (outer, C, inner)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top, rest = strip_stats(x, o, c0, width, cap, lowest)
    # Per column: the softmax's factor a, the uniform term's factor b and
    # the one-hot's size d at class t (an ignored column: all zero, and
    # t = -1 matches no class).
    a = np.zeros(width, dtype=top.dtype)
    b = np.zeros(width, dtype=top.dtype)
    d = np.zeros(width, dtype=top.dtype)
    t = np.full(width, -1, dtype=np.int64)
    for c in range(width):
        tc = target[o, c0 + c]
        if tc == ignore_index or is_bad(tc, ignore_index, n):
            continue
        g = grad_of(grads, o * inner + c0 + c) * scale
        w_t = np.float64(weight[tc])
        uniform = smoothing / n * weight_sum
        zslope = z_slope(zscale, top[c], log_sum(top[c], rest[c]))
        total = exp_sum(top[c], rest[c])
        a[c] = as_acc(g * ((1.0 - smoothing) * w_t + uniform + zslope) / total, lowest)
        b[c] = as_acc(g * smoothing / n, lowest)
        d[c] = as_acc(g * (1.0 - smoothing) * w_t, lowest)
        t[c] = tc
    for i in range(n):
        xr = x[o, i, c0 : c0 + width]
        orow = out[o, i, c0 : c0 + width]
        w = weight[i]
        for c in range(width):
            hit = d[c] if t[c] == i else as_acc(0, lowest)
            v = as_acc(xr[c], lowest)
            grad = exp_nonpositive(capped(v, cap) - top[c]) * a[c] - b[c] * w - hit
            if cap != 0:
                grad *= as_acc(capped_slope(v, cap), lowest)
            orow[c] = grad
    # An ignored column's factors are 0, but 0 * exp(NaN) is not: where its
    # logits hold NaN or inf (or only -inf), its gradient is set to 0 in a
    # pass of its own, as the rows regime gives. A select in the loop above
    # stopped LLVM vectorising it (4x slower).
    for c in range(width):
        if t[c] < 0 and not (np.isfinite(top[c]) and np.isfinite(rest[c])):
            out[o, :, c0 + c] = 0


@parallel_kernel(fastmath=FASTMATH)
def index_columns_backward(
    x, target, weight, ignore_index, smoothing, cap, zscale, grads, scale, strip,
    out, lowest, parallel,
):  # fmt: skip
    """``index_rows_grad``'s gradient for (outer, C, inner) inputs."""
    outer, inner = x.shape[0], x.shape[2]
    weight_sum = total_of(weight)
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            index_strip_backward(
                x, target, weight, weight_sum, ignore_index, smoothing, cap,
                zscale, grads, scale, item, strips, strip, out, lowest,
            )  # fmt: skip
        return
    for item in prange(outer * strips):
        index_strip_backward(
            x, target, weight, weight_sum, ignore_index, smoothing, cap, zscale,
            grads, scale, item, strips, strip, out, lowest,
        )  # fmt: skip


@njit(inline="always", cache=True)
def probs_strip_backward(
    x, q, weight, smoothing, cap, zscale, grads, scale, item, strips, strip, out,
    lowest,
):  # fmt: skip
    """``probs_row_backward`` for one strip of (outer, C, inner)."""
    n, inner = x.shape[1], x.shape[2]
    o, c0, width = strip_of(item, strips, strip, inner)
    top, rest = strip_stats(x, o, c0, width, cap, lowest)
    mass = np.zeros(width, dtype=np.float64)
    for i in range(n):
        qr = q[o, i, c0 : c0 + width]
        for c in range(width):
            mass[c] += weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
    a = np.zeros(width, dtype=top.dtype)
    g = np.zeros(width, dtype=np.float64)
    for c in range(width):
        g[c] = grad_of(grads, o * inner + c0 + c) * scale
        zslope = z_slope(zscale, top[c], log_sum(top[c], rest[c]))
        a[c] = as_acc(g[c] * (mass[c] + zslope) / exp_sum(top[c], rest[c]), lowest)
    for i in range(n):
        xr = x[o, i, c0 : c0 + width]
        qr = q[o, i, c0 : c0 + width]
        orow = out[o, i, c0 : c0 + width]
        for c in range(width):
            u = g[c] * weight[i] * smoothed(np.float64(qr[c]), smoothing, n)
            v = as_acc(xr[c], lowest)
            grad = exp_nonpositive(capped(v, cap) - top[c]) * a[c] - as_acc(u, lowest)
            if cap != 0:
                grad *= as_acc(capped_slope(v, cap), lowest)
            orow[c] = grad


@parallel_kernel(fastmath=FASTMATH)
def probs_columns_backward(
    x, q, weight, smoothing, cap, zscale, grads, scale, strip, out, lowest, parallel
):
    """``probs_rows_backward`` for (outer, C, inner) inputs."""
    outer, inner = x.shape[0], x.shape[2]
    strips = (inner + strip - 1) // strip
    if not parallel:
        for item in range(outer * strips):
            probs_strip_backward(
                x, q, weight, smoothing, cap, zscale, grads, scale, item, strips,
                strip, out, lowest,
            )  # fmt: skip
        return
    for item in prange(outer * strips):
        probs_strip_backward(
            x, q, weight, smoothing, cap, zscale, grads, scale, item, strips,
            strip, out, lowest,
        )  # fmt: skip


@njit(inline="always", cache=True)
def nll_slab(x, target, weight, ignore_index, losses, weights, o):
    n, inner = x.shape[1], x.shape[2]
    for c in range(inner):
        t = target[o, c]
        if t == ignore_index or is_bad(t, ignore_index, n):
            losses[o, c] = 0.0
            weights[o, c] = 0.0
        else:
            w_t = np.float64(weight[t])
            losses[o, c] = -w_t * as_acc(x[o, t, c], 0.0)  # in float64
            weights[o, c] = w_t


@parallel_kernel()
def nll(x, target, weight, ignore_index, losses, weights, parallel):
    """-weight[t] * x[o, t, c] for every position (o, c) of (outer, C, inner)
    log-probabilities and (outer, inner) targets; returns ``totals``."""
    outer = x.shape[0]
    if not parallel:
        for o in range(outer):
            nll_slab(x, target, weight, ignore_index, losses, weights, o)
    else:
        for o in prange(outer):
            nll_slab(x, target, weight, ignore_index, losses, weights, o)
    return totals(losses, weights, target, ignore_index, x.shape[1])
