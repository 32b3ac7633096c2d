"""softkern on Dask arrays: lazy at call time, equal to the eager NumPy call.

Chunkings named in the ids: "one" keeps the reduced/softmax/class dim in
one chunk (our kernel maps over chunks), "split" splits it unevenly (the
(max, sum) statistics merge over chunks: vocabulary-parallel for the
losses), "holes" adds empty chunks. ``split_every=2`` forces Dask's combine
step wherever there are more than two partials.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from numpy.exceptions import AxisError
from scipy import special

import softkern as sk
from softkern.testing.references import (
    numpy_cross_entropy,
    numpy_cross_entropy_backward,
    numpy_nll_loss,
)

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

# (N, C) chunks: the class dim whole, split unevenly, split with empty chunks
CHUNKINGS = {
    "one": ((7, 9, 7), (17,)),
    "split": ((7, 9, 7), (6, 1, 10)),
    "holes": ((0, 10, 0, 13), (5, 0, 12)),
}
N, C = 23, 17


def raising_scheduler(dsk, keys, **kwargs):
    raise AssertionError("softkern computed something at call time")


@pytest.fixture
def lazy():
    """Any compute inside the block fails the test; `.compute()` after it
    runs on the synchronous scheduler."""

    class Lazy:
        def __enter__(self):
            self.config = dask.config.set(scheduler=raising_scheduler)
            self.config.__enter__()

        def __exit__(self, *exc):
            self.config.__exit__(*exc)

    with dask.config.set(scheduler="sync"):
        yield Lazy()


def as_dask(a: np.ndarray, chunks) -> da.Array:
    return da.from_array(a, chunks=chunks)


def computed(result) -> np.ndarray:
    assert isinstance(result, da.Array)
    assert type(result._meta) is np.ndarray
    return np.asarray(result.compute())


def assert_same(result, expected, rtol=2e-6, atol=1e-6) -> None:
    """The Dask result against the eager one: shape, dtype, values, NaN
    where it has NaN."""
    got = computed(result)
    expected = np.asarray(expected)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    if got.dtype.kind in "iub":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(
            got.astype(np.float64),
            expected.astype(np.float64),
            rtol=rtol,
            atol=atol,
            equal_nan=True,
        )


def test_device_of_reports_dask():
    x = da.ones((4, 3), chunks=2)
    assert sk.device_of(x) == "dask"
    assert sk.device_of(x, np.ones(3), 2.0) == "dask"


def test_tensor_with_dask_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="Dask array and a PyTorch tensor"):
        sk.device_of(da.ones(3, chunks=2), torch.ones(3))


# --- reductions ---------------------------------------------------------------


@pytest.mark.parametrize("op", ["sum", "amax", "amin"])
@pytest.mark.parametrize("dim", [None, 0, -1, (0, 2), (1,)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_reductions_equal_eager(rng, lazy, op, dim, keepdim):
    x = rng.standard_normal((11, 9, 6)).astype(np.float32)
    chunks = ((0, 4, 7), (2, 3, 4), (6,))  # uneven, with an empty chunk
    with lazy:
        result = getattr(sk, op)(as_dask(x, chunks), dim, keepdim, split_every=2)
    eager = getattr(sk, op)(x, dim, keepdim)
    if op != "sum":
        assert_same(result, eager, rtol=0, atol=0)  # max and min are exact
        return
    # another association order: a few float32 roundings of the terms'
    # magnitudes apart (a relative bound fails on sums that cancel)
    scale = np.sum(np.abs(x.astype(np.float64)), axis=dim, keepdims=keepdim)
    got = computed(result)
    assert got.shape == eager.shape and got.dtype == eager.dtype
    assert (np.abs(got.astype(np.float64) - eager) <= 1e-6 * scale).all()


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16", "int8", "bool"])
@pytest.mark.parametrize("op", ["sum", "amax", "amin"])
def test_reduction_dtypes(rng, lazy, op, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = (rng.standard_normal((40, 30)) * 4).astype(dtype)
    with lazy:
        result = getattr(sk, op)(as_dask(x, (7, 11)), 1, split_every=3)
    # 16-bit float sums keep float32 partials: one rounding, as eager
    assert_same(result, getattr(sk, op)(x, 1), rtol=1e-2)


@pytest.mark.parametrize("strategy", [0, 1, 2])
def test_reduce_and_block_reach_the_chunk_kernels(rng, strategy):
    x = rng.standard_normal(1000)
    result = sk.sum(as_dask(x, 250), reduce=strategy, block=64, split_every=2)
    parts = [sk.sum(x[i : i + 250], reduce=strategy, block=64) for i in (0, 250)]
    parts += [sk.sum(x[i : i + 250], reduce=strategy, block=64) for i in (500, 750)]
    # the tree of split_every=2: ((a + b) + (c + d)), each by our kernel
    pairs = [sk.sum(np.array(parts[:2])), sk.sum(np.array(parts[2:]))]
    assert computed(result) == sk.sum(np.array(pairs))


def test_reduction_nan_propagates(rng):
    x = rng.standard_normal((8, 10))
    x[3, 7] = np.nan
    for op in ("sum", "amax", "amin"):
        got = computed(getattr(sk, op)(as_dask(x, (3, 4)), 1))
        assert np.isnan(got[3]) and not np.isnan(np.delete(got, 3)).any()


def test_zero_dim_array(lazy):
    x = np.array(2.5, np.float32)
    with lazy:
        results = [sk.sum(da.from_array(x)), sk.logsumexp(da.from_array(x), 0)]
    assert_same(results[0], sk.sum(x))
    assert_same(results[1], sk.logsumexp(x, 0))


def test_dot(rng, lazy):
    x, y = rng.standard_normal(1000), rng.standard_normal(1000)
    with lazy:
        result = sk.dot(
            as_dask(x, ((300, 0, 450, 250),)), as_dask(y, 100), split_every=2
        )
    assert_same(result, sk.dot(x, y), rtol=1e-12)


# --- logsumexp, softmax -----------------------------------------------------------


def rows_with_specials(rng, shape=(N, C), dtype=np.float32) -> np.ndarray:
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x[1] = -np.inf  # a row of -inf
    x[2, 5] = np.inf
    x[3, 11] = np.nan
    x[4, :9] = -np.inf  # -inf in some chunks only
    return x


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dim", [0, 1, -1, (0, 1)])
def test_logsumexp(rng, lazy, chunking, dim):
    x = rows_with_specials(rng)
    with lazy:
        result = sk.logsumexp(as_dask(x, CHUNKINGS[chunking]), dim, split_every=2)
    assert_same(result, sk.logsumexp(x, dim))


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax(rng, lazy, kind, chunking, dim):
    x = rows_with_specials(rng)
    with lazy:
        result = getattr(sk, kind)(as_dask(x, CHUNKINGS[chunking]), dim, split_every=2)
    with np.errstate(invalid="ignore"):
        assert_same(result, getattr(sk, kind)(x, dim))


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_softmax_middle_dim_of_three(rng, kind):
    x = rng.standard_normal((3, 20, 7))
    result = getattr(sk, kind)(as_dask(x, (2, 6, 3)), 1)  # split: 4 chunks
    assert_same(result, getattr(sk, kind)(x, 1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int16"])
def test_softmax_dtypes(rng, dtype):
    cast = {"dtype": np.float64} if dtype == "int16" else {}
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = (rng.standard_normal((12, 40)) * 5).astype(dtype)
    result = sk.softmax(as_dask(x, (5, 15)), 1, **cast)
    expected = sk.softmax(x, 1, **cast)
    # one rounding of float32 math on either side: an ulp of the 16-bit type
    assert_same(result, expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kind", ["softmax_backward", "log_softmax_backward"])
@pytest.mark.parametrize("chunking", ["one", "split"])
def test_softmax_backward(rng, lazy, kind, chunking):
    x = rng.standard_normal((N, C)).astype(np.float32)
    g = rng.standard_normal((N, C)).astype(np.float32)
    forward = sk.softmax if kind == "softmax_backward" else sk.log_softmax
    y = forward(x, 1)
    chunks = CHUNKINGS[chunking]
    with lazy:
        result = getattr(sk, kind)(as_dask(g, chunks), as_dask(y, chunks), 1)
    assert_same(result, getattr(sk, kind)(g, y, 1), rtol=1e-5, atol=1e-6)


# --- losses --------------------------------------------------------------------------


def index_targets(rng, shape, classes) -> np.ndarray:
    t = rng.integers(0, classes, shape)
    t.flat[::5] = -100  # ignored
    return t


LOSS_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.15},
    "everything": {
        "weight": True,
        "label_smoothing": 0.1,
        "softcap": 4.0,
        "lse_square_scale": 1e-2,
    },
}


def options_of(rng, name: str) -> dict:
    options = dict(LOSS_OPTIONS[name])
    if options.get("weight"):
        options["weight"] = rng.random(C).astype(np.float32) + 0.1
    return options


@pytest.mark.parametrize("targets", ["index", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", LOSS_OPTIONS)
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_cross_entropy(rng, lazy, targets, reduction, options, chunking):
    x = (rng.standard_normal((N, C)) * 3).astype(np.float32)
    if targets == "index":
        t = index_targets(rng, N, C)
    else:
        t = rng.random((N, C)).astype(np.float32)
        t /= t.sum(1, keepdims=True)
    kw = options_of(rng, options)
    with lazy:
        loss = sk.cross_entropy(
            as_dask(x, CHUNKINGS[chunking]), t, reduction=reduction, **kw
        )
        grad = sk.cross_entropy_backward(
            as_dask(x, CHUNKINGS[chunking]), t, reduction=reduction, **kw
        )
    assert_same(loss, sk.cross_entropy(x, t, reduction=reduction, **kw), rtol=1e-5)
    np.testing.assert_allclose(
        computed(loss), numpy_cross_entropy(x, t, reduction=reduction, **kw), 1e-5
    )
    ones = np.ones(N, np.float32) if reduction == "none" else 1.0
    expected = numpy_cross_entropy_backward(x, t, ones, reduction=reduction, **kw)
    assert computed(grad).dtype == np.float32
    np.testing.assert_allclose(computed(grad), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunking", ["one", "split"])
def test_cross_entropy_three_dims_float64(rng, chunking):
    # (N, C, d): the class dim is dim 1; the spatial dim is chunked too
    x = rng.standard_normal((6, 9, 5))
    t = index_targets(rng, (6, 5), 9)
    chunks = (4, 9 if chunking == "one" else 4, 2)
    for reduction in ("none", "mean"):
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        assert_same(
            sk.cross_entropy(as_dask(x, chunks), t, **kw),
            sk.cross_entropy(x, t, **kw),
            rtol=1e-12,
        )
        g = np.full((6, 5), 2.0) if reduction == "none" else 2.0
        assert_same(
            sk.cross_entropy_backward(as_dask(x, chunks), t, g, **kw),
            sk.cross_entropy_backward(x, t, g, **kw),
            rtol=1e-12,
            atol=1e-15,
        )


@pytest.mark.parametrize("chunking", ["one", "split"])
def test_one_row_of_classes(rng, chunking):
    x = rng.standard_normal(C).astype(np.float32)
    t = np.array(4)
    chunks = C if chunking == "one" else 6
    assert_same(sk.cross_entropy(as_dask(x, chunks), t), sk.cross_entropy(x, t))
    assert_same(sk.nll_loss(as_dask(x, chunks), t), sk.nll_loss(x, t))


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_cross_entropy_with_inf_and_nan_rows(rng, chunking):
    x = rows_with_specials(rng)
    t = index_targets(rng, N, C)
    t[1:5] = 3
    with np.errstate(invalid="ignore"):
        for smoothing in (0.0, 0.1):
            kw = {"reduction": "none", "label_smoothing": smoothing}
            assert_same(
                sk.cross_entropy(as_dask(x, CHUNKINGS[chunking]), t, **kw),
                sk.cross_entropy(x, t, **kw),
            )
        assert_same(
            sk.cross_entropy_backward(as_dask(x, CHUNKINGS[chunking]), t),
            sk.cross_entropy_backward(x, t),
        )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_nll_loss(rng, lazy, reduction, chunking):
    x = sk.log_softmax(rng.standard_normal((N, C)).astype(np.float32), 1)
    t = index_targets(rng, N, C)
    w = rng.random(C).astype(np.float32)
    with lazy:
        loss = sk.nll_loss(as_dask(x, CHUNKINGS[chunking]), t, w, reduction=reduction)
    assert_same(loss, sk.nll_loss(x, t, w, reduction=reduction), rtol=1e-5)
    np.testing.assert_allclose(
        computed(loss), numpy_nll_loss(x, t, w, reduction=reduction), 1e-5
    )


def test_cross_entropy_and_grad_share_the_statistics(rng):
    x = rng.standard_normal((N, C)).astype(np.float32)
    t = index_targets(rng, N, C)
    loss, grad = sk.cross_entropy_and_grad(as_dask(x, CHUNKINGS["split"]), t)
    layers = set(loss.__dask_graph__().layers) | set(grad.__dask_graph__().layers)
    # one layer of class-chunk statistics, shared by the loss and the gradient
    assert len([name for name in layers if "class_chunk_stats" in name]) == 1
    expected_loss, expected_grad = sk.cross_entropy_and_grad(x, t)
    got_loss, got_grad = dask.compute(loss, grad)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(reduction):
    x = da.zeros((0, 5), dtype=np.float32, chunks=2)
    t = np.zeros(0, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = sk.cross_entropy(
            np.zeros((0, 5), np.float32), t, reduction=reduction
        )
    assert_same(sk.cross_entropy(x, t, reduction=reduction), expected)
    assert computed(sk.cross_entropy_backward(x, t)).shape == (0, 5)


@pytest.mark.parametrize("chunking", ["one", "split"])
def test_target_out_of_range_raises_at_compute_time(rng, lazy, chunking):
    x = rng.standard_normal((N, C)).astype(np.float32)
    t = index_targets(rng, N, C)
    t[9] = C + 3
    with pytest.raises(IndexError) as eager:
        sk.cross_entropy(x, t)
    with lazy:
        loss = sk.cross_entropy(as_dask(x, CHUNKINGS[chunking]), t)
    with pytest.raises(IndexError, match=re.escape(str(eager.value))):
        loss.compute()


def test_errors_at_call_time(lazy):
    x = da.ones((6, 4), chunks=3)
    with lazy:
        with pytest.raises(AxisError):
            sk.sum(x, 2)
        with pytest.raises(AxisError):
            sk.softmax(x, -3)
        with pytest.raises(ValueError, match="needs a target of shape"):
            sk.cross_entropy(x, np.zeros(5, np.int64))
        with pytest.raises(ValueError, match="broadcast"):
            sk.where(x > 0, x, da.ones(5, chunks=5))
        with pytest.raises(TypeError, match="out="):
            sk.softmax(x, 1, out=np.empty((6, 4)))
        with pytest.raises(TypeError, match="split_every applies"):
            sk.sigmoid(x, split_every=2)
        with pytest.raises(ValueError, match="unknown size"):
            sk.sum(x[x[:, 0] > 0], 0)


# --- elementwise, broadcasting -------------------------------------------------------


def test_where_and_expand(rng, lazy):
    x = rng.standard_normal((10, 12)).astype(np.float32)
    c = rng.random((10, 1)) > 0.5
    with lazy:
        picked = sk.where(as_dask(c, 4), as_dask(x, (3, 5)), 0.0)
        mixed = sk.where(c, as_dask(x, (3, 5)), as_dask(x[0], 7))
        grown = sk.expand(as_dask(x[:, :1], 4), 3, 10, 12)
    assert_same(picked, sk.where(c, x, 0.0))
    assert_same(mixed, sk.where(c, x, x[0]))
    assert_same(grown, sk.expand(x[:, :1], 3, 10, 12))


@pytest.mark.parametrize("name", ["sigmoid", "logsigmoid"])
def test_activations(rng, lazy, name):
    x = rng.standard_normal((10, 12)) * 30
    with lazy:
        result = getattr(sk, name)(as_dask(x, 4))
    assert_same(result, getattr(sk, name)(x), rtol=1e-12)


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_is_one_sample(rng, lazy, hard):
    x = rng.standard_normal((20, 30)).astype(np.float32)
    with lazy:
        sample = sk.gumbel_softmax(as_dask(x, (6, 7)), hard=hard, dim=1)
    first, again = computed(sample), computed(sample)
    np.testing.assert_array_equal(first, again)  # the seed is fixed at call time
    np.testing.assert_allclose(first.sum(1), 1.0, rtol=1e-5)
    assert len(np.unique(first.argmax(1))) > 1


# --- schedulers ---------------------------------------------------------------------


def test_threaded_scheduler_many_threads(rng):
    x = rng.standard_normal((64, 300)).astype(np.float32)
    t = rng.integers(0, 300, 64)
    xs = as_dask(x, (8, 70))
    graph = [sk.cross_entropy(xs, t), sk.logsumexp(xs, 1), sk.softmax(xs, 1)]
    expected = dask.compute(*graph, scheduler="sync")
    for _ in range(3):
        got = dask.compute(*graph, scheduler="threads", num_workers=8)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_each_task_runs_one_numba_thread(monkeypatch):
    import numba

    from softkern import _dask

    @_dask.task
    def threads_seen(block):
        return np.full(block.shape, numba.get_num_threads())

    seen = da.zeros(8, chunks=2).map_blocks(threads_seen, dtype=int)
    assert set(seen.compute(scheduler="threads")) == {1}
    monkeypatch.setenv(_dask.THREADS_ENV, "2")
    want = min(2, numba.config.NUMBA_NUM_THREADS)
    assert set(seen.compute(scheduler="threads")) == {want}
    monkeypatch.setenv(_dask.THREADS_ENV, "none")
    with pytest.raises(ValueError, match=_dask.THREADS_ENV):
        seen.compute(scheduler="sync")


def test_local_cluster_of_processes(rng):
    distributed = pytest.importorskip("distributed")
    x = rng.standard_normal((96, 500)).astype(np.float32)
    t = index_targets(rng, 96, 500)
    xs = as_dask(x, (24, 130))  # vocabulary-parallel across the workers
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        loss, lse = client.compute([sk.cross_entropy(xs, t), sk.logsumexp(xs, 1)])
        np.testing.assert_allclose(loss.result(), sk.cross_entropy(x, t), rtol=1e-5)
        np.testing.assert_allclose(lse.result(), sk.logsumexp(x, 1), rtol=1e-6)


# --- found in review: chunkings and corner cases -----------------------------------


def test_a_dim_of_one_split_with_an_empty_chunk(rng):
    # Dask broadcasts a dim of size 1 in blockwise: (0, 1) chunks must not
    # count the one class twice or change the result's shape
    x = rng.standard_normal((3, 1)).astype(np.float32)
    t = np.zeros(3, np.int64)
    xs = as_dask(x, ((3,), (0, 1)))
    assert_same(
        sk.cross_entropy(xs, t, reduction="none"),
        sk.cross_entropy(x, t, reduction="none"),
    )
    assert_same(sk.nll_loss(xs, t), sk.nll_loss(x, t))
    assert_same(sk.cross_entropy_backward(xs, t), sk.cross_entropy_backward(x, t))
    row = np.ones((1, 4), np.float32)
    batch = np.array([2])
    assert_same(
        sk.cross_entropy(as_dask(row, ((0, 1), (4,))), batch, reduction="none"),
        sk.cross_entropy(row, batch, reduction="none"),
    )
    assert_same(
        sk.cross_entropy_backward(as_dask(row, ((0, 1), (2, 2))), batch),
        sk.cross_entropy_backward(row, batch),
    )
    source = rng.standard_normal((1, 2)).astype(np.float32)
    assert_same(sk.expand(as_dask(source, ((1, 0), 2)), 4, 2), sk.expand(source, 4, 2))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.bool_])
@pytest.mark.parametrize("op", ["amax", "amin"])
def test_small_integer_max_min_with_empty_chunks(op, dtype):
    x = np.array([50, 70, 90, 3], dtype) if dtype != np.bool_ else np.zeros(4, bool)
    assert_same(getattr(sk, op)(as_dask(x, ((1, 0, 3),))), getattr(sk, op)(x))


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrower_dtype_is_cast_first_over_a_split_dim(rng, kind, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = (rng.standard_normal((4, 64)) * 5).astype(np.float32)
    result = getattr(sk, kind)(as_dask(x, (4, 16)), 1, dtype=dtype)
    expected = getattr(sk, kind)(x, 1, dtype=dtype)
    assert computed(result).dtype == expected.dtype
    # rounded once from the same float32 math: equal or one ulp apart
    np.testing.assert_allclose(
        computed(result).astype(np.float64), expected.astype(np.float64), rtol=1e-2
    )


def test_expand_of_an_empty_source():
    x = np.zeros((0, 2), np.float32)
    assert_same(sk.expand(as_dask(x, 1), 3, 0, 2), sk.expand(x, 3, 0, 2))


def test_empty_batch_still_checks_grad_output():
    x = da.zeros((0, 3), dtype=np.float32, chunks=1)
    with pytest.raises(ValueError, match="grad_output"):
        sk.cross_entropy_backward(x, np.zeros(0, np.int64), np.ones(5))


@pytest.mark.parametrize("chunking", ["one", "split"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mean_over_zero_weight(rng, chunking, smoothing):
    # every counted target weighs 0: the mean is 0 / 0; PyTorch's gradient
    # is NaN in each counted row and 0 in ignored ones, and no warning
    x = rng.standard_normal((N, C)).astype(np.float32)
    t = index_targets(rng, N, C)
    w = np.zeros(C, np.float32)
    xs = as_dask(x, CHUNKINGS[chunking])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = computed(sk.cross_entropy(xs, t, w, label_smoothing=smoothing))
        grad = computed(
            sk.cross_entropy_backward(xs, t, 1.0, w, label_smoothing=smoothing)
        )
    expected = sk.cross_entropy(x, t, w, label_smoothing=smoothing)
    np.testing.assert_array_equal(loss, expected)
    assert np.isnan(loss)  # smoothed too: PyTorch's (1 - eps) * 0 / 0 + ...
    ignored = t == -100
    assert np.isnan(grad[~ignored]).all() and (grad[ignored] == 0).all()


def test_tasks_carry_no_array_of_the_class_count(rng):
    # what distributed ships per task: the plan's weight of ones would be
    # a MiB per task at 262144 classes
    import pickle

    classes = 262144
    x = da.random.default_rng(0).random((4, classes), chunks=(2, classes // 4))
    t = da.zeros(4, dtype=np.int64, chunks=2)
    graph = dict(sk.cross_entropy_backward(x, t).__dask_graph__())
    ours = [
        k
        for k in graph
        if not str(k[0] if isinstance(k, tuple) else k).startswith("random")
    ]
    assert max(len(pickle.dumps(graph[k])) for k in ours) < 16384


@pytest.mark.parametrize("shape", [(64, 3000), (4, 3000, 5)])  # rows, columns
def test_class_chunk_log_sum_exp_sums_in_float64(rng, shape):
    # the vocabulary-parallel losses merge each class chunk's log-sum-exp:
    # float32 partial sums and a float32 result cost the merged gradient
    # 3-5x the eager call's error (a test of it flaked at 2e-7)
    from softkern.ops.softmax import logsumexp_float64

    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    got = logsumexp_float64(x, 1)
    assert got.dtype == np.float64 and got.shape == (shape[0], 1, *shape[2:])
    want = special.logsumexp(x.astype(np.float64), 1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=3e-8)
