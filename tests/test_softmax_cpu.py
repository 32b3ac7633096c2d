"""softmax, log_softmax, logsumexp and the backward passes on the CPU.

References are float64 NumPy; PyTorch's semantics (special values, legacy
dim, backward formulas) are checked against torch itself when it is
installed and against hand-written expectations always.
"""

import tracemalloc
import warnings

import numpy as np
import pytest
from numpy.exceptions import AxisError
from scipy import special

import softkern as sk
from softkern import _launch
from softkern.cpu import softmax as cpu_softmax
from softkern.testing.references import EXACT

try:
    import torch
except ImportError:  # torch is an optional oracle
    torch = None


# float64 references, shared with the benchmarks
ref_softmax = EXACT["softmax"]
ref_log_softmax = EXACT["log_softmax"]


# The bounds. float32 softmax's own floor: x - max is rounded to
# float32 (up to 2**-18 absolute error for |x - max| < 69, where results
# exceed 1e-30), which is 3.8e-6 relative after exp.
TOLERANCE = {
    np.float32: {"softmax": 5e-6, "log_softmax": 1e-5},
    np.float64: {"softmax": 1e-13, "log_softmax": 1e-12},
}

SHAPES = [
    ((7, 5), 1),  # rows, short
    ((7, 5), 0),  # columns
    ((3, 4, 5), 1),  # columns, outer > 1
    ((3, 4, 5), 2),  # rows of 5
    ((3, 4, 5), 0),  # columns, outer == 1
    ((2, 3000), -1),  # rows longer than a vector of lanes, ragged tail
    ((5,), 0),  # one row
    ((2, 3, 2, 5), 2),  # columns inside a 4-d array
    ((3, 2100), 0),  # columns: several strips on the CPU
]


def check_softmax(y, x, dim, dtype):
    ref = ref_softmax(x, dim)
    assert y.shape == x.shape and y.dtype == dtype
    big = ref > 1e-30
    rel = np.abs(y[big] - ref[big]) / ref[big]
    assert rel.max(initial=0) <= TOLERANCE[dtype]["softmax"]
    # tiny results: absolute error only (they may underflow)
    assert np.all(np.abs(y[~big] - ref[~big]) <= 1e-30)


