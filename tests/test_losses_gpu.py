"""GPU cross_entropy, nll_loss, cross_entropy_backward, sigmoid, logsigmoid
and gumbel_softmax (the CUDA simulator without a GPU), against the float64
references of ``softkern.testing.references``.

The loss kernels follow ``softmax_plan`` on the (outer, C, inner) view
around the class dim: a warp per row for rows of at most WARP_ROW_BYTES, a
block per row ("shared", "stream") for longer ones, tiles of 32 positions
("columns") for K-dim inputs. The simulator runs a Python thread per CUDA
thread, so shapes are tiny, the plan's limits are lowered
(``small_regimes``) to reach every row regime with rows of a few dozen
classes, and `small_grid` caps the grid at 4 blocks so blocks walk several
rows. On a real GPU the same tests run with the real limits and bigger shapes.
"""

import numpy as np
import pytest
from helpers import GPU_BLOCKS, SIMULATOR, to_gpu, to_host
from numba import cuda
from test_losses_cpu import (
    LOSSES,
    REDUCTIONS,
    SPECIAL_T,
    SPECIAL_X,
    TOL,
    batch,
    check_backward,
    check_gradient,
    check_loss,
    class_dim,
    classes,
    index_target,
    logits,
    prob_target,
    ref_ce,
    ref_ce_backward,
    ref_nll,
)
from test_softmax_gpu import small, small_regimes  # noqa: F401 (a fixture)

import softkern as sk
from softkern.ops.losses import plan_of
from softkern.testing.references import EXACT

pytestmark = pytest.mark.usefixtures("small_grid")

BLOCK = GPU_BLOCKS[0]


def gpu(a):
    """A device copy; 0-d arrays stay 0-d (to_gpu would make them 1-d)."""
    return to_gpu(a) if np.ndim(a) else cuda.to_device(np.asarray(a))


def regime_of(shape, dtype=np.float32):
    return sk.softmax_plan(shape, class_dim(shape), dtype, BLOCK).regime


# (input shape, regime): comments name the branch each shape hits
CASES = [
    (small((5, 40), (4096, 250)), "warp"),  # (N, C): a warp per row, 2 a lane
    (small((40,), (250,)), "warp"),  # (C,) with a 0-d target: one warp
    (small((3, 100), (64, 8000)), "shared"),  # a block per row
    (small((3, 150), (16, 20000)), "stream"),  # a block per row, longer
    (small((3, 37, 5), (16, 1000, 64)), "columns"),  # (N, C, d1): 32-wide tiles
    (small((2, 12, 3, 2), (4, 100, 32, 16)), "columns"),  # (N, C, d1, d2)
]
IDS = [f"{regime}-{len(shape)}d" for shape, regime in CASES]


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize(("shape", "regime"), CASES, ids=IDS)
def test_index_targets_every_regime(rng, shape, regime):
    assert regime_of(shape) == regime
    x = logits(rng, shape)
    t = index_target(rng, shape, ignore_index=2)
    w = rng.uniform(0.2, 2.0, classes(shape)).astype(np.float32)
    d, dt, dw = gpu(x), gpu(t), gpu(w)
    kw = {"ignore_index": 2, "label_smoothing": 0.1}
    # a regime's second shape: per-position results only (fewer launches)
    full = shape not in (CASES[1][0], CASES[5][0])
    for reduction in ("none", "mean") if full else ("none",):  # sum: below
        got = sk.cross_entropy(d, dt, dw, reduction=reduction, block=BLOCK, **kw)
        assert sk.device_of(got) == "cuda"
        check_loss(to_host(got), ref_ce(x, t, w, reduction=reduction, **kw), np.float32)
    if full:
        g = dg = 0.7
        kw["reduction"] = "mean"
    else:
        g = np.asarray(rng.standard_normal(batch(shape)), np.float32)
        dg, kw["reduction"] = gpu(g), "none"
    got = sk.cross_entropy_backward(d, dt, dg, dw, block=BLOCK, **kw)
    check_backward(to_host(got), x, t, g, weight=w, **kw)
    for a, host in ((d, x), (dt, t), (dw, w)):  # inputs untouched
        np.testing.assert_array_equal(to_host(a), host)


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize(("shape", "regime"), [CASES[0], CASES[3], CASES[4]])
def test_probability_targets_every_regime(rng, shape, regime):
    # warp, stream, columns
    x, q = logits(rng, shape), prob_target(rng, shape)
    w = rng.uniform(0.2, 2.0, classes(shape)).astype(np.float32)
    d, dq, dw = gpu(x), gpu(q), gpu(w)
    kw = {"label_smoothing": 0.2}
    got = to_host(sk.cross_entropy(d, dq, dw, block=BLOCK, **kw))
    check_loss(got, ref_ce(x, q, w, **kw), np.float32)
    g = rng.standard_normal(batch(shape)).astype(np.float32)
    kw["reduction"] = "none"
    got = sk.cross_entropy_backward(d, dq, gpu(g), dw, block=BLOCK, **kw)
    check_backward(to_host(got), x, q, g, weight=w, **kw)
    np.testing.assert_array_equal(to_host(dq), q)


