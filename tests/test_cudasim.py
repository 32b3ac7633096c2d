"""Tests for the warp-intrinsic and fma emulation of the CUDA simulator."""

import math
import threading
import time
from fractions import Fraction

import numba
import numpy as np
import pytest

if not numba.config.ENABLE_CUDASIM:
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from numba import cuda
from numba.cuda.simulator import kernel as sim_kernel
from numba.cuda.simulator import kernelapi

from softkern.testing import cudasim
from softkern.testing.cudasim import WarpSyncError

cudasim.install()

FULL = 0xFFFFFFFF
LOW_HALF = 0x0000FFFF
# A clear error must come well before the 10 s last-resort timeout.
FAST = 3.0


def run(kernel, blocks, threads, *args):
    kernel[blocks, threads](*args)


def _live_block_threads():
    return {
        thread
        for thread in threading.enumerate()
        if isinstance(thread, sim_kernel.BlockThread) and thread.is_alive()
    }


def launch_expecting_error(kernel, threads, *args, match, error=WarpSyncError):
    earlier = _live_block_threads()
    start = time.monotonic()
    with pytest.raises(error, match=match):
        kernel[1, threads](*args)
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"took {elapsed:.1f} s to fail"
    # The launch returns at the first error; none of its lanes may stay blocked.
    while _live_block_threads() - earlier:
        assert time.monotonic() - start < 2 * FAST, "simulator threads left blocked"
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Installation


def test_install_is_idempotent():
    init = sim_kernel.BlockThread.__init__
    shfl = kernelapi.FakeCUDAModule.shfl_sync
    cudasim.install()
    assert cudasim.is_installed()
    assert sim_kernel.BlockThread.__init__ is init
    assert kernelapi.FakeCUDAModule.shfl_sync is shfl


def test_intrinsics_outside_a_kernel_raise():
    with pytest.raises(RuntimeError, match="inside a kernel"):
        kernelapi.FakeCUDAModule.shfl_sync(None, FULL, 1, 0)


# --------------------------------------------------------------------------
# Shuffles


@cuda.jit
def down_tree_kernel(values, out):
    i = cuda.grid(1)
    v = values[i]
    for offset in (16, 8, 4, 2, 1):
        v += cuda.shfl_down_sync(FULL, v, offset)
    out[i] = v


def test_shfl_down_tree_reduction():
    values = np.arange(1, 65, dtype=np.int64) ** 2
    out = np.zeros(64, dtype=np.int64)
    run(down_tree_kernel, 2, 32, values, out)

    expected = []
    for warp in values.reshape(2, 32).tolist():
        v = warp
        for offset in (16, 8, 4, 2, 1):
            v = [v[i] + (v[i + offset] if i + offset < 32 else v[i]) for i in range(32)]
        expected += v
    np.testing.assert_array_equal(out, expected)
    # Lane 0 holds the warp sum; lane 31 always read its own value: 2**5 copies.
    assert out[0] == values[:32].sum() and out[32] == values[32:].sum()
    assert out[31] == 32 * values[31] and out[63] == 32 * values[63]
    # Lane 30 doubled its own value four times, then added lane 31 (likewise).
    assert out[30] == 16 * values[30] + 16 * values[31]


@cuda.jit
def up_scan_kernel(values, out):
    i = cuda.grid(1)
    lane = cuda.laneid
    v = values[i]
    for delta in (1, 2, 4, 8, 16):
        n = cuda.shfl_up_sync(FULL, v, delta)
        if lane >= delta:
            v += n
    out[i] = v


def test_shfl_up_prefix_scan():
    values = (np.arange(64, dtype=np.int64) * 7) % 11
    out = np.zeros(64, dtype=np.int64)
    run(up_scan_kernel, 1, 64, values, out)
    expected = np.concatenate([np.cumsum(values[:32]), np.cumsum(values[32:])])
    np.testing.assert_array_equal(out, expected)


