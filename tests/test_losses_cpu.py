"""cross_entropy, nll_loss, cross_entropy_backward, sigmoid, logsigmoid and
gumbel_softmax on the CPU.

References are the float64 NumPy ones of ``softkern.testing.references``
(themselves checked against torch.nn.functional); PyTorch's semantics for
special values are checked against torch itself when it is installed, and
against hand-written expectations always.
"""

import tracemalloc
import warnings

import numpy as np
import pytest

import softkern as sk
from softkern.testing.references import EXACT

ref_ce = EXACT["cross_entropy"]
ref_nll = EXACT["nll_loss"]
ref_ce_backward = EXACT["cross_entropy_backward"]

# The spec's bounds; float16 computes in float32 and rounds the result
# (half an ulp is 2**-11 relative).
TOL = {np.float16: 1e-3, np.float32: 1e-5, np.float64: 1e-12}
REDUCTIONS = ["none", "sum", "mean"]
INF = np.inf

# input shapes: the class dim is 1, or 0 for 1-D input
SHAPES = [
    (7, 5),  # (N, C)
    (6,),  # (C,) with a 0-d target
    (3, 4, 6),  # (N, C, d1)
    (2, 3, 4, 5),  # (N, C, d1, d2)
    (3, 3000),  # long rows, ragged tail of any vector width
    (2, 9000),  # rows of three tiles (the gradient's tiles merge)
    (2, 300, 3),  # long class dim, K-dim
]

# option sets of the index-target tests
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100},  # a third of the targets ignored
    "ignore_class": {"ignore_index": 1},  # a valid class is ignored
    "smoothing": {"label_smoothing": 0.25},
    "everything": {"weight": True, "ignore_index": 2, "label_smoothing": 0.1},
}


def class_dim(shape):
    return min(1, len(shape) - 1)


def classes(shape):
    return shape[class_dim(shape)]


def batch(shape):
    """The target's shape for index targets."""
    return shape[:1] + shape[2:] if len(shape) > 1 else ()