# 2 (warp shuffles) is the default, tested above
@pytest.mark.parametrize(("strategy", "shape"), [(0, CASES[0][0]), (1, CASES[4][0])])
def test_reduce_strategies(rng, strategy, shape):
    # 0 on the warp regime, 1 on the columns regime
    x = logits(rng, shape)
    t = index_target(rng, shape, ignore_index=-100)
    d, dt = gpu(x), gpu(t)
    kw = {"reduce": strategy, "block": BLOCK}
    got = to_host(sk.cross_entropy(d, dt, reduction="sum", **kw))
    check_loss(got, ref_ce(x, t, reduction="sum"), np.float32)
    got = to_host(sk.cross_entropy_backward(d, dt, **kw))  # mean: nll + finish
    check_backward(got, x, t)


def test_float64_and_float16(rng):
    x = logits(rng, (4, 40), np.float64)
    t = index_target(rng, x.shape, ignore_index=-100)
    d, dt = gpu(x), gpu(t)
    kw = {"reduction": "none", "label_smoothing": 0.3}
    got = to_host(sk.cross_entropy(d, dt, block=BLOCK, **kw))
    check_loss(got, ref_ce(x, t, **kw), np.float64)
    got = to_host(sk.cross_entropy_backward(d, dt, 1.5, reduction="sum", block=BLOCK))
    check_backward(got, x, t, 1.5, reduction="sum")
    h = x.astype(np.float16)
    dh = gpu(h)
    got = to_host(sk.cross_entropy(dh, dt, label_smoothing=0.1, block=BLOCK))
    check_loss(got, ref_ce(h, t, label_smoothing=0.1), np.float16)
    got = to_host(sk.cross_entropy_backward(dh, dt, block=BLOCK))
    check_backward(got, h, t, tol=2e-3)


@pytest.mark.parametrize("target_dtype", [np.int32, np.uint8])
def test_integer_target_dtypes(rng, target_dtype):
    x = logits(rng, (5, 3, 4))
    t = index_target(rng, x.shape, dtype=target_dtype)
    got = sk.cross_entropy(gpu(x), gpu(t), reduction="sum", block=BLOCK)
    check_loss(to_host(got), ref_ce(x, t, reduction="sum"), np.float32)