@cuda.jit
def own_value_kernel(values, up, down, xor):
    i = cuda.grid(1)
    up[i] = cuda.shfl_up_sync(FULL, values[i], 3)
    down[i] = cuda.shfl_down_sync(FULL, values[i], 3)
    xor[i] = cuda.shfl_xor_sync(FULL, values[i], 33)


def test_out_of_warp_sources_return_own_value():
    values = np.arange(100, 132, dtype=np.int64)
    up, down, xor = (np.zeros(32, dtype=np.int64) for _ in range(3))
    run(own_value_kernel, 1, 32, values, up, down, xor)
    lanes = np.arange(32)
    np.testing.assert_array_equal(up, np.where(lanes >= 3, values[lanes - 3], values))
    np.testing.assert_array_equal(
        down, np.where(lanes < 29, values[(lanes + 3) % 32], values)
    )
    np.testing.assert_array_equal(xor, values)  # lane ^ 33 >= 32 for every lane


@cuda.jit
def butterfly_kernel(values, out):
    i = cuda.grid(1)
    v = values[i]
    for lane_mask in (16, 8, 4, 2, 1):
        v += cuda.shfl_xor_sync(FULL, v, lane_mask)
    out[i] = v


def test_shfl_xor_butterfly_gives_every_lane_the_sum():
    values = np.arange(64, dtype=np.int64) * 3 + 1
    out = np.zeros(64, dtype=np.int64)
    run(butterfly_kernel, 1, 64, values, out)
    expected = np.repeat([values[:32].sum(), values[32:].sum()], 32)
    np.testing.assert_array_equal(out, expected)


@cuda.jit
def broadcast_kernel(values, from5, computed):
    i = cuda.grid(1)
    lane = cuda.laneid
    from5[i] = cuda.shfl_sync(FULL, values[i], 5)
    # Sources up to 220: shfl_sync takes them modulo 32.
    computed[i] = cuda.shfl_sync(FULL, values[i], lane * 7 + 3)


def test_shfl_sync_broadcast_and_computed_source():
    values = np.arange(64, dtype=np.int64) ** 2
    from5 = np.zeros(64, dtype=np.int64)
    computed = np.zeros(64, dtype=np.int64)
    run(broadcast_kernel, 1, 64, values, from5, computed)
    np.testing.assert_array_equal(from5, np.repeat([values[5], values[37]], 32))
    warp_base = np.arange(64) // 32 * 32
    source = warp_base + (np.arange(64) % 32 * 7 + 3) % 32
    np.testing.assert_array_equal(computed, values[source])


@cuda.jit
def types_kernel(ok):
    lane = cuda.laneid
    f = cuda.shfl_sync(FULL, np.float32(lane) + np.float32(0.5), 0)
    b = cuda.shfl_xor_sync(FULL, lane % 2 == 0, 1)
    n = cuda.shfl_down_sync(FULL, lane * 10, 1)
    ok[lane, 0] = type(f) is np.float32 and f == 0.5
    ok[lane, 1] = type(b) is bool and b == (lane % 2 == 1)
    ok[lane, 2] = type(n) is int and n == (lane + 1 if lane < 31 else lane) * 10


def test_shuffled_values_keep_their_type():
    ok = np.zeros((32, 3), dtype=np.bool_)
    run(types_kernel, 1, 32, ok)
    assert ok.all(), np.argwhere(~ok)


# --------------------------------------------------------------------------
# Votes, syncwarp, activemask


@cuda.jit
def vote_kernel(out, kinds):
    i = cuda.grid(1)
    lane = cuda.laneid
    # Warp 0: every third lane; warp 1: every lane.
    predicate = lane % 3 == 0 if i < 32 else True
    ballot = cuda.ballot_sync(FULL, predicate)
    every = cuda.all_sync(FULL, predicate)
    out[i, 0] = ballot
    out[i, 1] = every
    out[i, 2] = cuda.any_sync(FULL, predicate)
    out[i, 3] = cuda.eq_sync(FULL, predicate)
    out[i, 4] = cuda.ballot_sync(FULL, lane & 4)  # integer predicate
    out[i, 5] = cuda.any_sync(FULL, False)
    out[i, 6] = cuda.eq_sync(FULL, 0)
    out[i, 7] = cuda.ballot_sync(FULL, i == 40)
    kinds[i] = type(ballot) is np.uint32 and type(every) is bool