def check_log_softmax(y, x, dim, dtype):
    ref = ref_log_softmax(x, dim)
    assert y.shape == x.shape and y.dtype == dtype
    err = np.abs(y - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max(initial=0) <= TOLERANCE[dtype]["log_softmax"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: exp overflows unshifted
@pytest.mark.parametrize(("shape", "dim"), SHAPES)
def test_matches_float64_reference(rng, shape, dim, scale, dtype):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    check_softmax(sk.softmax(x, dim), x, dim, dtype)
    check_log_softmax(sk.log_softmax(x, dim), x, dim, dtype)


def test_agrees_with_scipy(rng):
    x = rng.standard_normal((6, 300))
    np.testing.assert_allclose(sk.softmax(x, 1), special.softmax(x, axis=1), 1e-13)
    np.testing.assert_allclose(
        sk.log_softmax(x, 0), special.log_softmax(x, axis=0), 1e-12
    )


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize(("shape", "dim"), SHAPES)
def test_agrees_with_torch(rng, shape, dim):
    x = rng.standard_normal(shape).astype(np.float32) * 10
    t = torch.from_numpy(x)
    np.testing.assert_allclose(
        sk.softmax(x, dim), torch.softmax(t, dim).numpy(), rtol=2e-5, atol=1e-37
    )
    np.testing.assert_allclose(
        sk.log_softmax(x, dim), torch.log_softmax(t, dim).numpy(), atol=2e-5
    )


def test_rows_sum_to_one_long_rows(rng):
    # rows far longer than any cache, float32 sums accumulated in float64
    x = rng.standard_normal((2, 300_001)).astype(np.float32)
    y = sk.softmax(x, 1)
    np.testing.assert_allclose(y.astype(np.float64).sum(1), 1.0, rtol=1e-5)
    check_softmax(y, x, 1, np.float32)


# --- special values (PyTorch's) ---------------------------------------------

INF = np.inf


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_follow_pytorch(dtype, dim):
    rows = np.array(
        [
            [1.0, -INF, 2.0],  # -inf among finite: 0 there
            [INF, 1.0, 2.0],  # +inf: the slice is NaN
            [np.nan, 1.0, 2.0],  # NaN: the slice is NaN
            [-INF, -INF, -INF],  # only -inf: NaN
            [3.0, 3.0, 3.0],  # ties
        ],
        dtype,
    )
    x = rows if dim == 1 else rows.T.copy()
    y, ly = sk.softmax(x, dim), sk.log_softmax(x, dim)
    if dim == 0:
        y, ly = y.T, ly.T
    e = np.exp(np.array([1.0, 2.0]) - 2.0)
    np.testing.assert_allclose(y[0], [e[0] / e.sum(), 0, e[1] / e.sum()], 1e-6)
    assert ly[0, 1] == -INF
    for r in (1, 2, 3):
        assert np.isnan(y[r]).all() and np.isnan(ly[r]).all()
    np.testing.assert_allclose(y[4], 1 / 3, 1e-6)
    # NaN stays inside its slice
    assert np.isfinite(y[[0, 4]]).all()
    if torch is not None:
        t = torch.from_numpy(x)
        np.testing.assert_allclose(
            y,
            torch.softmax(t, dim).numpy().T
            if dim == 0
            else torch.softmax(t, dim).numpy(),
            1e-6,
        )


def long_rows_with_special_values(dtype):
    """Rows of 9000 (three CPU tiles of 4096, the last ragged) with the
    special values placed in different tiles."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 9000)).astype(dtype)
    x[0, :5000] = -INF  # a first tile of -inf only, then finite
    x[1] = -INF  # only -inf: NaN
    x[2, 8000] = np.nan  # NaN in the last tile: the row is NaN
    x[3, 6000] = INF  # +inf in the middle tile: the row is NaN
    x[4, [10, 8500]] = 9.0  # the max tied across the first and last tiles
    x[5, 8999] = 12.0  # the max in the last tile's last element
    x[6, 4096:8192] = -INF  # a middle tile of -inf only
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_in_long_rows_follow_pytorch(dtype):
    # (7, 9000)  # rows regime, tiled: tile maxima merged, rescaled per tile
    x = long_rows_with_special_values(dtype)
    y, ly = sk.softmax(x, 1), sk.log_softmax(x, 1)
    for r in (1, 2, 3):
        assert np.isnan(y[r]).all() and np.isnan(ly[r]).all()
    finite = [0, 4, 5, 6]
    assert np.isfinite(y[finite]).all()
    assert (y[0, :5000] == 0).all() and (ly[0, :5000] == -INF).all()
    assert (y[6, 4096:8192] == 0).all()
    np.testing.assert_allclose(y[finite].astype(np.float64).sum(1), 1.0, rtol=1e-5)
    assert y[4, 10] == y[4, 8500]
    check_softmax(y[finite], x[finite], 1, dtype)
    ref = ref_log_softmax(x[finite], 1)
    kept = np.isfinite(ref)
    err = np.abs(ly[finite][kept] - ref[kept]) / np.maximum(1.0, np.abs(ref[kept]))
    assert err.max() <= TOLERANCE[dtype]["log_softmax"]
    if torch is not None:
        t = torch.from_numpy(x.astype(np.float64))
        np.testing.assert_allclose(y, torch.softmax(t, 1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(ly, torch.log_softmax(t, 1).numpy(), rtol=1e-5)


def test_zero_d_and_empty():
    x = np.float32(3.5)
    assert sk.softmax(np.asarray(x), 0) == 1.0
    assert sk.softmax(np.asarray(x), -1).shape == ()
    assert sk.log_softmax(np.asarray(x), 0) == 0.0
    empties = [((0,), 0), ((0, 4), 1), ((3, 0), 1), ((3, 0), 0), ((2, 0, 3), 2)]
    for shape, dim in empties:
        x = np.empty(shape, np.float32)
        for fn in (sk.softmax, sk.log_softmax):
            y = fn(x, dim)
            assert y.shape == shape and y.dtype == np.float32


def test_legacy_dim_warns_and_picks_pytorchs():
    cases = {(): 0, (4,): 0, (3, 4): 1, (2, 3, 4): 0, (2, 3, 4, 5): 1}
    rng = np.random.default_rng(0)
    for shape, dim in cases.items():
        x = rng.standard_normal(shape)
        with pytest.warns(UserWarning, match=f"dim={dim}"):
            y = sk.softmax(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(y, sk.softmax(x, dim))


def test_result_does_not_depend_on_where_out_lies(rng):
    # LLVM's overlap test picked the fused loop's vectorised or scalar copy
    # from out's address: an out just after x changed the result by an ulp.
    for dtype, width in ((np.float64, 4), (np.float32, 7), (np.float64, 600)):
        buf = np.empty(40 * width, dtype)
        x = buf[: 3 * width].reshape(3, width)  # rows regime, 3 rows
        x[:] = rng.standard_normal(x.shape)
        expected = sk.softmax(x.copy(), 1)
        for start in range(3 * width, 3 * width + 40):
            out = buf[start : start + 3 * width].reshape(3, width)
            out[:] = np.nan
            np.testing.assert_array_equal(sk.softmax(x, 1, out=out), expected)
        in_place = x.copy()
        sk.softmax(in_place, 1, out=in_place)
        if x.nbytes < cpu_softmax.ALIAS_REACH:
            np.testing.assert_array_equal(in_place, expected)
        else:  # the fused loop's order against the separate sum's
            np.testing.assert_allclose(in_place, expected, rtol=1e-15, atol=0)


# --- dtypes -------------------------------------------------------------------


def test_dtype_float16_rounds_before_computing():
    # as torch.softmax(x, dtype=torch.half): 70000 becomes inf first
    x = np.array([[70000.0, 0.0], [1.0, 2.0]])
    y = sk.softmax(x, 1, dtype=np.float16)
    assert y.dtype == np.float16
    assert np.isnan(y[0]).all()
    np.testing.assert_allclose(y[1], ref_softmax(x[1:], 1)[0], rtol=1e-3)


def test_dtype_casts_first(rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    y = sk.softmax(x, 1, dtype=np.float64)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref_softmax(x, 1), rtol=1e-13)
    ints = rng.integers(-5, 5, (3, 7))
    for dtype in (np.float32, "float64"):
        y = sk.log_softmax(ints, 1, dtype=dtype)
        assert y.dtype == np.dtype(dtype)
        np.testing.assert_allclose(y, ref_log_softmax(ints, 1), atol=1e-5)
    if torch is not None:
        assert sk.softmax(x, 1, dtype=torch.float64).dtype == np.float64


def test_float16_computes_in_float32(rng):
    x = (rng.standard_normal((5, 40)) * 4).astype(np.float16)
    y = sk.softmax(x, 1)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, ref_softmax(x, 1), rtol=2e-3, atol=1e-7)
    # float16 keeps 11 bits: half an ulp is up to 2**-11 relative
    np.testing.assert_allclose(
        sk.log_softmax(x, 0), ref_log_softmax(x, 0), rtol=5e-4, atol=5e-4
    )


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_input_is_a_type_error_suggesting_dtype(dtype):
    x = np.ones((2, 3), dtype)
    with pytest.raises(TypeError, match="dtype="):
        sk.softmax(x, 1)


def test_bad_dtype_argument():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        sk.softmax(x, 1, dtype=np.int32)
    with pytest.raises(TypeError, match="cannot cast"):
        sk.softmax(np.ones(3, np.complex64), 0, dtype=np.float32)


# --- layout ---------------------------------------------------------------


def test_non_contiguous_inputs(rng):
    base = rng.standard_normal((6, 40, 8)).astype(np.float32)
    views = [
        base[:, ::3, :],  # step along the dim
        base.transpose(2, 0, 1),  # transposed
        base[::2, :, 1:7],  # steps and offsets outside the dim
        base.transpose(1, 2, 0)[::-1],  # reversed
    ]
    for v in views:
        for dim in range(v.ndim):
            np.testing.assert_allclose(
                sk.softmax(v, dim), ref_softmax(v, dim), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                sk.log_softmax(v, dim), ref_log_softmax(v, dim), atol=1e-5
            )


def test_inputs_are_not_modified(rng):
    x = rng.standard_normal((5, 6))
    keep = x.copy()
    g = rng.standard_normal((5, 6))
    keep_g = g.copy()
    y = sk.softmax(x, 1)
    sk.log_softmax(x, 0)
    sk.logsumexp(x, (0, 1))
    sk.softmax_backward(g, y, 1)
    np.testing.assert_array_equal(x, keep)
    np.testing.assert_array_equal(g, keep_g)


def test_bad_dims():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(AxisError):
        sk.softmax(x, 2)
    with pytest.raises(AxisError):
        sk.log_softmax(x, -3)
    with pytest.raises(AxisError):
        sk.softmax(np.float32(1.0), 1)
    with pytest.raises(TypeError):
        sk.softmax(x, (0, 1))
    with pytest.raises(TypeError):
        sk.softmax(x, True)


def test_out_argument(rng):
    x = rng.standard_normal((4, 33)).astype(np.float32)
    out = np.full_like(x, np.nan)
    assert sk.softmax(x, 1, out=out) is out
    np.testing.assert_allclose(out, ref_softmax(x, 1), rtol=5e-6)
    inplace = x.copy()
    sk.log_softmax(inplace, 0, out=inplace)
    np.testing.assert_allclose(inplace, ref_log_softmax(x, 0), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        sk.softmax(x, 1, out=np.empty((4, 32), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        sk.softmax(x, 1, out=np.empty((4, 33), np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        sk.softmax(x, 1, out=np.empty((33, 4), np.float32).T)
    with pytest.raises(TypeError, match="array"):
        sk.softmax(x[0], 0, out=[0.0] * 33)
    buffer = rng.standard_normal(16).astype(np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        sk.softmax(buffer[:6].reshape(2, 3), 0, out=buffer[2:8].reshape(2, 3))


def test_softmax_allocates_only_its_output(rng):
    x = rng.standard_normal((512, 1024)).astype(np.float32)
    for dim in (1, 0):  # rows regime, columns regime
        sk.softmax(x, dim)  # compile outside the measurement
        tracemalloc.start()
        try:
            y = sk.softmax(x, dim)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # the output plus small change (views, the plan); never a copy of x
        assert peak < y.nbytes + 64 * 1024, (dim, peak, y.nbytes)


# --- plan ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dim", "regime", "cpu_regime"),
    [
        ((4096, 128), 1, "warp", "rows"),  # 512 B rows: a warp per row
        ((4096, 256), -1, "warp", "rows"),  # the longest register row (1 KiB)
        ((16, 257), 1, "shared", "rows"),  # block per row, cached
        ((16, 8192), 1, "shared", "rows"),  # 32 KiB of float32: still cached
        ((16, 8193), 1, "stream", "rows"),  # longer: read twice
        ((64, 128, 512), 1, "columns", "columns"),
        ((4096, 4096), 0, "columns", "columns"),
        ((), 0, "warp", "rows"),
        ((7,), 0, "warp", "rows"),
    ],
)
def test_plan_regimes(shape, dim, regime, cpu_regime):
    plan = sk.softmax_plan(shape, dim, np.float32)
    assert (plan.regime, plan.cpu_regime) == (regime, cpu_regime)
    assert plan.outer * plan.n * plan.inner == int(np.prod(shape))
    assert 1 <= plan.grid <= _launch.MAX_GRID


def test_plan_block_limit():
    assert sk.softmax_plan((4, 5), 1, np.float32, 512).block == 512
    with pytest.raises(ValueError, match="at most 512"):
        sk.softmax_plan((4, 5), 1, np.float32, 1024)
    with pytest.raises(ValueError, match="at most 512"):
        sk.softmax(np.ones((2, 3)), 1, block=1024)


def test_plan_float64_holds_half_the_elements():
    assert sk.softmax_plan((4, 128), 1, np.float64).regime == "warp"
    assert sk.softmax_plan((4, 129), 1, np.float64).regime == "shared"
    assert sk.softmax_plan((4, 256), 1, np.float16).regime == "warp"
    assert sk.softmax_plan((4, 4096), 1, np.float64).regime == "shared"
    assert sk.softmax_plan((4, 4097), 1, np.float64).regime == "stream"
    assert sk.softmax_plan((4, 8192), 1, np.float16).regime == "shared"


def test_plan_warp_values_cover_the_row():
    for n in (1, 31, 32, 33, 64, 65, 200, 256):
        plan = sk.softmax_plan((3, n), 1, np.float32)
        assert plan.regime == "warp"
        assert plan.values * 32 >= n > plan.values * 16 or n <= 32


# --- logsumexp ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((6, 50), 1), ((6, 50), 0), ((3, 4, 5), (0, 2)), ((3, 4, 5), (1, 2)), ((9,), 0)],
)
def test_logsumexp_matches_scipy(rng, shape, dim, dtype):
    x = (rng.standard_normal(shape) * 30).astype(dtype)
    ref = special.logsumexp(x.astype(np.float64), axis=dim)
    got = sk.logsumexp(x, dim)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    kept = sk.logsumexp(x, dim, keepdim=True)
    np.testing.assert_allclose(kept, special.logsumexp(x, axis=dim, keepdims=True), tol)


def test_logsumexp_special_values_and_empty():
    x = np.array(
        [[1.0, INF], [-INF, -INF], [np.nan, 1.0], [-INF, 0.0], [INF, -INF]], np.float32
    )
    got = sk.logsumexp(x, 1)
    assert got[0] == INF and got[1] == -INF and np.isnan(got[2])
    assert got[3] == 0.0 and got[4] == INF
    assert sk.logsumexp(np.empty((3, 0), np.float32), 1).tolist() == [-INF] * 3
    assert sk.logsumexp(np.empty((0, 3), np.float32), 1).shape == (0,)
    assert sk.logsumexp(np.float64(2.0), 0) == 2.0
    assert sk.logsumexp(np.arange(4), 0).dtype == np.float32  # ints: float32
    if torch is not None:
        np.testing.assert_array_equal(got, torch.logsumexp(torch.from_numpy(x), 1))


# --- backward ------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dim"), [((5, 40), 1), ((5, 40), 0), ((3, 4, 6), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_formulas(rng, shape, dim, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    y, ly = sk.softmax(x, dim), sk.log_softmax(x, dim)
    g64, y64, ly64 = (a.astype(np.float64) for a in (g, y, ly))
    ref = y64 * (g64 - (g64 * y64).sum(dim, keepdims=True))
    lref = g64 - np.exp(ly64) * g64.sum(dim, keepdims=True)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    got = sk.softmax_backward(g, y, dim)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(sk.log_softmax_backward(g, ly, dim), lref, tol, tol)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_backward_equals_torch_autograd(rng):
    x = rng.standard_normal((4, 30)).astype(np.float64)
    g = rng.standard_normal((4, 30))
    for fn, back, tfn in (
        (sk.softmax, sk.softmax_backward, torch.softmax),
        (sk.log_softmax, sk.log_softmax_backward, torch.log_softmax),
    ):
        t = torch.from_numpy(x).requires_grad_()
        tfn(t, 1).backward(torch.from_numpy(g))
        np.testing.assert_allclose(back(g, fn(x, 1), 1), t.grad.numpy(), 1e-12, 1e-12)


def test_backward_errors():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        sk.softmax_backward(a, np.ones((3, 2), np.float32), 1)
    with pytest.raises(TypeError, match="one dtype"):
        sk.softmax_backward(a, a.astype(np.float64), 1)
    with pytest.raises(TypeError):
        sk.log_softmax_backward(a.astype(np.int32), a.astype(np.int32), 1)
    with pytest.raises(AxisError):
        sk.softmax_backward(a, a, 2)
    assert sk.softmax_backward(a[:0], a[:0], 1).shape == (0, 3)


# --- modules ---------------------------------------------------------------------


def test_nn_modules(rng):
    x = rng.standard_normal((3, 5))
    m = sk.nn.Softmax(dim=1)
    assert repr(m) == "Softmax(dim=1)" and m.dim == 1
    np.testing.assert_array_equal(m(x), sk.softmax(x, 1))
    lm = sk.nn.LogSoftmax(0)
    assert repr(lm) == "LogSoftmax(dim=0)"
    np.testing.assert_array_equal(lm(x), sk.log_softmax(x, 0))
    assert repr(sk.nn.Softmax()) == "Softmax(dim=None)"
    with pytest.warns(UserWarning, match="dim=1"):
        sk.nn.LogSoftmax()(x)
    if torch is not None:
        assert repr(m) == repr(torch.nn.Softmax(dim=1))