def test_all_ignored_and_empty(rng):
    x = logits(rng, (4, 30))
    d, dt = gpu(x), gpu(np.full(4, 3))
    mean = to_host(sk.cross_entropy(d, dt, ignore_index=3, block=BLOCK))
    assert mean.shape == () and mean.dtype == np.float32 and np.isnan(mean)
    total = sk.cross_entropy(d, dt, ignore_index=3, reduction="sum", block=BLOCK)
    assert to_host(total) == 0
    assert np.isnan(to_host(sk.nll_loss(d, dt, ignore_index=3, block=BLOCK)))
    grad = to_host(sk.cross_entropy_backward(d, dt, ignore_index=3, block=BLOCK))
    np.testing.assert_array_equal(grad, np.zeros_like(x))  # mean: 0, not NaN
    # counted targets of weight 0, smoothed: NaN, not the smooth term over 0
    w = np.ones(30, np.float32)
    w[3] = 0
    smoothed = sk.cross_entropy(d, dt, gpu(w), label_smoothing=0.1, block=BLOCK)
    assert np.isnan(to_host(smoothed))
    e, et = gpu(np.empty((0, 5), np.float32)), gpu(np.empty(0, np.int64))
    assert np.isnan(to_host(sk.cross_entropy(e, et)))
    assert to_host(sk.cross_entropy(e, et, reduction="sum")) == 0
    assert to_host(sk.cross_entropy(e, et, reduction="none")).shape == (0,)
    assert to_host(sk.cross_entropy_backward(e, et)).shape == (0, 5)


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize("width", [30, 150])  # warp, stream
def test_special_values(width):
    # each row repeats its pattern, so every thread meets the special value
    x = np.array([np.resize(row, width) for row in SPECIAL_X], np.float32)
    layouts = [(x, SPECIAL_T, (0.0, 0.1) if width < 100 else (0.0,))]
    if width < 100:  # columns as well: (1, width, 7)
        layouts.append((np.moveaxis(x[None], 1, 2).copy(), SPECIAL_T[None], (0.1,)))
    for data, t, smoothing in layouts:
        d, dt = gpu(data), gpu(t)
        for eps in smoothing:
            kw = {"reduction": "none", "label_smoothing": eps}
            got = to_host(sk.cross_entropy(d, dt, block=BLOCK, **kw))
            check_loss(got, ref_ce(data, t, **kw), np.float32)  # torch's rules
        got = to_host(sk.cross_entropy_backward(d, dt, reduction="sum", block=BLOCK))
        rows = got if got.ndim == 2 else got[0].T  # (position, class)
        assert np.isfinite(rows[[0, 1, 6]]).all()  # untouched by neighbours
        assert np.isnan(rows[2:5]).all()


def test_grad_output_forms(rng):
    x = logits(rng, (4, 40))
    t = index_target(rng, x.shape, ignore_index=-100)
    d, dt = gpu(x), gpu(t)
    g0 = gpu(np.array(2.5, np.float32))  # a 0-d array (numbers: everywhere)
    got = to_host(sk.cross_entropy_backward(d, dt, g0, reduction="sum", block=BLOCK))
    check_backward(got, x, t, 2.5, reduction="sum")
    g = rng.standard_normal(4).astype(np.float32)
    strided = gpu(np.repeat(g, 2))[::2]  # a strided device view
    for dg in (gpu(g), strided):
        got = sk.cross_entropy_backward(d, dt, dg, reduction="none", block=BLOCK)
        got = to_host(got)
        check_backward(got, x, t, g, reduction="none")
    with pytest.raises(ValueError):  # "none" needs one value per position
        sk.cross_entropy_backward(d, dt, gpu(np.ones(3)), reduction="none")


def test_loss_and_grad_and_out(rng):
    # (2, 40)  # warp per row: the forward and the backward launches
    x = logits(rng, (2, 40))
    t = np.array([3, -100])
    d, dt = gpu(x), gpu(t)
    kw = {"label_smoothing": 0.1, "block": BLOCK}
    loss, grad = sk.cross_entropy_and_grad(d, dt, **kw)
    assert sk.device_of(loss) == sk.device_of(grad) == "cuda"
    check_loss(to_host(loss), ref_ce(x, t, label_smoothing=0.1), np.float32)
    check_backward(to_host(grad), x, t, 1.0, label_smoothing=0.1)
    # cross_entropy_and_grad hands out= to this same call
    out = gpu(np.full_like(x, np.nan))
    assert sk.cross_entropy_backward(d, dt, out=out, **kw) is out
    np.testing.assert_array_equal(to_host(out), to_host(grad))
    with pytest.raises(TypeError, match="on the CUDA"):
        sk.cross_entropy_backward(d, dt, out=np.empty_like(x), **kw)
    with pytest.raises(ValueError, match="shape"):
        sk.cross_entropy_and_grad(d, dt, out=gpu(np.empty((2, 41), np.float32)))
    with pytest.raises(IndexError, match=r"^softkern\.cross_entropy_and_grad: "):
        sk.cross_entropy_and_grad(d, gpu(np.array([3, 40])), **kw)


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize(
    ("shape", "regime", "target"),
    [
        (CASES[0][0], "warp", "index"),
        (CASES[3][0], "stream", "probs"),
        (CASES[4][0], "columns", "index"),
    ],
)
def test_softcap_and_z_loss(rng, shape, regime, target):
    assert regime_of(shape) == regime
    x = logits(rng, shape, scale=20.0)  # against a cap of 12: tanh bends
    if target == "index":
        t = index_target(rng, shape, ignore_index=-100)
    else:
        t = prob_target(rng, shape)
    kw = {"softcap": 12.0, "lse_square_scale": 1e-2, "label_smoothing": 0.1}
    d, dt = gpu(x), gpu(t)
    for reduction in ("none", "mean"):
        got = sk.cross_entropy(d, dt, reduction=reduction, block=BLOCK, **kw)
        check_loss(to_host(got), ref_ce(x, t, reduction=reduction, **kw), np.float32)
    g = rng.standard_normal(batch(shape)).astype(np.float32)
    got = sk.cross_entropy_backward(d, dt, gpu(g), reduction="none", block=BLOCK, **kw)
    want = ref_ce_backward(x, t, g, reduction="none", **kw)
    check_gradient(to_host(got), want, np.float32)