def test_votes_with_mixed_predicates():
    out = np.zeros((64, 8), dtype=np.int64)
    kinds = np.zeros(64, dtype=np.bool_)
    run(vote_kernel, 1, 64, out, kinds)
    every_third = sum(1 << lane for lane in range(0, 32, 3))
    assert every_third == 0x49249249
    lane_bit2 = sum(1 << lane for lane in range(32) if lane & 4)
    assert lane_bit2 == 0xF0F0F0F0
    warp0 = [every_third, 0, 1, 0, lane_bit2, 0, 1, 0]
    warp1 = [FULL, 1, 1, 1, lane_bit2, 0, 1, 1 << 8]
    np.testing.assert_array_equal(out, [warp0] * 32 + [warp1] * 32)
    assert kinds.all()


@cuda.jit
def syncwarp_kernel(scratch, out):
    i = cuda.grid(1)
    if i % 2 == 1:
        time.sleep(0.02)  # odd lanes write late: only syncwarp makes them visible
    scratch[i] = i * 10
    cuda.syncwarp()
    out[i] = scratch[i ^ 1]
    cuda.syncwarp(FULL)


def test_syncwarp_orders_memory_between_lanes():
    scratch = np.full(32, -1, dtype=np.int64)
    out = np.zeros(32, dtype=np.int64)
    run(syncwarp_kernel, 1, 32, scratch, out)
    np.testing.assert_array_equal(out, (np.arange(32) ^ 1) * 10)


@cuda.jit
def activemask_kernel(out):
    i = cuda.grid(1)
    out[i] = cuda.activemask()


def test_activemask_reports_existing_lanes():
    out = np.zeros(48, dtype=np.int64)
    run(activemask_kernel, 1, 48, out)
    np.testing.assert_array_equal(out, [FULL] * 32 + [0xFFFF] * 16)


# --------------------------------------------------------------------------
# Rounds and warps


@cuda.jit
def two_warps_kernel(values, out):
    i = cuda.grid(1)
    v = values[i]
    if cuda.threadIdx.x < 32:
        for _ in range(3):
            v = cuda.shfl_down_sync(FULL, v, 1)
    else:
        v = cuda.shfl_xor_sync(FULL, v, 3)
        v = cuda.shfl_up_sync(FULL, v, 2)
    out[i] = v


def test_two_warps_shuffle_independently():
    values = np.arange(128, dtype=np.int64) * 5
    out = np.zeros(128, dtype=np.int64)
    run(two_warps_kernel, 2, 64, values, out)

    expected = []
    for block in values.reshape(2, 64).tolist():
        warp0 = block[:32]
        for _ in range(3):
            warp0 = [warp0[lane + 1] if lane < 31 else warp0[31] for lane in range(32)]
        warp1 = [block[32 + (lane ^ 3)] for lane in range(32)]
        warp1 = [warp1[lane - 2] if lane >= 2 else warp1[lane] for lane in range(32)]
        expected += warp0 + warp1
    np.testing.assert_array_equal(out, expected)


@cuda.jit
def back_to_back_kernel(values, shuffled, ballots):
    lane = cuda.laneid
    v = values[lane]
    # Nothing between the calls: the lane completing a round enters the next
    # one while the others are still waking up to read the last.
    history = []
    for step in range(12):
        if (lane + step) % 5 == 0:
            time.sleep(0.002)  # stagger arrivals too
        v = cuda.shfl_sync(FULL, v, lane + 1)
        history.append(v)
    votes = [cuda.ballot_sync(FULL, (lane + step) % 3 == 0) for step in range(12)]
    for step in range(12):
        shuffled[step, lane] = history[step]
        ballots[step, lane] = votes[step]


