"""sum / amax / amin / dot on the CPU kernels against float64 NumPy."""

import math

import numpy as np
import pytest
from numpy.exceptions import AxisError

import softkern as sk
from softkern.testing.references import EXACT

OPS = ("sum", "amax", "amin")
FLOATS = (np.float32, np.float64)


def random_array(rng, shape, dtype):
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def assert_close_to_reference(op, got, x, dim=None, keepdim=False):
    ref = EXACT[op](x, dim, keepdim)
    got = np.asarray(got)
    assert got.shape == ref.shape
    if op != "sum" or x.dtype.kind == "i":
        np.testing.assert_array_equal(got, ref)
        return
    # Error bound of a float sum: a few ulps of sum(|x|) per level of the
    # fold tree, plus the serial part of each thread's accumulation.
    n = max(1, x.size // max(1, ref.size))
    scale = EXACT["sum"](np.abs(x), dim, keepdim)
    tol = 4 * np.finfo(x.dtype).eps * (math.log2(n) + 2) * scale
    assert np.all(np.abs(got - ref) <= tol)


SHAPES_AND_DIMS = [
    ((1,), 0),
    ((1000,), None),
    ((1000,), 0),
    ((257,), -1),
    ((7, 45), 0),
    ((7, 45), 1),
    ((7, 45), (0, 1)),
    ((3, 5, 33), 0),
    ((3, 5, 33), 1),
    ((3, 5, 33), 2),
    ((3, 5, 33), (0, 2)),  # dims apart: permuted to the end, then rows
    ((3, 5, 33), (1, 2)),
    ((2, 3, 4, 5), 0),
    ((2, 3, 4, 5), 1),
    ((2, 3, 4, 5), 2),
    ((2, 3, 4, 5), 3),
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (0, 1, 2)),
    ((2, 3, 4, 5), ()),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
def test_matches_reference(rng, op, dtype, shape, dim):
    x = random_array(rng, shape, dtype)
    for keepdim in (False, True):
        got = getattr(sk, op)(x, dim, keepdim)
        assert isinstance(got, np.ndarray)
        assert_close_to_reference(op, got, x, dim, keepdim)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("strategy", [0, 1, 2])
@pytest.mark.parametrize("block", [32, 64, 256, 1024])
def test_every_strategy_and_block(rng, op, strategy, block):
    x = random_array(rng, (5, 3000), np.float32)
    for dim in (None, 0, 1):
        got = getattr(sk, op)(x, dim, reduce=strategy, block=block)
        assert_close_to_reference(op, got, x, dim)


def test_dtypes_of_results(rng):
    assert sk.sum(np.arange(5, dtype=np.int32)).dtype == np.int64
    assert sk.amax(np.arange(5, dtype=np.int32)).dtype == np.int32
    assert sk.sum(np.ones(3, np.float32)).dtype == np.float32
    assert sk.sum([1.5, 2.5]).dtype == np.float64
    full = sk.sum(random_array(rng, (4, 4), np.float32))
    assert full.shape == () and isinstance(float(full), float)


def test_int_sum_accumulates_in_int64():
    x = np.full(3000, np.iinfo(np.int32).max, np.int32)
    assert int(sk.sum(x)) == 3000 * int(np.iinfo(np.int32).max)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::3],
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: a[::-1, 1:],
        lambda a: a.transpose(1, 0)[::2],
    ],
)
def test_non_contiguous_inputs(rng, view):
    x = view(random_array(rng, (40, 66), np.float64))
    for op in OPS:
        for dim in (None, 0, 1):
            assert_close_to_reference(op, getattr(sk, op)(x, dim), x, dim)


def test_non_contiguous_4d(rng):
    x = random_array(rng, (6, 5, 8, 7), np.float32).transpose(3, 1, 0, 2)[:, ::2]
    for dim in (0, 1, 2, 3, (0, 2), (1, 2)):
        assert_close_to_reference("sum", sk.sum(x, dim), x, dim)
        assert_close_to_reference("amax", sk.amax(x, dim), x, dim)


def test_nan_and_inf_propagate_as_in_torch():
    x = np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0], [np.inf, 1.0, -np.inf]])
    np.testing.assert_array_equal(sk.amax(x, 1), [np.nan, 6.0, np.inf])
    np.testing.assert_array_equal(sk.amin(x, 1), [np.nan, 4.0, -np.inf])
    np.testing.assert_array_equal(sk.sum(x, 1), [np.nan, 15.0, np.nan])
    np.testing.assert_array_equal(sk.amax(x, 0), [np.inf, np.nan, 6.0])
    assert np.isnan(sk.amax(x)) and np.isnan(sk.sum(x))
    big = np.full(10, np.inf, np.float32)
    assert sk.sum(big) == np.inf
    nan_last = np.arange(1000, dtype=np.float32)
    nan_last[-1] = np.nan
    for r in (0, 1, 2):
        assert np.isnan(sk.amax(nan_last, reduce=r))
        assert np.isnan(sk.amin(nan_last, reduce=r))


def test_empty_arrays():
    assert float(sk.sum(np.empty(0, np.float32))) == 0.0
    np.testing.assert_array_equal(sk.sum(np.empty((3, 0)), 1), np.zeros(3))
    assert sk.sum(np.empty((0, 4)), 1).shape == (0,)
    assert sk.amax(np.empty((0, 4)), 1).shape == (0,)
    assert sk.sum(np.empty((0, 4)), 0, keepdim=True).shape == (1, 4)
    with pytest.raises(IndexError, match="size 0"):
        sk.amax(np.empty((3, 0)), 1)
    with pytest.raises(IndexError, match="size 0"):
        sk.amin(np.empty(0))
    # dims apart, one of them empty: rows of no elements, as torch.sum
    np.testing.assert_array_equal(sk.sum(np.empty((0, 3, 4)), (0, 2)), np.zeros(3))
    assert sk.sum(np.empty((2, 0, 3)), (0, 2)).shape == (0,)
    np.testing.assert_array_equal(
        sk.logsumexp(np.empty((0, 3, 4)), (0, 2)), np.full(3, -np.inf)
    )