# --- few rows of many classes: the split regime ------------------------------


def loss_regime(x, t):
    plan = plan_of("cross_entropy", True, x, t, None, -100, "mean", 0.0, BLOCK)
    return plan.plan.regime, plan.plan.segments


SPLIT_CASES = [
    (small((3, 700), (8, 262144)), 0),  # 3 rows of 3 segments (GPU: 8 x 128)
    (small((3, 700), (8, 262144)), 1),
    (small((3, 700), (8, 262144)), 2),
    (small((1, 2000), (1, 10**6)), 2),  # one row, 8 segments (GPU: 1024)
    (small((700,), (300000,)), 2),  # (C,) with a 0-d target
]


@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize(("shape", "strategy"), SPLIT_CASES)
def test_few_rows_of_many_classes_split(rng, shape, strategy):
    x = logits(rng, shape)
    t = index_target(rng, shape)
    if t.size > 1:
        t[0] = -100  # an ignored row: a zero gradient, no weight in the mean
    w = rng.uniform(0.2, 2.0, classes(shape)).astype(np.float32)
    assert loss_regime(x, t)[0] == "split"
    d, dt, dw = gpu(x), gpu(t), gpu(w)
    kw = {"label_smoothing": 0.1, "reduce": strategy, "block": BLOCK}
    # strategies 0 and 1 (barriers between fold steps: slow in the
    # simulator) fold partials in the sum; 2 takes every path
    for reduction in REDUCTIONS if strategy == 2 else ("sum",):
        got = sk.cross_entropy(d, dt, dw, reduction=reduction, **kw)
        want = ref_ce(x, t, w, reduction=reduction, label_smoothing=0.1)
        check_loss(to_host(got), want, np.float32)
    g = rng.standard_normal(batch(shape)).astype(np.float32)
    got = sk.cross_entropy_backward(d, dt, gpu(g), dw, reduction="none", **kw)
    check_backward(
        to_host(got), x, t, g, weight=w, reduction="none", label_smoothing=0.1
    )
    if strategy != 2:
        return
    # mean: the denominator folded on the device, then the three stages
    loss, grad = sk.cross_entropy_and_grad(d, dt, dw, **kw)
    check_loss(to_host(loss), ref_ce(x, t, w, label_smoothing=0.1), np.float32)
    check_backward(to_host(grad), x, t, weight=w, label_smoothing=0.1)
    if t.size > 1:
        assert (to_host(grad)[0] == 0).all()
    for a, host in ((d, x), (dt, t), (dw, w)):  # inputs untouched
        np.testing.assert_array_equal(to_host(a), host)


@pytest.mark.usefixtures("split_rows")
def test_split_probability_targets_softcap_and_z_loss(rng):
    shape = small((2, 600), (4, 200000))
    x = logits(rng, shape, scale=20.0)  # against a cap of 12: tanh bends
    q = prob_target(rng, shape)
    assert loss_regime(x, q)[0] == "split"
    d, dq = gpu(x), gpu(q)
    for kw in ({"label_smoothing": 0.2}, {"softcap": 12.0, "lse_square_scale": 1e-2}):
        got = to_host(sk.cross_entropy(d, dq, reduction="none", block=BLOCK, **kw))
        check_loss(got, ref_ce(x, q, reduction="none", **kw), np.float32)
        got = to_host(sk.cross_entropy_backward(d, dq, block=BLOCK, **kw))
        check_gradient(got, ref_ce_backward(x, q, **kw), np.float32)
    t = index_target(rng, shape)
    kw = {"softcap": 12.0, "lse_square_scale": 1e-2, "label_smoothing": 0.1}
    got = to_host(sk.cross_entropy(d, gpu(t), reduction="sum", block=BLOCK, **kw))
    check_loss(got, ref_ce(x, t, reduction="sum", **kw), np.float32)
    got = to_host(sk.cross_entropy_backward(d, gpu(t), block=BLOCK, **kw))
    check_gradient(got, ref_ce_backward(x, t, **kw), np.float32)