def test_back_to_back_rounds_do_not_mix():
    values = np.arange(32, dtype=np.int64) * 7 + 2
    shuffled = np.zeros((12, 32), dtype=np.int64)
    ballots = np.zeros((12, 32), dtype=np.int64)
    run(back_to_back_kernel, 1, 32, values, shuffled, ballots)
    for step in range(12):
        np.testing.assert_array_equal(shuffled[step], np.roll(values, -(step + 1)))
        bits = sum(1 << lane for lane in range(32) if (lane + step) % 3 == 0)
        np.testing.assert_array_equal(ballots[step], bits)


@cuda.jit
def partial_mask_kernel(values, out):
    lane = cuda.laneid
    if lane < 16:
        v = values[lane]
        for lane_mask in (8, 4, 2, 1):
            v += cuda.shfl_xor_sync(LOW_HALF, v, lane_mask)
        out[lane, 0] = v
        out[lane, 1] = cuda.ballot_sync(LOW_HALF, lane % 2 == 0)
        out[lane, 2] = cuda.all_sync(LOW_HALF, lane < 16)
        cuda.syncwarp(LOW_HALF)
        out[lane, 3] = cuda.shfl_up_sync(LOW_HALF, v + lane, 4)


def test_partial_mask_with_half_the_warp():
    values = np.arange(32, dtype=np.int64) + 100
    out = np.full((32, 4), -1, dtype=np.int64)
    run(partial_mask_kernel, 1, 32, values, out)
    total = values[:16].sum()
    lanes = np.arange(16)
    np.testing.assert_array_equal(out[:16, 0], total)
    np.testing.assert_array_equal(out[:16, 1], 0x5555)
    np.testing.assert_array_equal(out[:16, 2], 1)
    np.testing.assert_array_equal(
        out[:16, 3], total + np.where(lanes >= 4, lanes - 4, lanes)
    )
    np.testing.assert_array_equal(out[16:], -1)


@cuda.jit
def divergent_kernel(values, out):
    lane = cuda.laneid
    v = values[lane]
    if lane < 16:
        time.sleep(0.01)  # the upper half opens the full-mask round first
        v = cuda.shfl_xor_sync(LOW_HALF, v, 1)
    out[lane] = cuda.shfl_down_sync(FULL, v, 16)


def test_half_warp_round_inside_a_full_warp_round():
    values = np.arange(32, dtype=np.int64) * 3
    out = np.zeros(32, dtype=np.int64)
    run(divergent_kernel, 1, 32, values, out)
    after_xor = [values[lane ^ 1] if lane < 16 else values[lane] for lane in range(32)]
    expected = [
        after_xor[lane + 16] if lane < 16 else after_xor[lane] for lane in range(32)
    ]
    np.testing.assert_array_equal(out, expected)


@cuda.jit
def with_syncthreads_kernel(out):
    i = cuda.threadIdx.x
    shared = cuda.shared.array(64, np.int64)
    v = i
    for _ in range(6):
        v = cuda.shfl_xor_sync(FULL, v, 1) + 1
        shared[i] = v
        cuda.syncthreads()
        v = shared[63 - i]
        cuda.syncthreads()
    out[i] = v


def test_shuffles_between_syncthreads():
    out = np.zeros(64, dtype=np.int64)
    run(with_syncthreads_kernel, 1, 64, out)
    v = list(range(64))
    for _ in range(6):
        v = [v[i ^ 1] + 1 for i in range(64)]
        v = [v[63 - i] for i in range(64)]
    np.testing.assert_array_equal(out, v)


# --------------------------------------------------------------------------
# Errors: clear, and fast


