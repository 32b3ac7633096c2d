"""GPU softmax kernels (the CUDA simulator without a GPU): every regime of
``softmax_plan`` against float64 references, softmax and log_softmax with
every reduction strategy, logsumexp and the backward passes with reduce=2.

The simulator runs a Python thread per CUDA thread, so rows are short and
the plan's limits are lowered (``small_regimes``) to reach the shared-memory
and streaming regimes with rows of a few dozen elements; `small_grid` caps
the grid at 4 blocks so blocks walk several rows. On a real GPU the same
tests run with the real limits and blocks.
"""

import numpy as np
import pytest
from helpers import GPU_BLOCKS, SIMULATOR, to_gpu, to_host
from numba import cuda
from scipy import special
from test_softmax_cpu import (
    check_log_softmax,
    check_softmax,
    ref_log_softmax,
    ref_softmax,
)

import softkern as sk
from softkern import _launch

pytestmark = pytest.mark.usefixtures("small_grid")

BLOCK = GPU_BLOCKS[0]


@pytest.fixture
def small_regimes(monkeypatch):
    """Rows over 64 float32 leave the warp regime and rows over 128 leave
    shared memory, so short rows reach all three row regimes."""
    if SIMULATOR:
        monkeypatch.setattr(_launch, "WARP_ROW_BYTES", 256)
        monkeypatch.setattr(_launch, "SHARED_ROW_BYTES", 512)


def small(shape_sim, shape_gpu):
    return shape_sim if SIMULATOR else shape_gpu


# (shape, dim, regime): comments name the branch each shape hits.
CASES = [
    (small((9, 40), (4096, 250)), 1, "warp"),  # rows of 40: 2 values a lane
    (small((3, 100), (64, 8000)), 1, "shared"),  # block per row, cached
    (small((3, 150), (16, 20000)), -1, "stream"),  # block per row, read twice
    (small((5, 4, 37), (64, 128, 512)), 1, "columns"),  # 37 columns: 2 tiles
    (small((70, 3), (4096, 4096)), 0, "columns"),  # long columns
]


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize("strategy", [0, 1, 2])
@pytest.mark.parametrize(("shape", "dim", "regime"), CASES)
def test_every_regime_and_strategy(rng, shape, dim, regime, strategy):
    assert sk.softmax_plan(shape, dim, np.float32, BLOCK).regime == regime
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    d = to_gpu(x)
    y = sk.softmax(d, dim, reduce=strategy, block=BLOCK)
    assert sk.device_of(y) == "cuda"  # the kind of array it was given
    check_softmax(to_host(y), x, dim, np.float32)
    ly = sk.log_softmax(d, dim, reduce=strategy, block=BLOCK)
    check_log_softmax(to_host(ly), x, dim, np.float32)
    np.testing.assert_array_equal(to_host(d), x)  # input untouched


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize(("shape", "dim", "regime"), CASES)
def test_logsumexp_and_backward_every_regime(rng, shape, dim, regime):
    x = rng.standard_normal(shape).astype(np.float32) * 5
    g = rng.standard_normal(shape).astype(np.float32)
    d = to_gpu(x)
    lse = to_host(sk.logsumexp(d, dim, block=BLOCK))
    ref = special.logsumexp(x.astype(np.float64), dim)
    np.testing.assert_allclose(lse, ref, rtol=1e-6, atol=1e-6)
    y, ly = ref_softmax(x, dim).astype(np.float32), ref_log_softmax(x, dim)
    ly = ly.astype(np.float32)
    got = to_host(sk.softmax_backward(to_gpu(g), to_gpu(y), dim, block=BLOCK))
    np.testing.assert_allclose(got, sk.softmax_backward(g, y, dim), 1e-5, 1e-6)
    got = to_host(sk.log_softmax_backward(to_gpu(g), to_gpu(ly), dim, block=BLOCK))
    np.testing.assert_allclose(got, sk.log_softmax_backward(g, ly, dim), 1e-5, 1e-6)


SPECIAL_ROWS = (
    [1.0, -np.inf, 2.0],  # -inf among finite values: 0 there
    [np.inf, 1.0, 2.0],  # +inf: the slice is NaN
    [np.nan, 1.0, 2.0],  # NaN: the slice is NaN
    [-np.inf, -np.inf, -np.inf],  # only -inf: NaN (logsumexp: -inf)
    [0.5, 1.5, -0.5],  # finite: untouched by its neighbours
)


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize("width", [30, 90, 150])  # warp, shared, stream
def test_special_values_every_row_regime(width):
    # each row repeats its own pattern, so every thread meets the special value
    x = np.array([np.resize(row, width) for row in SPECIAL_ROWS], np.float32)
    for dim, data in ((1, x), (0, x.T.copy())):
        got = to_host(sk.softmax(to_gpu(data), dim, block=BLOCK))
        expected = sk.softmax(data, dim)  # the CPU, tested against PyTorch's rules
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
        lse = to_host(sk.logsumexp(to_gpu(data), dim, block=BLOCK))
        np.testing.assert_allclose(lse, sk.logsumexp(data, dim), rtol=1e-6)
    assert np.isnan(sk.softmax(x, 1)[1:4]).all()