@pytest.mark.usefixtures("split_rows")
def test_split_confident_rows_keep_their_small_losses():
    # the target's logit far above the rest: a loss of ~1e-10 that a float32
    # 1 + sum would round to 0; the segments' rests must keep it, whichever
    # segment holds the max (the first, the middle, the last, or two tying)
    n = small(600, 300000)
    x = np.zeros((4, n), np.float32)
    targets = np.array([0, n // 2, n - 1, 5])
    x[np.arange(4), targets] = 30.0
    x[3, n - 2] = 30.0  # a tie in another segment: loss log(2)
    assert loss_regime(x, targets)[0] == "split"
    got = to_host(sk.cross_entropy(gpu(x), gpu(targets), reduction="none", block=BLOCK))
    # by hand: the float64 reference's lse - x_t cancels 30 against 30
    # and keeps only 4 digits of these losses
    rests = np.array([n - 1, n - 1, n - 1, (n - 2) / 2]) * np.exp(-30.0)
    want = np.log1p(rests) + np.array([0, 0, 0, np.log(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert 0 < got[0] < 1e-7


@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_split_special_values_and_dtypes(dtype):
    # each pattern repeated along the row, so every segment meets it
    width = small(600, 2**17)
    x = np.array([np.resize(row, width) for row in SPECIAL_X], dtype)
    assert loss_regime(x, SPECIAL_T)[0] == "split"
    d, dt = gpu(x), gpu(SPECIAL_T)
    for eps in (0.0, 0.1):
        kw = {"reduction": "none", "label_smoothing": eps}
        got = to_host(sk.cross_entropy(d, dt, block=BLOCK, **kw))
        check_loss(got, ref_ce(x, SPECIAL_T, **kw), dtype)  # torch's rules
    got = to_host(sk.cross_entropy_backward(d, dt, reduction="sum", block=BLOCK))
    np.testing.assert_array_equal(got[5], 0)  # ignored, NaN logits or not
    assert np.isfinite(got[[0, 1, 6]]).all()  # untouched by neighbours
    assert np.isnan(got[2:5]).all()
    finite = [0, 1, 6]
    want = ref_ce_backward(x[finite], SPECIAL_T[finite], reduction="sum")
    check_gradient(got[finite], want, dtype)


@pytest.mark.usefixtures("split_rows")
def test_split_bad_targets_and_all_ignored(rng):
    x = logits(rng, small((3, 500), (3, 100000)))
    t = np.array([0, -3, x.shape[1] + 2])  # the message names -3, the first
    for fn in (sk.cross_entropy, sk.cross_entropy_backward):
        with pytest.raises(IndexError, match="target -3 ") as cpu:
            fn(x, t, reduction="none")
        with pytest.raises(IndexError) as on_gpu:
            fn(gpu(x), gpu(t), block=BLOCK, reduction="none")
        assert str(on_gpu.value) == str(cpu.value)
    ignored = gpu(np.full(3, -100))
    assert np.isnan(to_host(sk.cross_entropy(gpu(x), ignored, block=BLOCK)))
    grad = to_host(sk.cross_entropy_backward(gpu(x), ignored, block=BLOCK))
    np.testing.assert_array_equal(grad, 0)


def test_nll_loss(rng):
    x = logits(rng, (3, 7, 5), np.float64)
    t = index_target(rng, x.shape, ignore_index=4)
    w = rng.uniform(0.2, 2, 7)
    d, dt, dw = gpu(x), gpu(t), gpu(w)
    for reduction in REDUCTIONS:
        got = to_host(sk.nll_loss(d, dt, dw, 4, reduction, block=BLOCK))
        check_loss(got, ref_nll(x, t, w, 4, reduction), np.float64)
    # cross_entropy(x) == nll_loss(log_softmax(x))
    logp = sk.log_softmax(d, 1, block=BLOCK)
    np.testing.assert_allclose(
        to_host(sk.nll_loss(logp, dt, dw, 4, block=BLOCK)),
        sk.cross_entropy(x, t, w, 4),
        rtol=1e-12,
    )
    v = logits(rng, (9,), np.float32)  # (C,) and a 0-d target
    got = to_host(sk.nll_loss(gpu(v), gpu(np.array(5)), reduction="none", block=BLOCK))
    assert got.shape == () and got == -v[5]


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_bad_targets_raise_index_error(fn):
    x = gpu(np.zeros((3, 4), np.float32))
    with pytest.raises(IndexError, match="7"):
        fn(x, gpu(np.array([0, 7, 1], np.int32)), block=BLOCK)
    k = gpu(np.zeros((2, 4, 3), np.float32))  # the columns regime
    with pytest.raises(IndexError, match="-1"):
        fn(k, gpu(np.array([[0, 1, 2], [3, -1, 0]])), block=BLOCK, reduction="none")


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_the_first_bad_target_is_named_as_on_the_cpu(fn):
    # many threads meet bad targets at once; the message names the first
    # in the target's order, as the CPU's does
    x = np.zeros((2, 4, 40), np.float32)
    t = np.zeros((2, 40), np.int64)
    t[0, 30], t[1, 2], t[0, 31] = 9, -5, 11
    with pytest.raises(IndexError) as cpu:
        fn(x, t)
    with pytest.raises(IndexError) as on_gpu:
        fn(gpu(x), gpu(t), block=BLOCK)
    assert str(on_gpu.value) == str(cpu.value)
    assert "target 9 " in str(cpu.value)


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_errors_on_the_gpu(fn):
    x, t = np.zeros((3, 4), np.float32), np.array([0, 1, 3])
    d, dt = gpu(x), gpu(t)
    w = np.ones(4, np.float32)
    for args, kw in (((d, t), {}), ((x, dt), {}), ((d, dt), {"weight": w})):
        with pytest.raises(TypeError):  # mixed devices
            fn(*args, **kw)
    with pytest.raises(ValueError, match="avg"):
        fn(d, dt, reduction="avg")
    with pytest.raises(ValueError):
        fn(d, dt, weight=gpu(np.ones(5, np.float32)))
    with pytest.raises(ValueError):
        fn(d, gpu(np.array([0, 1])))
    with pytest.raises(ValueError):
        fn(gpu(np.array(1.0, np.float32)), gpu(np.array(0)))
    with pytest.raises(TypeError):
        fn(gpu(x.astype(np.int32)), dt)
    with pytest.raises(TypeError):
        fn(d, gpu(t.astype(np.float32)))
    with pytest.raises(ValueError):
        fn(d, dt, reduce=3)


def test_backward_errors_on_the_gpu():
    x, t = np.zeros((3, 4), np.float32), np.array([0, 1, 3])
    d, dt = gpu(x), gpu(t)
    with pytest.raises(TypeError):  # a host grad_output for a device input
        sk.cross_entropy_backward(d, dt, np.array(1.0))
    with pytest.raises(TypeError):
        sk.cross_entropy_backward(x, t, gpu(np.array(1.0)))
    with pytest.raises(ValueError):
        sk.cross_entropy_backward(d, dt, label_smoothing=2.0)


# --- sigmoid, logsigmoid -----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sigmoid(rng, dtype):
    x = np.concatenate(
        [rng.standard_normal(40) * 15, [-1e4, 1e4, 0.0, np.inf, -np.inf, np.nan]]
    ).astype(dtype)
    tol, tiny = TOL[dtype], np.finfo(dtype).tiny
    d = gpu(x)
    for fn, name in ((sk.sigmoid, "sigmoid"), (sk.logsigmoid, "logsigmoid")):
        got = to_host(fn(d, block=BLOCK))
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_allclose(got[:-1], EXACT[name](x)[:-1], tol, tiny)
        assert np.isnan(got[-1])
    s, ls = to_host(sk.sigmoid(d, block=BLOCK)), to_host(sk.logsigmoid(d, block=BLOCK))
    assert s[-3] == 1 and s[-2] == 0 and ls[-3] == 0 and ls[-2] == -np.inf
    np.testing.assert_array_equal(to_host(d), x)


def test_sigmoid_layouts_and_integers(rng):
    base = rng.standard_normal((6, 20)) * 5
    view = gpu(base)[::2, 1::3]  # a strided device view, read in place
    for fn, name in ((sk.sigmoid, "sigmoid"), (sk.logsigmoid, "logsigmoid")):
        got = to_host(fn(view, block=BLOCK))
        np.testing.assert_allclose(got, EXACT[name](base[::2, 1::3]), rtol=1e-12)
        ints = to_host(fn(gpu(np.arange(-3, 4, dtype=np.int32)), block=BLOCK))
        assert ints.dtype == np.float32
        np.testing.assert_allclose(ints, EXACT[name](np.arange(-3, 4)), rtol=1e-6)
    assert to_host(sk.sigmoid(gpu(np.array(0.0)), block=BLOCK)) == 0.5  # 0-d
    assert to_host(sk.sigmoid(gpu(np.empty((2, 0))), block=BLOCK)).shape == (2, 0)


# --- gumbel_softmax ------------------------------------------------------------


def test_gumbel_seed_hard_and_tau(rng):
    # 32 elements: one block of 32 states (the simulator makes each state and
    # draws each number in Python, ~0.1 s a state)
    x = logits(rng, small((4, 8), (64, 100)), np.float64, 1.0)
    d = gpu(x)
    soft = to_host(sk.gumbel_softmax(d, seed=42, block=BLOCK))
    assert soft.dtype == np.float64 and soft.shape == x.shape
    other = sk.gumbel_softmax(d, seed=43, block=BLOCK)
    assert not np.array_equal(soft, to_host(other))
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-12)
    assert len({row.tobytes() for row in soft}) == len(soft)
    # the same seed, the same sample: hard is exactly the soft sample's argmax,
    # and at another temperature y_2 is proportional to sqrt(y_1)
    hard = to_host(sk.gumbel_softmax(d, hard=True, seed=42, block=BLOCK))
    np.testing.assert_array_equal(hard, np.eye(x.shape[1])[np.argmax(soft, 1)])
    y2 = to_host(sk.gumbel_softmax(d, tau=2.0, seed=42, block=BLOCK))
    s = np.sqrt(soft)
    np.testing.assert_allclose(y2, s / s.sum(1, keepdims=True), rtol=1e-9)
    np.testing.assert_array_equal(to_host(d), x)


def test_gumbel_dim0_and_float16(rng):
    x = logits(rng, (8, 4), np.float16, 1.0)  # dim 0: the columns regime
    hard = to_host(sk.gumbel_softmax(gpu(x), hard=True, dim=0, seed=5, block=BLOCK))
    assert hard.dtype == np.float16 and set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(0), 1)
    soft = to_host(sk.gumbel_softmax(gpu(x), dim=0, seed=5, block=BLOCK))
    assert soft.dtype == np.float16
    np.testing.assert_allclose(soft.astype(np.float64).sum(0), 1.0, rtol=2e-3)
    hot = np.argmax(hard, 0)
    np.testing.assert_array_equal(soft[hot, range(4)], soft.max(0))


@pytest.mark.skipif(
    SIMULATOR, reason="the simulator draws ~100 numbers a second (CPU test checks)"
)
def test_gumbel_samples_follow_softmax(rng):
    # the Gumbel-max trick: argmax(x + g) ~ Categorical(softmax(x)), along
    # dim 0 of a (4, n) array (columns) and dim 1 of its transpose (warp)
    n = 200_000
    row = np.array([0.0, 1.0, -1.0, 0.5], np.float32)
    p = EXACT["softmax"](row, 0)
    se = np.sqrt(p * (1 - p) / n)
    for x, dim in ((np.repeat(row[:, None], n, 1), 0), (np.tile(row, (n, 1)), 1)):
        seed = int(rng.integers(2**31))
        hard = to_host(sk.gumbel_softmax(gpu(x), hard=True, dim=dim, seed=seed))
        freq = hard.astype(np.float64).mean(1 - dim)
        assert np.all(np.abs(freq - p) <= 5 * se), (dim, freq, p)


def test_gumbel_errors_on_the_gpu():
    d = gpu(np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError):
        sk.gumbel_softmax(gpu(np.zeros((3, 4), np.int32)), seed=0)
    with pytest.raises(ValueError):
        sk.gumbel_softmax(d, tau=0.0, seed=0)