@cuda.jit
def early_return_kernel(out):
    lane = cuda.laneid
    if lane >= 16:
        return
    out[lane] = cuda.shfl_down_sync(FULL, lane, 1)


def test_lanes_that_return_early_are_reported():
    launch_expecting_error(
        early_return_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=(
            r"shfl_down_sync\(mask=0xffffffff\) in warp 0 of block \(0, 0, 0\): "
            r"lanes \[16\.\.31\] never reached it \(they exited\)"
        ),
    )


@cuda.jit
def mask_without_caller_kernel(out):
    lane = cuda.laneid
    out[lane] = cuda.shfl_sync(0xFFFFFFFE, lane, 1)


def test_mask_without_the_calling_lane():
    launch_expecting_error(
        mask_without_caller_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=r"shfl_sync\(mask=0xfffffffe\) .*the calling lane 0 is not in the mask",
    )


@cuda.jit
def full_mask_kernel(out):
    i = cuda.threadIdx.x
    out[i] = cuda.shfl_xor_sync(FULL, i, 1)


def test_mask_naming_lanes_missing_from_the_block():
    launch_expecting_error(
        full_mask_kernel,
        48,
        np.zeros(48, dtype=np.int64),
        match=(
            r"shfl_xor_sync\(mask=0xffffffff\) in warp 1 .* names lanes \[16\.\.31\] "
            r"that do not exist: the block has 48 threads"
        ),
    )


@cuda.jit
def inactive_source_kernel(out):
    lane = cuda.laneid
    if lane < 16:
        out[lane] = cuda.shfl_sync(LOW_HALF, lane, 20)


def test_reading_a_lane_outside_the_mask():
    launch_expecting_error(
        inactive_source_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=r"lane \d+ reads lane 20, which is not in the mask",
    )


@cuda.jit
def mismatched_intrinsics_kernel(out):
    lane = cuda.laneid
    if lane < 16:
        out[lane] = cuda.shfl_down_sync(FULL, lane, 1)
    else:
        out[lane] = cuda.shfl_up_sync(FULL, lane, 1)


def test_lanes_calling_different_intrinsics():
    launch_expecting_error(
        mismatched_intrinsics_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=(
            r"shfl_(up|down)_sync\(mask=0xffffffff\) in warp 0 .*: lanes \[.*\] "
            r"are waiting in shfl_(up|down)_sync\(mask=0xffffffff\) instead"
        ),
    )


@cuda.jit
def mismatched_masks_kernel(out):
    lane = cuda.laneid
    mask = FULL if lane < 16 else 0xFFFF0001
    out[lane] = cuda.shfl_xor_sync(mask, lane, 1)


def test_lanes_calling_with_different_masks():
    launch_expecting_error(
        mismatched_masks_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=r"are waiting in shfl_xor_sync\(mask=0x(ffffffff|ffff0001)\) instead",
    )


@cuda.jit
def syncthreads_deadlock_kernel(out):
    lane = cuda.laneid
    if lane < 16:
        cuda.syncthreads()
    else:
        out[lane] = cuda.shfl_down_sync(FULL, lane, 1)


def test_lanes_waiting_in_syncthreads():
    launch_expecting_error(
        syncthreads_deadlock_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=(
            r"shfl_down_sync\(mask=0xffffffff\) in warp 0 of block \(0, 0, 0\): "
            r"lanes \[0\.\.15\] never reached it \(they are waiting in syncthreads\)"
        ),
    )


@cuda.jit
def slow_lanes_kernel(out):
    lane = cuda.laneid
    if lane >= 16:
        time.sleep(1.0)
    out[lane] = cuda.shfl_down_sync(FULL, lane, 1)


def test_timeout_as_last_resort(monkeypatch):
    monkeypatch.setattr(cudasim, "TIMEOUT", 0.2)
    launch_expecting_error(
        slow_lanes_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match=r"timed out after 0.2 s waiting for lanes \[16\.\.31\]",
    )