@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize(
    ("shape", "dim", "strategy"),
    [
        (small((3, 700), (4, 2**22)), 1, 0),  # 3 rows, 3 segments each
        (small((3, 700), (4, 2**22)), 1, 1),
        (small((3, 700), (4, 2**22)), 1, 2),
        (small((1, 2000), (1, 10**7)), -1, 2),  # one row, 8 segments
        (small((2, 2, 300), (2, 2, 2**21)), 2, 1),  # 4 rows of a 3-D array
    ],
)
def test_few_long_rows_split(rng, shape, dim, strategy):
    assert sk.softmax_plan(shape, dim, np.float32, BLOCK).regime == "split"
    x = (rng.standard_normal(shape) * 20).astype(np.float32)
    d = to_gpu(x)
    check_softmax(
        to_host(sk.softmax(d, dim, reduce=strategy, block=BLOCK)), x, dim, np.float32
    )
    ly = sk.log_softmax(d, dim, reduce=strategy, block=BLOCK)
    check_log_softmax(to_host(ly), x, dim, np.float32)
    lse = to_host(sk.logsumexp(d, dim, reduce=strategy, block=BLOCK))
    np.testing.assert_allclose(lse, special.logsumexp(x.astype(np.float64), dim), 1e-6)
    np.testing.assert_array_equal(to_host(d), x)


@pytest.mark.usefixtures("split_rows")
def test_split_special_values_and_dtypes():
    # a row per pattern, repeated so that every segment meets its value; a
    # row of -inf only in its first segment
    rows = [np.resize(row, 600) for row in SPECIAL_ROWS]
    rows.append(np.concatenate([np.full(300, -np.inf), np.ones(300)]))
    x = np.array(rows, np.float64)
    assert sk.softmax_plan(x.shape, 1, np.float64, BLOCK).regime == "split"
    with np.errstate(invalid="ignore"):
        for fn in (sk.softmax, sk.log_softmax):
            got = to_host(fn(to_gpu(x), 1, block=BLOCK))
            np.testing.assert_allclose(got, fn(x, 1), rtol=1e-12, atol=1e-300)
        lse = to_host(sk.logsumexp(to_gpu(x), 1, block=BLOCK))
        np.testing.assert_allclose(lse, sk.logsumexp(x, 1), rtol=1e-12)
        half = x.astype(np.float16)  # computed in float32, rounded once
        got = to_host(sk.softmax(to_gpu(half), 1, block=BLOCK))
        np.testing.assert_allclose(got, sk.softmax(half, 1), rtol=1e-3, atol=1e-7)


@pytest.mark.usefixtures("small_regimes")
def test_nan_seen_by_only_some_threads_poisons_the_slice():
    # columns: with 64 threads a block, two threads share each column, and
    # one of them sees only the NaN; stream: even threads see only NaN.
    cases = [
        (np.array([[np.nan, np.nan], [1.0, 2.0]], np.float32), 0, GPU_BLOCKS[1]),
        (np.array([[np.nan, 1.0] * 80], np.float32), 1, BLOCK),
    ]
    for x, dim, block in cases:
        for fn in (sk.softmax, sk.log_softmax):
            got = to_host(fn(to_gpu(x), dim, block=block))
            assert np.isnan(got).all(), (fn.__name__, x.shape, got)


def test_dtype_float16_rounds_first_on_the_gpu():
    x = np.array([[70000.0, 0.0], [1.0, 2.0]])
    got = to_host(sk.softmax(to_gpu(x), 1, dtype=np.float16, block=BLOCK))
    assert got.dtype == np.float16 and np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1], ref_softmax(x[1:], 1)[0], rtol=1e-3)


def test_dtypes_on_the_gpu(rng):
    x = rng.standard_normal((4, 40))
    got = to_host(sk.softmax(to_gpu(x), 1, block=BLOCK))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref_softmax(x, 1), rtol=1e-13)
    h = x.astype(np.float16)
    got = to_host(sk.log_softmax(to_gpu(h), 0, block=BLOCK))
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, ref_log_softmax(h, 0), rtol=5e-4, atol=5e-4)
    ints = rng.integers(-3, 3, (3, 20)).astype(np.int32)
    got = to_host(sk.softmax(to_gpu(ints), 1, dtype=np.float32, block=BLOCK))
    np.testing.assert_allclose(got, ref_softmax(ints, 1), rtol=5e-6)
    with pytest.raises(TypeError, match="dtype="):
        sk.softmax(to_gpu(ints), 1)


def test_strided_device_input_and_zero_d(rng):
    base = rng.standard_normal((6, 20)).astype(np.float32)
    d = to_gpu(base)
    view = d[::2, 1::3]  # a strided device view, read in place
    got = to_host(sk.softmax(view, 1, block=BLOCK))
    np.testing.assert_allclose(got, ref_softmax(base[::2, 1::3], 1), rtol=5e-6)
    scalar = cuda.to_device(np.array(4.0, np.float32))
    assert float(sk.softmax(scalar, 0, block=BLOCK)) == 1.0
    assert float(sk.log_softmax(scalar, 0, block=BLOCK)) == 0.0
    assert sk.softmax(to_gpu(np.empty((3, 0), np.float32)), 1).shape == (3, 0)


def test_out_on_the_gpu_and_mixed_devices(rng):
    x = rng.standard_normal((3, 20)).astype(np.float32)
    out = cuda.device_array_like(x)
    assert sk.softmax(to_gpu(x), 1, out=out, block=BLOCK) is out
    np.testing.assert_allclose(to_host(out), ref_softmax(x, 1), rtol=5e-6)
    with pytest.raises(TypeError):
        sk.softmax(x, 1, out=out)
    with pytest.raises(TypeError):
        sk.softmax_backward(to_gpu(x), x, 1)
