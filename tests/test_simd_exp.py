"""The branch-free exp of softkern.cpu.simd_exp, over the whole float range."""

import numpy as np
import pytest

from softkern.cpu.simd_exp import exp_array


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Units in the last place between floats of one dtype (same sign here)."""
    ints = np.int32 if a.dtype == np.float32 else np.int64
    return np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64))


def test_float32_every_4099th_bit_pattern_within_2_ulp():
    # Walk the bit patterns of all positive and negative float32 values (a
    # prime step reaches every exponent and many mantissas), where exp is
    # finite and non-zero; the reference is float64 exp rounded to float32.
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (x > -103.0) & (x < 88.7)]
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    got = exp_array(x)
    normal = ref >= np.finfo(np.float32).tiny
    assert ulp_distance(got[normal], ref[normal]).max() <= 2
    # Subnormal results: absolute error within 1 unit of the least subnormal.
    tiny = np.float32(2.0**-149)
    assert np.all(np.abs(got[~normal] - ref[~normal]) <= tiny)


def test_float64_random_over_range_within_2_ulp(rng):
    x = np.concatenate(
        [
            rng.uniform(-708, 709.7, 1_000_000),
            rng.uniform(-1, 1, 100_000),
            rng.standard_normal(100_000) * 1e-10,
        ]
    )
    ref = np.exp(x.astype(np.longdouble)).astype(np.float64)
    got = exp_array(x)
    assert ulp_distance(got, ref).max() <= 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_as_exp(dtype):
    big = 89.0 if dtype == np.float32 else 710.0
    small = -104.0 if dtype == np.float32 else -746.0
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, big, 1e4, small, -1e4], dtype)
    got = exp_array(x)
    want = np.array([1, 1, np.inf, 0, np.nan, np.inf, np.inf, 0, 0], dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormal_results_and_the_edge_of_overflow(dtype):
    info = np.finfo(dtype)
    lo = np.log(info.smallest_subnormal) if hasattr(info, "smallest_subnormal") else 0
    x = np.linspace(float(lo) + 0.5, np.log(float(info.max)) - 1e-3, 20_001)
    x = x.astype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.longdouble)).astype(dtype)
    got = exp_array(x)
    assert np.all(np.isfinite(got)) and np.all(got > 0)
    rel = np.abs(got.astype(np.float64) - ref) / ref
    normal = ref >= info.tiny
    assert rel[normal].max() <= 2 * info.eps


# --- exp_nonpositive: exp(t) for t <= 0, the softmax's x - max --------------


def test_nonpositive_float32_every_101st_negative_bit_pattern():
    # Every 101st float32 from -0 down to the clamp at -104, subnormal
    # results included (checked exhaustively once: at most 1 ulp).
    start, stop = 0x80000000, int(np.array(-104.0, np.float32).view(np.uint32))
    bits = np.arange(start, stop + 1, 101, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    with np.errstate(under="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    got = exp_array(x, nonpositive=True)
    normal = ref >= np.finfo(np.float32).tiny
    assert ulp_distance(got[normal], ref[normal]).max() <= 1
    tiny = np.float32(2.0**-149)
    assert np.all(np.abs(got[~normal] - ref[~normal]) <= tiny)
    assert (~normal).sum() > 1000  # the subnormal range was crossed


def test_nonpositive_float64_random_within_1_ulp(rng):
    x = -np.concatenate([rng.uniform(0, 745, 1_000_000), rng.uniform(0, 1e-3, 1000)])
    ref = np.exp(x.astype(np.longdouble)).astype(np.float64)
    got = exp_array(x, nonpositive=True)
    normal = ref >= np.finfo(np.float64).tiny
    assert ulp_distance(got[normal], ref[normal]).max() <= 1
    assert np.all(np.abs(got[~normal] - ref[~normal]) <= 5e-324)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonpositive_special_values(dtype):
    lowest = -104.0 if dtype == np.float32 else -746.0
    x = np.array([0.0, -0.0, -np.inf, np.nan, lowest, -1e4, lowest - 1], dtype)
    got = exp_array(x, nonpositive=True)
    np.testing.assert_array_equal(got, np.array([1, 1, 0, np.nan, 0, 0, 0], dtype))
    # the same results as the general exp wherever both are defined
    y = -np.geomspace(1e-30, 100, 10_001).astype(dtype)
    np.testing.assert_allclose(exp_array(y, True), exp_array(y), rtol=4e-7, atol=0)