@cuda.jit
def raising_lane_kernel(out):
    lane = cuda.laneid
    if lane == 7:
        raise ValueError("lane seven broke")
    out[lane] = cuda.shfl_down_sync(FULL, lane, 1)


def test_a_lane_that_raises_does_not_hang_its_warp():
    launch_expecting_error(
        raising_lane_kernel,
        32,
        np.zeros(32, dtype=np.int64),
        match="lane seven broke",
        error=(ValueError, WarpSyncError),
    )


# --------------------------------------------------------------------------
# fma


def _fma32_reference(a, b, c):
    """fma.rn on float32 by brute force: the float32 nearest the exact value.

    Nonzero exact results only: the sign of an exact zero is checked by hand.
    """
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    assert exact != 0
    with np.errstate(over="ignore"):
        guess = np.float32(float(exact))
    candidates = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    finite = [x for x in candidates if np.isfinite(x)]

    def distance(x):  # ties go to the even significand
        return abs(Fraction(float(x)) - exact), int(np.float32(x).view(np.uint32)) & 1

    best = min(finite, key=distance)
    largest = Fraction(float(np.finfo(np.float32).max))
    half_ulp = Fraction(2) ** (127 - 24)
    if abs(exact) >= largest + half_ulp:  # rounds past the largest float32
        return np.float32(math.copysign(math.inf, exact))
    return best