def test_zero_dim_arrays():
    x = np.array(2.5, np.float32)
    for dim in (None, 0, -1, ()):
        for op in OPS:
            got = getattr(sk, op)(x, dim)
            assert got.shape == () and float(got) == 2.5
    assert sk.sum(x, 0, keepdim=True).shape == ()
    with pytest.raises(AxisError):
        sk.sum(x, 1)


def test_inputs_are_never_modified(rng):
    x = random_array(rng, (9, 70), np.float32)
    y = random_array(rng, 70, np.float32)
    before_x, before_y = x.copy(), y.copy()
    for op in OPS:
        for dim in (None, 0, 1, (0, 1)):
            getattr(sk, op)(x, dim)
    sk.dot(x[0], y)
    np.testing.assert_array_equal(x, before_x)
    np.testing.assert_array_equal(y, before_y)


def test_bad_arguments():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(AxisError):
        sk.sum(x, 2)
    with pytest.raises(AxisError):
        sk.amax(x, (0, -3))
    with pytest.raises(ValueError, match="reduce"):
        sk.sum(x, reduce=3)
    with pytest.raises(ValueError, match="block"):
        sk.sum(x, block=48)
    for bad in (np.complex64, np.uint16, np.uint32):  # float16, bool, int8: test_dtypes
        with pytest.raises(TypeError, match="dtype"):
            sk.sum(np.ones(3, bad))
    with pytest.raises(TypeError, match="accepted"):
        sk.sum({"a": 1})
    with pytest.raises(TypeError, match="accepted"):
        sk.sum("abc")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 31, 33, 1000, 300_001])
def test_dot_matches_reference(rng, dtype, n):
    x, y = random_array(rng, n, dtype), random_array(rng, n, dtype)
    for r in (0, 1, 2):
        got = sk.dot(x, y, reduce=r)
        assert got.shape == () and got.dtype == dtype
        ref = EXACT["dot"](x, y)
        scale = EXACT["dot"](np.abs(x), np.abs(y))
        eps = np.finfo(dtype).eps
        assert abs(float(got) - ref) <= 4 * eps * (math.log2(n + 2) + 2) * scale


def test_dot_non_contiguous_and_errors(rng):
    x = random_array(rng, 3000, np.float64)
    y = random_array(rng, 1500, np.float64)
    assert np.isclose(float(sk.dot(x[::2], y)), np.dot(x[::2], y), rtol=1e-12)
    assert np.isclose(float(sk.dot(x[::-2], y)), np.dot(x[::-2], y), rtol=1e-12)
    with pytest.raises(ValueError, match="same length"):
        sk.dot(x, y)
    with pytest.raises(ValueError, match="1-D"):
        sk.dot(x.reshape(2, -1), x.reshape(2, -1))
    with pytest.raises(TypeError, match="one dtype"):
        sk.dot(y, y.astype(np.float32))
    with pytest.raises(TypeError, match="dtype"):
        sk.dot(np.arange(3), np.arange(3))


def test_dot_rounds_each_product_once():
    # fma(1+e, 1-e, -1) = -e**2 exactly; a separate multiply rounds it to 0.
    e = np.float32(2.0**-12)
    x = np.array([1 + e, 1.0], np.float32)
    y = np.array([1 - e, -1.0], np.float32)
    assert float(sk.dot(x, y)) == -(2.0**-24)


def test_strategies_differ_only_in_order(rng):
    # Same data, three association orders: close, and each one repeatable.
    x = random_array(rng, 100_000, np.float32)
    results = {r: float(sk.sum(x, reduce=r)) for r in (0, 1, 2)}
    for r, value in results.items():
        assert float(sk.sum(x, reduce=r)) == value
        assert math.isclose(value, float(np.sum(x, dtype=np.float64)), rel_tol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 17])
@pytest.mark.parametrize(
    ("grid", "block", "parallel"),
    [
        (8, 32, False),  # one accumulator tile, on the calling thread
        (512, 128, True),  # 65536 accumulators: two tiles in parallel
    ],
)
def test_cpu_stage_keeps_each_threads_order(rng, rows, grid, block, parallel):
    # A NumPy model of stage 1 with reduce=1: accumulator t adds x[t + k*S]
    # for k = 0, 1, ... in order (elementwise float32 adds are exact IEEE
    # operations), then each block halves. Every partial must match bit for
    # bit, so an unrolled CPU loop that reorders a single add is caught.
    # rows=0 folds the blocks straight from x; the others stream x through
    # the accumulators.
    from softkern.cpu.reduce import SUM, full_stage

    stride = grid * block
    x = rng.standard_normal(rows * stride + 7).astype(np.float32)
    acc = np.zeros(stride, np.float32)
    for k in range(rows):
        acc += x[k * stride : (k + 1) * stride]
    acc[:7] += x[rows * stride :]
    parts = acc.reshape(grid, block)
    s = block // 2
    while s:
        parts[:, :s] += parts[:, s : 2 * s]
        s //= 2
    got = full_stage(SUM, x, grid, block, 1, np.float32(0), parallel)
    assert got.tobytes() == parts[:, 0].tobytes()