def logits(rng, shape, dtype=np.float32, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def index_target(rng, shape, ignore_index=None, dtype=np.int64):
    t = np.asarray(rng.integers(0, classes(shape), batch(shape)))
    if ignore_index is not None:
        t[rng.random(t.shape) < 1 / 3] = ignore_index
    return t.astype(dtype)


def prob_target(rng, shape, dtype=np.float32):
    q = rng.random(shape) ** 3
    return (q / q.sum(class_dim(shape), keepdims=True)).astype(dtype)


def problem(rng, shape, dtype, option):
    """Logits, an index target and the keyword arguments of `option`."""
    kwargs = dict(OPTIONS[option])
    if kwargs.pop("weight", False):
        kwargs["weight"] = rng.uniform(0.2, 2.0, classes(shape)).astype(dtype)
    t = index_target(rng, shape, kwargs.get("ignore_index"))
    return logits(rng, shape, dtype), t, kwargs


def check_loss(got, ref, dtype):
    """Per element for "none", the scalar for sum and mean; relative, with
    an absolute floor of 1 (a loss is a difference of logsumexp and a logit)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == dtype and got.shape == ref.shape, (got.dtype, got.shape)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[~finite], ref[~finite])  # NaN, inf
    err = np.abs(got[finite] - ref[finite]) / np.maximum(1.0, np.abs(ref[finite]))
    assert err.max(initial=0) <= TOL[np.dtype(dtype).type], err.max()


def grad_floor(
    x, t, g=1.0, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """|g_i| times the weight a_i of position i's terms (grad = g_i (p a_i -
    ...)): the size of what the gradient cancels (p_t - 1 as p_t -> 1), so
    rounding p alone costs up to an ulp of it."""
    axis, c = class_dim(x.shape), classes(x.shape)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    eps, wc = label_smoothing, np.expand_dims(w, tuple(range(1, x.ndim - axis)))
    t = np.asarray(t)
    if t.shape == x.shape:  # probabilities
        a = (wc * (t * (1 - eps) + eps / c)).sum(axis)
        denominator = a.size
    else:
        kept = t != ignore_index
        wt = np.where(kept, w[np.where(kept, t, 0)], 0.0)
        a = np.where(kept, (1 - eps) * wt + eps / c * w.sum(), 0.0)
        denominator = wt.sum()
    # all ignored: every a_i is 0, whatever the denominator
    g = np.asarray(g, np.float64) / ((denominator or 1) if reduction == "mean" else 1)
    return np.abs(g * a)


def check_backward(got, x, t, g=1.0, *, ref=None, tol=None, **kw):
    """cross_entropy_backward's result against `ref` (default: the reference):
    abs error <= tol * the larger of max|ref| over each position's classes
    and grad_floor (float32 rounds p_t to 6e-8 of 1, so p_t - 1 = -1e-4 can
    carry 1e-3 relative error: max|ref| alone is no fair scale there)."""
    ref = ref_ce_backward(x, t, g, **kw) if ref is None else ref
    got = np.asarray(got)
    assert got.dtype == x.dtype and got.shape == ref.shape, (got.dtype, got.shape)
    axis = class_dim(ref.shape)
    err = np.abs(got.astype(np.float64) - ref).max(axis, initial=0)
    scale = np.maximum(np.abs(ref).max(axis, initial=0), grad_floor(x, t, g, **kw))
    tol = TOL[x.dtype.type] if tol is None else tol
    assert np.all(err <= tol * scale), (err, scale)


# --- cross_entropy: index targets ---------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_index_targets_match_reference(rng, shape, dtype, option, reduction):
    x, t, kwargs = problem(rng, shape, dtype, option)
    got = sk.cross_entropy(x, t, reduction=reduction, **kwargs)
    check_loss(got, ref_ce(x, t, reduction=reduction, **kwargs), dtype)


@pytest.mark.parametrize("scale", [30.0, 1e3])  # exp overflows unshifted
def test_large_logits_are_stable(rng, scale):
    x = logits(rng, (6, 50), np.float32, scale)
    t = index_target(rng, x.shape)
    ref = ref_ce(x, t, reduction="none")
    got = sk.cross_entropy(x, t, reduction="none")
    # float32 keeps |x| to 2**-24 relative: the loss to that of the row
    tol = 2e-7 * np.abs(x).max()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=tol)
    shifted = sk.cross_entropy(x.astype(np.float64) + 1e4, t, reduction="none")
    np.testing.assert_allclose(shifted, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "target_dtype",
    [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64],
)
def test_any_integer_target_dtype(rng, target_dtype):
    x = logits(rng, (9, 7))
    t = index_target(rng, x.shape, dtype=target_dtype)
    for reduction in REDUCTIONS:
        got = sk.cross_entropy(x, t, reduction=reduction)
        check_loss(got, ref_ce(x, t, reduction=reduction), np.float32)
    # the ignored class need not be representable in the target's dtype
    got = sk.cross_entropy(x, t, ignore_index=3)
    check_loss(got, ref_ce(x, t.astype(np.int64), ignore_index=3), np.float32)


def test_weight_of_any_dtype(rng):
    x, t = logits(rng, (8, 4)), index_target(rng, (8, 4))
    w = np.array([1, 2, 0, 3])
    ref = ref_ce(x, t, w)
    for weight in (w, w.astype(np.float64), w.astype(np.float32), w.tolist()):
        check_loss(sk.cross_entropy(x, t, weight), ref, np.float32)


def test_mean_divides_by_the_weights_of_kept_targets():
    x = np.zeros((3, 2), np.float32)  # every loss is log 2
    t = np.array([0, 1, -100])
    w = np.array([1.0, 3.0], np.float32)
    assert np.isclose(sk.cross_entropy(x, t, w, reduction="sum"), 4 * np.log(2))
    assert np.isclose(sk.cross_entropy(x, t, w), np.log(2))
    np.testing.assert_allclose(
        sk.cross_entropy(x, t, w, reduction="none"), [np.log(2), 3 * np.log(2), 0]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_targets_ignored(rng, dtype):
    for shape in [(4, 5), (5,), (2, 5, 3)]:
        x = logits(rng, shape, dtype)
        t = np.full(batch(shape), 3)
        for eps in (0.0, 0.2):
            kw = {"ignore_index": 3, "label_smoothing": eps}
            mean = np.asarray(sk.cross_entropy(x, t, **kw))
            assert mean.shape == () and mean.dtype == dtype and np.isnan(mean)
            total = np.asarray(sk.cross_entropy(x, t, reduction="sum", **kw))
            assert total.shape == () and total == 0
            none = sk.cross_entropy(x, t, reduction="none", **kw)
            np.testing.assert_array_equal(none, np.zeros(t.shape, dtype))
            grad = sk.cross_entropy_backward(x, t, **kw)  # mean: 0, not NaN
            np.testing.assert_array_equal(grad, np.zeros(shape, dtype))


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2}, {"lse_square_scale": 0.01}]
)
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)])
def test_mean_over_zero_weight_is_nan(rng, shape, options):
    # every counted target weighs 0: PyTorch's mean is 0 / 0, and its
    # smoothed mean adds (1 - eps) * that NaN to a positive smooth term
    # over 0 (inf): NaN as well, which the z-loss follows
    x = logits(rng, shape)
    t = index_target(rng, shape, ignore_index=-100)
    t.flat[0] = 1
    w = np.ones(classes(shape), np.float32)
    w[np.unique(t[t >= 0])] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(sk.cross_entropy(x, t, w, **options))
        loss, grad = sk.cross_entropy_and_grad(x, t, w, **options)
    assert np.isnan(loss)
    np.testing.assert_array_equal(
        grad, sk.cross_entropy_backward(x, t, 1.0, w, **options)
    )
    if not options.get("lse_square_scale"):  # PyTorch has no z-loss
        torch = pytest.importorskip("torch")
        eps = options.get("label_smoothing", 0.0)
        xt = torch.from_numpy(x).requires_grad_()
        expected = torch.nn.functional.cross_entropy(
            xt, torch.from_numpy(t), torch.from_numpy(w), label_smoothing=eps
        )
        expected.backward()
        assert torch.isnan(expected)
        np.testing.assert_array_equal(grad, xt.grad.numpy())  # NaN, 0 where ignored


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3), (2, 4, 0), (0, 3, 0, 2)])
def test_empty_batch(shape):
    x = np.empty(shape, np.float32)
    t = np.empty(batch(shape), np.int64)
    mean = np.asarray(sk.cross_entropy(x, t))
    assert mean.shape == () and mean.dtype == np.float32 and np.isnan(mean)
    assert np.asarray(sk.cross_entropy(x, t, reduction="sum")) == 0
    none = sk.cross_entropy(x, t, reduction="none")
    assert none.shape == t.shape and none.dtype == np.float32
    assert np.isnan(sk.nll_loss(x, t)) and sk.nll_loss(x, t, reduction="sum") == 0
    q = np.empty(shape, np.float32)
    assert np.isnan(sk.cross_entropy(x, q))
    assert sk.cross_entropy(x, q, reduction="sum") == 0
    for tgt in (t, q):
        grad = sk.cross_entropy_backward(x, tgt)
        assert grad.shape == shape and grad.dtype == np.float32


def test_one_d_input_gives_0d_results(rng):
    x = logits(rng, (5,))
    t = np.array(3)
    for reduction in REDUCTIONS:
        for tgt in (t, prob_target(rng, (5,))):
            got = np.asarray(sk.cross_entropy(x, tgt, reduction=reduction))
            assert got.shape == () and got.dtype == np.float32
            check_loss(got, ref_ce(x, tgt, reduction=reduction), np.float32)
        got = np.asarray(sk.nll_loss(x, t, reduction=reduction))
        assert got.shape == () and got == np.float32(-x[3])


# --- cross_entropy: probability targets ---------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_probability_targets_match_reference(
    rng, shape, dtype, weighted, eps, reduction
):
    x, q = logits(rng, shape, dtype), prob_target(rng, shape, dtype)
    w = rng.uniform(0.2, 2.0, classes(shape)) if weighted else None
    got = sk.cross_entropy(x, q, w, reduction=reduction, label_smoothing=eps)
    check_loss(got, ref_ce(x, q, w, reduction=reduction, label_smoothing=eps), dtype)


@pytest.mark.parametrize("target_dtype", [np.float16, np.float32, np.float64])
def test_probability_targets_of_any_float_dtype(rng, target_dtype):
    x = logits(rng, (5, 7))
    q = prob_target(rng, x.shape, target_dtype)
    check_loss(sk.cross_entropy(x, q), ref_ce(x, q), np.float32)


def test_probability_targets_ignore_nothing(rng):
    # ignore_index applies to index targets only; mean divides by N * d1
    x = logits(rng, (3, 4, 2))
    q = prob_target(rng, x.shape)
    q[:, 1] = 0  # class 1 never targeted
    loss = sk.cross_entropy(x, q, ignore_index=1, reduction="none")
    check_loss(loss, ref_ce(x, q, reduction="none"), np.float32)
    mean = sk.cross_entropy(x, q, np.array([1, 5, 2, 0.5]), ignore_index=0)
    total = ref_ce(x, q, np.array([1, 5, 2, 0.5]), reduction="sum")
    assert np.isclose(mean, total / 6, rtol=1e-5)


def test_one_hot_probabilities_equal_index_targets(rng):
    x = logits(rng, (6, 5, 3), np.float64)
    t = index_target(rng, x.shape)
    q = np.moveaxis(np.eye(5)[t], -1, 1)
    w = rng.uniform(0.5, 2, 5)
    for eps in (0.0, 0.4):
        kw = {"label_smoothing": eps, "reduction": "none"}
        np.testing.assert_allclose(
            sk.cross_entropy(x, q, w, **kw), sk.cross_entropy(x, t, w, **kw), 1e-12
        )


# --- label smoothing ----------------------------------------------------------


def test_label_smoothing_by_hand():
    x = np.array([[1.0, 2.0, 3.0]])
    logp = x - np.log(np.exp(x).sum())
    for eps in (0.0, 0.1, 1.0):
        expected = -(1 - eps) * logp[0, 0] - eps / 3 * logp.sum()
        got = sk.cross_entropy(x, np.array([0]), label_smoothing=eps)
        assert np.isclose(got, expected, rtol=1e-12, atol=0)
        q = np.array([[0.0, 1.0, 0.0]])
        expected = -((q * (1 - eps) + eps / 3) * logp).sum()
        got = sk.cross_entropy(x, q, label_smoothing=eps)
        assert np.isclose(got, expected, rtol=1e-12, atol=0)


# --- float16 ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 40), (40,), (3, 9, 4)])
def test_float16_computes_in_float32(rng, shape, reduction):
    x = logits(rng, shape, np.float16)
    t = index_target(rng, shape)
    q = prob_target(rng, shape, np.float16)
    w = rng.uniform(0.5, 2, classes(shape)).astype(np.float16)
    for tgt in (t, q):
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        got = sk.cross_entropy(x, tgt, w, **kw)
        check_loss(got, ref_ce(x, tgt, w, **kw), np.float16)
    got = sk.cross_entropy_backward(x, t, 1.0, w, label_smoothing=0.1)
    check_backward(got, x, t, tol=2e-3, weight=w, label_smoothing=0.1)
    got = sk.nll_loss(x, t, w, reduction=reduction)
    check_loss(got, ref_nll(x, t, w, reduction=reduction), np.float16)


def test_float16_large_sum_does_not_overflow_in_float16():
    x = np.zeros((4000, 2), np.float16)
    t = np.zeros(4000, np.int64)
    total = sk.cross_entropy(x, t, reduction="sum")  # 2773: fits float16
    assert total.dtype == np.float16 and np.isclose(total, 4000 * np.log(2), 1e-3)


# --- special values -----------------------------------------------------------

SPECIAL_X = np.array(
    [
        [1.0, -INF, 2.0],  # -inf among finite logits
        [1.0, -INF, 2.0],  # ... and targeted: +inf
        [INF, 1.0, 2.0],  # +inf: NaN
        [np.nan, 1.0, 2.0],  # NaN: NaN
        [-INF, -INF, -INF],  # only -inf: NaN
        [np.nan, 1.0, 2.0],  # NaN but ignored: 0
        [3.0, 3.0, 3.0],  # ties
    ]
)
SPECIAL_T = np.array([0, 1, 0, 1, 2, -100, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_by_hand(dtype):
    x = SPECIAL_X.astype(dtype)
    got = sk.cross_entropy(x, SPECIAL_T, reduction="none")
    assert got.dtype == dtype
    assert np.isclose(got[0], np.log1p(np.exp(1.0)), rtol=1e-6)
    assert got[1] == INF
    assert np.isnan(got[2:5]).all()
    assert got[5] == 0
    assert np.isclose(got[6], np.log(3), rtol=1e-6)
    assert np.isnan(sk.cross_entropy(x, SPECIAL_T))
    assert np.isnan(sk.cross_entropy(x, SPECIAL_T, reduction="sum"))
    # smoothing touches every logit: -inf anywhere makes the loss inf
    keep = [0, 5, 6]
    smooth = sk.cross_entropy(
        x[keep], SPECIAL_T[keep], reduction="none", label_smoothing=0.1
    )
    np.testing.assert_array_equal(smooth[:2], [INF, 0])
    check_loss(
        smooth,
        ref_ce(x[keep], SPECIAL_T[keep], reduction="none", label_smoothing=0.1),
        dtype,
    )
    check_loss(got, ref_ce(x, SPECIAL_T, reduction="none"), dtype)
    # rows without NaN/inf are untouched by their neighbours: finite grads
    grad = sk.cross_entropy_backward(x, SPECIAL_T, reduction="sum")
    assert np.isfinite(grad[[0, 1, 6]]).all()
    np.testing.assert_allclose(grad[6], [1 / 3, -2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(grad[0, 1], 0, atol=0)  # p = 0 where x = -inf
    assert np.isnan(grad[2:5]).all()


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 3.0}])
def test_ignored_positions_get_zero_gradients_whatever_their_logits(options):
    # +inf, NaN and only -inf in ignored positions: 0 (the documented rule;
    # PyTorch's autograd gives NaN there), in the rows and columns layouts
    x = np.resize(SPECIAL_X[[2, 3, 4, 0]], (4, 3)).astype(np.float32)
    t = np.array([-100, -100, -100, 2])
    for data, target in ((x, t), (np.moveaxis(x[None], 1, 2).copy(), t[None])):
        for grad in (
            sk.cross_entropy_backward(data, target, **options),
            sk.cross_entropy_and_grad(data, target, **options)[1],
        ):
            rows = grad if grad.ndim == 2 else grad[0].T  # (position, class)
            np.testing.assert_array_equal(rows[:3], 0)
            assert np.isfinite(rows[3]).all()


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_agree_with_torch(dtype, reduction, eps):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = SPECIAL_X.astype(dtype)
    for rows in (slice(None), [0, 1, 5, 6], [0, 6]):
        xs, ts = x[rows], SPECIAL_T[rows]
        kw = {"reduction": reduction, "label_smoothing": eps}
        expected = functional.cross_entropy(
            torch.from_numpy(xs), torch.from_numpy(ts), **kw
        ).numpy()
        got = np.asarray(sk.cross_entropy(xs, ts, **kw))
        np.testing.assert_allclose(got, expected, rtol=TOL[dtype] * 4)


# --- cross_entropy_backward ---------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_index_targets(rng, shape, dtype, option, reduction):
    x, t, kwargs = problem(rng, shape, dtype, option)
    g = rng.standard_normal(t.shape).astype(dtype) if reduction == "none" else 0.7
    got = sk.cross_entropy_backward(x, t, g, reduction=reduction, **kwargs)
    check_backward(got, x, t, g, reduction=reduction, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_probability_targets(rng, shape, dtype, reduction):
    x, q = logits(rng, shape, dtype), prob_target(rng, shape, dtype)
    w = rng.uniform(0.2, 2.0, classes(shape))
    g = rng.standard_normal(batch(shape)) if reduction == "none" else -1.5
    kw = {"weight": w, "reduction": reduction, "label_smoothing": 0.2}
    got = sk.cross_entropy_backward(x, q, g, **kw)
    check_backward(got, x, q, g, **kw)


def test_backward_grad_output_forms(rng):
    x = logits(rng, (4, 6, 3), np.float64)
    t = index_target(rng, x.shape, ignore_index=-100)
    check_backward(sk.cross_entropy_backward(x, t), x, t)  # default 1.0, mean
    for reduction in ("sum", "mean"):
        for g in (2.5, np.array(2.5), np.float32(2.5), np.array(2.5, np.float32)):
            got = sk.cross_entropy_backward(x, t, g, reduction=reduction)
            check_backward(got, x, t, 2.5, reduction=reduction)
        ints = sk.cross_entropy_backward(x, t, 2, reduction=reduction)
        check_backward(ints, x, t, 2.0, reduction=reduction)
    g = rng.standard_normal((4, 3))
    got = sk.cross_entropy_backward(x, t, g, reduction="none")
    check_backward(got, x, t, g, reduction="none")
    # a strided grad_output is read in place
    wide = np.repeat(g, 2, axis=1)[:, ::2]
    got = sk.cross_entropy_backward(x, t, wide, reduction="none")
    check_backward(got, x, t, g, reduction="none")
    zero = sk.cross_entropy_backward(x, t, 0.0, reduction="sum")
    np.testing.assert_array_equal(zero, np.zeros_like(x))


def test_fused_gradient_does_not_depend_on_where_out_lies(rng):
    # As the softmax's: the fused pass stores exponentials into out while
    # summing them; an out just after x once took LLVM's scalar copy.
    for dtype, classes in ((np.float64, 4), (np.float32, 7)):
        buf = np.empty(60 * classes, dtype)
        x = buf[: 3 * classes].reshape(3, classes)  # rows regime
        x[:] = rng.standard_normal(x.shape)
        target = rng.integers(0, classes, 3)
        loss, grad = sk.cross_entropy_and_grad(x.copy(), target)
        for start in range(3 * classes, 3 * classes + 40):
            out = buf[start : start + 3 * classes].reshape(3, classes)
            out[:] = np.nan
            again, _ = sk.cross_entropy_and_grad(x, target, out=out)
            assert again == loss
            np.testing.assert_array_equal(out, grad)


def test_backward_by_finite_differences(rng):
    x = logits(rng, (3, 4), np.float64)
    t = np.array([1, -100, 3])
    kw = {"weight": np.array([0.5, 1.0, 2.0, 1.5]), "label_smoothing": 0.3}
    grad = sk.cross_entropy_backward(x, t, 1.0, **kw)
    h = 1e-6
    for i, j in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i, j] += h
        down[i, j] -= h
        numeric = (sk.cross_entropy(up, t, **kw) - sk.cross_entropy(down, t, **kw)) / (
            2 * h
        )
        assert np.isclose(grad[i, j], numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_equals_torch_autograd(rng, reduction):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    for shape in [(5, 7), (7,), (3, 4, 5)]:
        x = logits(rng, shape, np.float64)
        w = rng.uniform(0.2, 2, classes(shape))
        for tgt in (
            index_target(rng, shape, -100),
            prob_target(rng, shape, np.float64),
        ):
            kw = {"reduction": reduction, "label_smoothing": 0.1}
            xt = torch.from_numpy(x).requires_grad_()
            loss = functional.cross_entropy(
                xt, torch.from_numpy(tgt), torch.from_numpy(w), **kw
            )
            g = np.asarray(rng.standard_normal(loss.shape))  # 0-d for sum, mean
            loss.backward(torch.from_numpy(g))
            got = sk.cross_entropy_backward(x, tgt, g, w, **kw)
            check_backward(got, x, tgt, g, ref=xt.grad.numpy(), weight=w, **kw)


# --- nll_loss -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore", "ignore_class"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_nll_loss_matches_reference(rng, shape, dtype, option, reduction):
    x, t, kwargs = problem(rng, shape, dtype, option)
    got = sk.nll_loss(x, t, reduction=reduction, **kwargs)
    check_loss(got, ref_nll(x, t, reduction=reduction, **kwargs), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_is_nll_of_log_softmax(rng, shape, reduction):
    x = logits(rng, shape, np.float64)
    t = index_target(rng, shape, ignore_index=-100)
    w = rng.uniform(0.2, 2, classes(shape))
    logp = sk.log_softmax(x, class_dim(shape))
    np.testing.assert_allclose(
        sk.nll_loss(logp, t, w, reduction=reduction),
        sk.cross_entropy(x, t, w, reduction=reduction),
        rtol=1e-12,
        atol=1e-12,
    )


def test_nll_loss_special_values():
    x = np.array([[-INF, 0.0], [np.nan, 0.0], [np.nan, -1.0]], np.float32)
    got = sk.nll_loss(x, np.array([0, 1, -100]), reduction="none")
    np.testing.assert_array_equal(got, [INF, 0, 0])  # only the target is read
    assert sk.nll_loss(x[:2], np.array([0, 1])) == INF


def test_nll_loss_agrees_with_torch(rng):
    torch = pytest.importorskip("torch")
    x = logits(rng, (6, 5, 2), np.float64)
    t = index_target(rng, x.shape, ignore_index=4)
    w = rng.uniform(0.2, 2, 5)
    for reduction in REDUCTIONS:
        expected = torch.nn.functional.nll_loss(
            torch.from_numpy(x),
            torch.from_numpy(t),
            torch.from_numpy(w),
            ignore_index=4,
            reduction=reduction,
        )
        got = sk.nll_loss(x, t, w, ignore_index=4, reduction=reduction)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-14)


# --- errors -------------------------------------------------------------------

LOSSES = [sk.cross_entropy, sk.nll_loss, sk.cross_entropy_backward]


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_errors(fn):
    x = np.zeros((3, 4), np.float32)
    t = np.array([0, 1, 3])
    with pytest.raises(ValueError, match="avg"):
        fn(x, t, reduction="avg")
    with pytest.raises(ValueError):
        fn(x, t, weight=np.ones(5, np.float32))
    with pytest.raises(ValueError):
        fn(x, t, weight=np.ones((1, 4), np.float32))
    with pytest.raises(ValueError):
        fn(x, np.array([0, 1]))  # N vs N'
    with pytest.raises(ValueError):
        fn(np.zeros((3, 4, 5), np.float32), np.zeros((3, 6), np.int64))  # d1
    with pytest.raises(ValueError):
        fn(np.zeros((3, 4, 5), np.float32), np.zeros(3, np.int64))  # K vs 0
    with pytest.raises(ValueError):
        fn(np.zeros(4, np.float32), np.array([1]))  # (C,) takes a 0-d target
    with pytest.raises(ValueError):
        fn(np.array(1.0, np.float32), np.array(0))  # 0-d input
    for bad, dtype in ((7, np.int64), (4, np.int32), (-1, np.int64), (200, np.uint8)):
        with pytest.raises(IndexError, match=str(bad)):
            fn(x, np.array([0, bad, 1], dtype))
    with pytest.raises(IndexError, match="-100"):
        fn(x, np.array([0, -100, 1]), ignore_index=-1)
    with pytest.raises(IndexError, match="9"):
        fn(np.zeros((2, 4, 3), np.float32), np.array([[0, 1, 2], [3, 9, 0]]))
    for dtype in (np.int32, np.int64, np.bool_):
        with pytest.raises(TypeError):
            fn(x.astype(dtype), t)
    with pytest.raises(TypeError):
        fn(x, t.astype(np.bool_))
    with pytest.raises(TypeError):
        fn(x, t.astype(np.float32))  # a float target of the batch shape
    # a same-shape integer target: not probabilities; nll_loss takes none, so
    # there it is only a target of the wrong shape
    with pytest.raises(ValueError if fn is sk.nll_loss else TypeError):
        fn(x, np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError):
        fn(x, t, reduce=3)
    with pytest.raises(ValueError):
        fn(x, t, block=48)
    # reduce and block are validated, then ignored by the CPU
    np.testing.assert_array_equal(fn(x, t, reduce=0, block=64), fn(x, t))


@pytest.mark.parametrize("fn", [sk.cross_entropy, sk.cross_entropy_backward])
def test_label_smoothing_range(fn):
    x = np.zeros((3, 4), np.float32)
    t = np.array([0, 1, 3])
    for eps in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError):
            fn(x, t, label_smoothing=eps)
    for eps in (0, 1, 0.5):
        assert np.isfinite(fn(x, t, label_smoothing=eps)).all()


def test_nll_loss_takes_no_probability_targets():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError):
        sk.nll_loss(x, np.full((3, 4), 0.25, np.float32))


def test_inputs_are_not_modified(rng):
    x = logits(rng, (5, 6, 2))
    t = index_target(rng, x.shape, ignore_index=-100)
    q = prob_target(rng, x.shape)
    w = rng.uniform(0.5, 2, 6).astype(np.float32)
    g = rng.standard_normal((5, 2)).astype(np.float32)
    keep = [a.copy() for a in (x, t, q, w, g)]
    for tgt in (t, q):
        for reduction in REDUCTIONS:
            sk.cross_entropy(x, tgt, w, reduction=reduction, label_smoothing=0.1)
        sk.cross_entropy_backward(x, tgt, g, w, reduction="none", label_smoothing=0.1)
    sk.nll_loss(x, t, w)
    sk.sigmoid(x)
    sk.logsigmoid(x)
    sk.gumbel_softmax(x, hard=True, seed=1)
    for a, b in zip((x, t, q, w, g), keep, strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs(rng):
    base = logits(rng, (6, 10, 8), np.float64)
    x = base[::2, 1::2, :]  # (3, 5, 8): every dim strided
    tbase = rng.integers(0, 5, (3, 16))
    t = tbase[:, ::2]
    w = rng.uniform(0.5, 2, 10)[::2]
    for reduction in REDUCTIONS:
        got = sk.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
        ref = ref_ce(x, t, w, reduction=reduction, label_smoothing=0.1)
        check_loss(got, ref, np.float64)
    xt = logits(rng, (9, 4), np.float64).T  # (4, 9): classes 4 elements apart
    tt = index_target(rng, xt.shape)
    check_loss(
        sk.cross_entropy(xt, tt, reduction="none"),
        ref_ce(xt, tt, reduction="none"),
        np.float64,
    )
    check_backward(sk.cross_entropy_backward(xt, tt), xt, tt)


# --- memory -------------------------------------------------------------------


def peak_bytes(fn):
    fn()  # compile outside the measurement
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_cross_entropy_allocates_no_copy_of_the_input(rng):
    x = logits(rng, (4096, 1024))
    t = index_target(rng, x.shape)
    for reduction in ("mean", "none"):
        peak = peak_bytes(lambda r=reduction: sk.cross_entropy(x, t, reduction=r))
        # O(N): the loss per row at most, never a (N, C) temporary (16 MiB)
        assert peak < 1 << 20, (reduction, peak)


def test_backward_allocates_only_its_output(rng):
    x = logits(rng, (4096, 1024))
    t = index_target(rng, x.shape)
    peak = peak_bytes(lambda: sk.cross_entropy_backward(x, t))
    assert peak < x.nbytes + 256 * 1024, peak


# --- sigmoid, logsigmoid ------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_matches_reference(rng, dtype):
    x = (rng.standard_normal((7, 33)) * 15).astype(dtype)
    tol, tiny = TOL[dtype], np.finfo(dtype).tiny
    for fn, name in ((sk.sigmoid, "sigmoid"), (sk.logsigmoid, "logsigmoid")):
        got = fn(x)
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_allclose(got, EXACT[name](x), rtol=tol, atol=tiny)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sigmoid_extremes_and_special_values(dtype):
    x = np.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, INF, -INF, np.nan], dtype)
    s, ls = sk.sigmoid(x), sk.logsigmoid(x)
    assert s.dtype == dtype and ls.dtype == dtype
    assert s[0] == 0 and s[3] == 0.5 and s[6] == 1 and s[7] == 1 and s[8] == 0
    assert np.isnan(s[9]) and np.isnan(ls[9])
    assert ls[7] == 0 and ls[8] == -INF
    assert ls[0] == dtype(-1e4)  # no log(0) for very negative x
    assert np.isfinite(s[:7]).all() and np.isfinite(ls[:7]).all()
    # underflow (sigmoid(-100) in float32, sigmoid(-20) in float16) is fair
    tol, tiny = TOL[dtype], np.finfo(dtype).tiny
    np.testing.assert_allclose(s[:7], EXACT["sigmoid"](x)[:7], rtol=tol, atol=tiny)
    np.testing.assert_allclose(ls[:7], EXACT["logsigmoid"](x)[:7], tol, tiny)


def test_sigmoid_agrees_with_torch(rng):
    torch = pytest.importorskip("torch")
    x = np.concatenate([rng.standard_normal(100) * 30, [1e4, -1e4, INF, -INF, np.nan]])
    for dtype in (np.float32, np.float64):
        t = torch.from_numpy(x.astype(dtype))
        tol, tiny = 4 * TOL[dtype], np.finfo(dtype).tiny
        np.testing.assert_allclose(
            sk.sigmoid(x.astype(dtype)), torch.sigmoid(t).numpy(), tol, tiny
        )
        expected = torch.nn.functional.logsigmoid(t).numpy()
        np.testing.assert_allclose(sk.logsigmoid(x.astype(dtype)), expected, tol, tiny)
    ints = np.arange(-3, 4, dtype=np.int32)
    assert sk.sigmoid(ints).dtype == torch.sigmoid(torch.from_numpy(ints)).numpy().dtype


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.bool_])
def test_sigmoid_of_integers_is_float32(dtype):
    x = np.array([0, 1, 2, 1, 0], dtype)
    for fn, name in ((sk.sigmoid, "sigmoid"), (sk.logsigmoid, "logsigmoid")):
        got = fn(x)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, EXACT[name](x), rtol=1e-6)


def test_sigmoid_any_shape_and_strides(rng):
    base = rng.standard_normal((6, 10, 8)) * 5
    views = [base[::2, 1::3], base.transpose(2, 0, 1), base[..., ::-1], base[0, 0]]
    for v in [*views, np.asarray(base[1, 2, 3]), np.empty((3, 0))]:
        for fn, name in ((sk.sigmoid, "sigmoid"), (sk.logsigmoid, "logsigmoid")):
            got = fn(v)
            assert got.shape == v.shape
            np.testing.assert_allclose(got, EXACT[name](v), rtol=1e-12)
    assert sk.sigmoid(base).shape == base.shape


def test_float16_sigmoid(rng):
    x = (rng.standard_normal(200) * 8).astype(np.float16)
    np.testing.assert_allclose(sk.sigmoid(x), EXACT["sigmoid"](x), 1e-3, 1e-7)
    np.testing.assert_allclose(
        sk.logsigmoid(x), EXACT["logsigmoid"](x), rtol=1e-3, atol=1e-7
    )


# --- gumbel_softmax -----------------------------------------------------------


def test_gumbel_same_seed_same_result(rng):
    x = logits(rng, (16, 10))
    a = sk.gumbel_softmax(x, seed=1234)
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, sk.gumbel_softmax(x, seed=1234))
    assert not np.array_equal(a, sk.gumbel_softmax(x, seed=1235))
    assert not np.array_equal(sk.gumbel_softmax(x), sk.gumbel_softmax(x))  # seed None
    # the noise is not the same on every row
    z = sk.gumbel_softmax(np.zeros((8, 10), np.float32), seed=3)
    assert len({row.tobytes() for row in z}) == 8


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "dim"), [((9, 12), -1), ((12, 9), 0), ((3, 7, 4), 1), ((20,), 0)]
)
def test_gumbel_rows_sum_to_one_and_hard_is_one_hot(rng, shape, dim, dtype):
    x = logits(rng, shape, dtype, 1.0)
    soft = sk.gumbel_softmax(x, dim=dim, seed=7)
    assert soft.dtype == dtype and soft.shape == shape
    assert (soft >= 0).all()
    tol = 1e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(soft.astype(np.float64).sum(dim), 1.0, rtol=tol)
    hard = sk.gumbel_softmax(x, hard=True, dim=dim, seed=7)
    assert hard.dtype == dtype and hard.shape == shape
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(dim), 1)
    # the hot class is the soft sample's largest (ties may round together)
    hot = np.expand_dims(np.argmax(hard, axis=dim), dim)
    top = np.take_along_axis(soft, hot, dim)
    np.testing.assert_array_equal(top, soft.max(dim, keepdims=True))


def test_gumbel_tau_scales_the_same_noise(rng):
    # y_tau = softmax((x + g) / tau): with the same g, y_2 is proportional to
    # sqrt(y_1), and small tau tends to the hard sample
    x = logits(rng, (10, 6), np.float64, 1.0)
    y1 = sk.gumbel_softmax(x, tau=1.0, seed=5)
    y2 = sk.gumbel_softmax(x, tau=2.0, seed=5)
    s = np.sqrt(y1)
    np.testing.assert_allclose(y2, s / s.sum(1, keepdims=True), rtol=1e-9)
    cold = sk.gumbel_softmax(x, tau=1e-5, seed=5)
    np.testing.assert_allclose(cold, sk.gumbel_softmax(x, hard=True, seed=5), atol=1e-6)
    hot = sk.gumbel_softmax(x, tau=1e6, seed=5)
    np.testing.assert_allclose(hot, 1 / 6, rtol=1e-4)


def test_gumbel_samples_follow_softmax(rng):
    # the Gumbel-max trick: argmax(x + g) ~ Categorical(softmax(x))
    row = np.array([0.0, 1.0, 2.0, -1.0, 0.5, -3.0], np.float32)
    n = 20000
    x = np.broadcast_to(row, (n, 6)).copy()
    hard = sk.gumbel_softmax(x, tau=0.5, hard=True, seed=int(rng.integers(2**31)))
    freq = hard.astype(np.float64).mean(0)
    p = EXACT["softmax"](row, 0)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se), (freq, p)
    # along dim 0 as well
    cols = sk.gumbel_softmax(np.ascontiguousarray(x.T), hard=True, dim=0, seed=11)
    freq = cols.astype(np.float64).mean(1)
    assert np.all(np.abs(freq - p) <= 5 * se), (freq, p)


def test_gumbel_errors():
    x = np.zeros((3, 4), np.float32)
    for dtype in (np.int32, np.int64, np.bool_):
        with pytest.raises(TypeError):
            sk.gumbel_softmax(x.astype(dtype), seed=0)
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError):
            sk.gumbel_softmax(x, tau=tau, seed=0)


@pytest.mark.parametrize(
    "column",
    [
        [1.0, 3.0, 3.0, 2.0],  # a tie: the first
        [1.0, np.nan, 5.0, np.nan],  # NaN counts as the largest: the first NaN
        [-np.inf, -np.inf],
        [7.0],
    ],
)
def test_first_argmax_is_numpys_argmax(column):
    # The one plain-Python function both devices' one-hot kernels compile.
    from softkern._index import first_argmax

    y = np.array(column).reshape(1, -1, 1)
    assert first_argmax(y, 0, 0) == np.argmax(y[0, :, 0])


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_of_a_0d_input_is_one(hard):
    # A single logit is its own softmax slice: the sample is 1, whatever the
    # noise (it once came back as the noisy logit itself).
    out = sk.gumbel_softmax(np.array(2.0, np.float32), hard=hard, seed=1)
    assert out.shape == () and out.dtype == np.float32
    assert out == 1.0


# --- cross_entropy_and_grad ---------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_grad_index_targets(rng, shape, dtype, option, reduction):
    # rows (N, C) and (C,): the fused pass; (N, C, d...): forward + backward
    x, t, kwargs = problem(rng, shape, dtype, option)
    loss, grad = sk.cross_entropy_and_grad(x, t, reduction=reduction, **kwargs)
    check_loss(loss, ref_ce(x, t, reduction=reduction, **kwargs), dtype)
    check_backward(grad, x, t, 1.0, reduction=reduction, **kwargs)
    # the same numbers as the two calls, to rounding
    np.testing.assert_allclose(
        loss, sk.cross_entropy(x, t, reduction=reduction, **kwargs), rtol=TOL[dtype]
    )
    separate = sk.cross_entropy_backward(x, t, reduction=reduction, **kwargs)
    check_backward(grad, x, t, 1.0, ref=separate, reduction=reduction, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 7), (2, 9000), (3, 4, 5)])
def test_loss_and_grad_probability_targets(rng, shape, reduction):
    x, q = logits(rng, shape, np.float64), prob_target(rng, shape, np.float64)
    kw = {"reduction": reduction, "label_smoothing": 0.2}
    loss, grad = sk.cross_entropy_and_grad(x, q, **kw)
    check_loss(loss, ref_ce(x, q, **kw), np.float64)
    check_backward(grad, x, q, 1.0, **kw)


def test_loss_and_grad_by_finite_differences(rng):
    x = logits(rng, (3, 5000), np.float64)  # two tiles per row
    t = np.array([4999, -100, 7])
    kw = {"weight": rng.uniform(0.5, 2.0, 5000), "label_smoothing": 0.3}
    loss, grad = sk.cross_entropy_and_grad(x, t, **kw)
    h = 1e-6
    for i, j in [(0, 4999), (0, 3), (1, 17), (2, 7), (2, 4500)]:
        up, down = x.copy(), x.copy()
        up[i, j] += h
        down[i, j] -= h
        numeric = (sk.cross_entropy(up, t, **kw) - sk.cross_entropy(down, t, **kw)) / (
            2 * h
        )
        assert np.isclose(grad[i, j], numeric, rtol=1e-6, atol=1e-8)
    assert loss == pytest.approx(float(ref_ce(x, t, **kw)), rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_and_grad_special_values_in_long_rows(dtype, eps):
    # (6, 9000)  # three tiles per row: -inf tiles, NaN, +inf, ties
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 9000)).astype(dtype)
    x[0, :5000] = -INF  # a tile of -inf only, then finite
    x[1] = -INF  # only -inf: NaN
    x[2, 8000] = np.nan  # NaN in the last tile
    x[3, 6000] = INF  # +inf in the middle tile
    x[4, [10, 8500]] = 9.0  # the max tied across tiles
    x[5, 4096:8192] = -INF  # a middle tile of -inf only
    t = np.array([6000, 3, 5, 7, 8500, 100])
    kw = {"reduction": "none", "label_smoothing": eps}
    loss, grad = sk.cross_entropy_and_grad(x, t, **kw)
    np.testing.assert_array_equal(loss, sk.cross_entropy(x, t, **kw))
    np.testing.assert_array_equal(
        np.isnan(grad), np.isnan(sk.cross_entropy_backward(x, t, 1.0, **kw))
    )
    assert np.isnan(grad[1:4]).all() and np.isnan(loss[1:4]).all()
    assert np.isfinite(grad[[0, 4, 5]]).all()
    if eps == 0:
        assert (grad[0, :5000] == 0).all() and (grad[5, 4096:8192] == 0).all()
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    expected = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), **kw)
    expected.sum().backward()
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_loss_and_grad_errors_name_it_on_every_path(rng):
    # the fused rows pass, and the columns and probability layouts that go
    # through the forward and backward kernels
    x, x3 = logits(rng, (3, 4)), logits(rng, (2, 4, 3))
    bad = [(x, np.array([0, 9, 1])), (x3, np.array([[0, 1, 9], [2, 3, 0]]))]
    for data, t in bad:
        with pytest.raises(IndexError, match=r"^softkern\.cross_entropy_and_grad: "):
            sk.cross_entropy_and_grad(data, t)
    q = prob_target(rng, x.shape)
    with pytest.raises(ValueError, match=r"^softkern\.cross_entropy_and_grad: "):
        sk.cross_entropy_and_grad(x, q, out=np.empty((3, 5), np.float32))


def test_loss_and_grad_writes_every_element_of_out(rng):
    x = logits(rng, (64, 1000))
    t = index_target(rng, x.shape, ignore_index=-100)
    out = np.full_like(x, np.nan)
    _, grad = sk.cross_entropy_and_grad(x, t, out=out)
    assert grad is out and not np.isnan(out).any()
    check_backward(out, x, t, 1.0)
    again = np.full_like(x, np.nan)
    assert sk.cross_entropy_backward(x, t, out=again) is again
    np.testing.assert_array_equal(again, out)
    # the columns regime goes through the two calls, out= too
    x3 = logits(rng, (4, 6, 5))
    t3 = index_target(rng, x3.shape)
    out3 = np.full_like(x3, np.nan)
    _, grad3 = sk.cross_entropy_and_grad(x3, t3, out=out3)
    assert grad3 is out3 and not np.isnan(out3).any()


def test_loss_and_grad_out_errors(rng):
    x = logits(rng, (8, 10))
    t = index_target(rng, x.shape)
    fns = (
        lambda out: sk.cross_entropy_and_grad(x, t, out=out),
        lambda out: sk.cross_entropy_backward(x, t, out=out),
    )
    for call in fns:
        with pytest.raises(ValueError, match="shape"):
            call(np.empty((8, 11), np.float32))
        with pytest.raises(TypeError, match="dtype"):
            call(np.empty((8, 10), np.float64))
        with pytest.raises(ValueError, match="C-contiguous"):
            call(np.empty((10, 8), np.float32).T)
        with pytest.raises(ValueError, match="overlaps input"):
            call(x)
        with pytest.raises(TypeError, match="out must be an array"):
            call([1.0])
    with pytest.raises(IndexError, match="out of bounds"):
        sk.cross_entropy_and_grad(x, np.full(8, 10), out=np.empty_like(x))


def test_loss_and_grad_leaves_inputs_alone_and_handles_empty(rng):
    x = logits(rng, (5, 4097))
    t = index_target(rng, x.shape)
    before = x.copy(), t.copy()
    sk.cross_entropy_and_grad(x, t, label_smoothing=0.1)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(t, before[1])
    empty = np.empty((0, 4), np.float32)
    loss, grad = sk.cross_entropy_and_grad(empty, np.empty(0, np.int64))
    assert np.isnan(loss) and grad.shape == (0, 4)


# --- softcap and the z-loss (lse_square_scale) ----------------------------------

CAPPED = {"softcap": 12.0, "lse_square_scale": 1e-2}


def check_gradient(got, ref, dtype):
    """A gradient against the float64 reference, relative to its largest
    element (the options move every element: no per-position floor)."""
    got = np.asarray(got)
    assert got.dtype == dtype and got.shape == ref.shape
    scale = max(np.abs(ref).max(initial=0), 1e-300)
    err = np.abs(got.astype(np.float64) - ref).max(initial=0)
    assert err <= 10 * TOL[np.dtype(dtype).type] * scale, (err, scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [
        (7, 5),  # rows
        (6,),  # (C,): one row, a 0-d target
        (2, 9000),  # rows of three tiles: the fused gradient's merge
        (3, 4, 6),  # columns (strips)
    ],
)
def test_softcap_and_z_loss_match_reference(rng, shape, dtype, target, reduction):
    # logits of scale 20 against a cap of 12: tanh well into its bend
    x = logits(rng, shape, dtype, scale=20.0)
    w = rng.uniform(0.2, 2.0, classes(shape)).astype(dtype)
    kw = {**CAPPED, "weight": w, "reduction": reduction, "label_smoothing": 0.1}
    if target == "index":
        t = index_target(rng, shape, ignore_index=-100)
        kw["ignore_index"] = -100
    else:
        t = prob_target(rng, shape)
    check_loss(sk.cross_entropy(x, t, **kw), ref_ce(x, t, **kw), dtype)
    g = 0.7 if reduction != "none" else rng.standard_normal(batch(shape))
    check_gradient(
        sk.cross_entropy_backward(x, t, g, **kw), ref_ce_backward(x, t, g, **kw), dtype
    )
    loss, grad = sk.cross_entropy_and_grad(x, t, **kw)
    check_loss(loss, ref_ce(x, t, **kw), dtype)
    check_gradient(grad, ref_ce_backward(x, t, **kw), dtype)


@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 2)])  # rows, columns
def test_softcap_and_z_loss_gradient_is_the_finite_difference(rng, shape, target):
    x = logits(rng, shape, np.float64, scale=10.0)
    t = index_target(rng, shape) if target == "index" else prob_target(rng, shape)
    kw = {"softcap": 5.0, "lse_square_scale": 0.1, "label_smoothing": 0.2}
    grad = sk.cross_entropy_backward(x, t, **kw)
    # central differences: truncation ~h**2, rounding ~1e-16 * loss / h
    h = 1e-5
    numeric = np.empty_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        rise = sk.cross_entropy(up, t, **kw) - sk.cross_entropy(down, t, **kw)
        numeric[i] = rise / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_softcap_and_z_loss_agree_with_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = logits(rng, (6, 9), np.float64, scale=10.0)
    t = index_target(rng, (6, 9), ignore_index=-100)
    w = rng.uniform(0.2, 2.0, 9)
    cap, zscale = 7.0, 0.05
    xt = torch.from_numpy(x).requires_grad_()
    tt, wt = torch.from_numpy(t), torch.from_numpy(w)
    z = cap * torch.tanh(xt / cap)
    counted = tt != -100
    per = (
        functional.cross_entropy(z, tt, wt, reduction="none", label_smoothing=0.2)
        + zscale * torch.logsumexp(z, 1) ** 2 * counted
    )
    loss = per.sum() / torch.where(counted, wt[tt.clamp(min=0)], 0).sum()
    loss.backward()
    kw = {"weight": w, "label_smoothing": 0.2, "softcap": cap}
    kw["lse_square_scale"] = zscale
    got, grad = sk.cross_entropy_and_grad(x, t, **kw)
    np.testing.assert_allclose(got, loss.item(), rtol=1e-13)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_softcap_bounds_infinite_logits_and_a_huge_cap_changes_nothing(rng):
    x = logits(rng, (4, 6))
    t = index_target(rng, (4, 6))
    x[0, 2], x[1, :] = np.inf, -np.inf  # capped to +-cap: finite losses
    got = sk.cross_entropy(x, t, softcap=3.0, reduction="none")
    assert np.all(np.isfinite(got))
    check_loss(got, ref_ce(x, t, softcap=3.0, reduction="none"), np.float32)
    plain = logits(rng, (4, 6))
    np.testing.assert_allclose(
        sk.cross_entropy(plain, t, softcap=1e6), sk.cross_entropy(plain, t), rtol=1e-6
    )
    assert sk.cross_entropy(plain, t, softcap=None, lse_square_scale=0.0) == (
        sk.cross_entropy(plain, t)
    )


def test_z_loss_skips_ignored_rows(rng):
    x = logits(rng, (5, 4))
    t = np.array([0, -100, 3, -100, 1])
    z = sk.cross_entropy(x, t, lse_square_scale=0.5, reduction="none")
    assert z[1] == z[3] == 0
    lse = np.log(np.exp(x.astype(np.float64)).sum(1))
    plain = sk.cross_entropy(x, t, reduction="none")
    # z against plain + the z-loss, not z - plain: a z-loss of 1e-3 beside a
    # loss of 1 keeps only the few digits the float32 difference leaves
    want = plain + np.where(t >= 0, 0.5 * lse**2, 0)
    np.testing.assert_allclose(z, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("softcap", 0.0),
        ("softcap", -1.0),
        ("softcap", np.inf),
        ("softcap", True),
        ("softcap", "10"),
        ("lse_square_scale", -1e-4),
        ("lse_square_scale", np.nan),
        ("lse_square_scale", None),
    ],
)
def test_bad_softcap_or_z_loss_scale_raises(rng, option, value):
    x, t = logits(rng, (3, 4)), index_target(rng, (3, 4))
    for fn in (sk.cross_entropy, sk.cross_entropy_backward, sk.cross_entropy_and_grad):
        with pytest.raises(ValueError, match=option):
            fn(x, t, **{option: value})