def _fma64_reference(a, b, c):
    """fma.rn on float64: CPython's int division rounds correctly (nonzero only)."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    assert exact != 0
    try:
        return float(exact)
    except OverflowError:
        return math.inf if exact > 0 else -math.inf


def _same(x, y):
    if np.isnan(x) or np.isnan(y):
        return bool(np.isnan(x) and np.isnan(y))
    return x == y and np.signbit(x) == np.signbit(y)


def test_fma_rounds_once_where_unfused_differs():
    e = np.float32(2.0**-23)
    a, b, c = np.float32(1) + e, np.float32(1) - e, np.float32(-1)
    assert a * b + c == 0  # the simulator's old answer
    result = cudasim.fma(a, b, c)
    assert type(result) is np.float32 and result == -(2.0**-46)

    e = 2.0**-52
    assert (1 + e) * (1 - e) - 1 == 0
    assert cudasim.fma(1 + e, 1 - e, -1.0) == -(2.0**-104)
    assert type(cudasim.fma(1 + e, 1 - e, -1.0)) is float
    assert type(cudasim.fma(np.float64(1), np.float64(2), np.float64(3))) is np.float64

    # The exact product overflows no format: only the final sum is rounded.
    assert cudasim.fma(1e308, 2.0, -1e308) == 1e308
    assert cudasim.fma(np.float32(3e38), np.float32(2), np.float32(-3e38)) == (
        np.float32(3e38)
    )
    # Error-free product: fma(a, b, -a*b) is the rounding error of a*b.
    x = np.float32(1.1)
    error = cudasim.fma(x, x, -(x * x))
    assert error != 0
    assert Fraction(float(x)) ** 2 == Fraction(float(x * x)) + Fraction(float(error))


@pytest.mark.parametrize(
    ("a", "b", "c", "expected"),
    [
        (math.inf, 0.0, 1.0, math.nan),
        (math.inf, 2.0, -math.inf, math.nan),
        (math.inf, -2.0, -math.inf, -math.inf),
        (1e308, 10.0, -math.inf, -math.inf),
        (1.0, 1.0, math.nan, math.nan),
        (math.nan, 0.0, 0.0, math.nan),
        (1e308, 10.0, 0.0, math.inf),
        (-1e308, 10.0, 1e308, -math.inf),
        (-0.0, 1.0, -0.0, -0.0),
        (-0.0, 1.0, 0.0, 0.0),
        (0.0, -1.0, -0.0, -0.0),
        (1.0, 1.0, -1.0, 0.0),
        (-1.0, 1.0, 1.0, 0.0),
        (-1e-300, 1e-300, 0.0, -0.0),
        (1e-300, 1e-300, -0.0, 0.0),
        (2.0**-1074, 0.5, 0.0, 0.0),  # tie to even: 0
        (2.0**-1074, 1.5, 0.0, 2.0**-1073),  # tie to even: 2 * 2**-1074
        (2.0**-1000, 2.0**-60, 2.0**-1074, 2.0**-1060 + 2.0**-1074),
    ],
)
def test_fma_special_values_float64(a, b, c, expected):
    assert _same(cudasim.fma(a, b, c), expected)


def test_fma_special_values_float32():
    f = np.float32
    tiny = f(2.0**-149)
    assert _same(cudasim.fma(tiny, f(0.5), f(0)), f(0))
    assert _same(cudasim.fma(tiny, f(1.5), f(0)), f(2.0**-148))
    assert _same(cudasim.fma(-tiny, f(0.25), f(0)), f(-0.0))
    assert _same(cudasim.fma(f(3e38), f(2), f(0)), f(math.inf))
    assert _same(cudasim.fma(f(-0.0), f(1), f(-0.0)), f(-0.0))
    largest = np.finfo(np.float32).max
    # largest + half an ulp rounds to even, which is past the end: inf.
    assert _same(cudasim.fma(largest, f(1), f(2.0**103)), f(math.inf))
    assert _same(cudasim.fma(largest, f(1), f(2.0**102)), largest)


def _exact_zero(a, b, c):
    return Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)) == 0


def _random_operands(rng, dtype, count):
    """Random bit patterns, and products cancelled by a nearby addend."""
    uint = np.uint32 if dtype == np.float32 else np.uint64
    bits = rng.integers(0, np.iinfo(uint).max, size=(count, 3), dtype=uint)
    raw = bits.view(dtype)
    a = (rng.standard_normal(count) * 2.0 ** rng.integers(-30, 30, count)).astype(dtype)
    b = rng.standard_normal(count).astype(dtype)
    eps = np.finfo(dtype).eps
    with np.errstate(over="ignore", invalid="ignore"):
        c = -(a * b) * (1 + rng.integers(-3, 4, count) * eps).astype(dtype)
    near = np.stack([a, b, c], axis=1)
    return [tuple(row) for row in np.concatenate([raw, near])]


def test_fma_float32_matches_exact_reference():
    rng = np.random.default_rng(1234)
    checked = 0
    for a, b, c in _random_operands(rng, np.float32, 1500):
        if not all(np.isfinite([a, b, c])) or _exact_zero(a, b, c):
            continue
        got = cudasim.fma(a, b, c)
        assert type(got) is np.float32
        assert _same(got, _fma32_reference(a, b, c)), (a, b, c, got)
        checked += 1
    assert checked > 2500


def test_fma_float64_matches_exact_reference():
    rng = np.random.default_rng(4321)
    checked = 0
    for a, b, c in _random_operands(rng, np.float64, 1500):
        a, b, c = float(a), float(b), float(c)
        if not all(map(math.isfinite, (a, b, c))) or _exact_zero(a, b, c):
            continue
        got = cudasim.fma(a, b, c)
        assert type(got) is float
        assert got == _fma64_reference(a, b, c), (a, b, c, got)
        checked += 1
    assert checked > 2500


@cuda.jit
def fma_kernel(a, b, c, out):
    i = cuda.grid(1)
    out[i] = cuda.fma(a[i], b[i], c[i])


def test_fma_is_used_inside_kernels():
    e = 2.0**-23
    a = np.full(32, 1 + e, dtype=np.float32)
    b = np.full(32, 1 - e, dtype=np.float32)
    c = np.full(32, -1, dtype=np.float32)
    out = np.zeros(32, dtype=np.float32)
    run(fma_kernel, 1, 32, a, b, c, out)
    np.testing.assert_array_equal(out, np.float32(-(2.0**-46)))
