"""bfloat16 everywhere, and the small dtypes of sum/amax/amin, on the CPU.

bfloat16 computes in float32 and rounds its results once, as PyTorch does;
so a bfloat16 call must equal the float32 call on the widened input,
rounded to bfloat16, bit for bit (the shapes below keep both calls on one
side of ``ALIAS_REACH``, so they run the same loops), and lie within
bfloat16's rounding of the float64 reference. The input is read through
its bits (``softkern.cpu.bfloat16``), never copied to float32.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import softkern as sk
from softkern import _dtypes
from softkern.testing.references import (
    numpy_cross_entropy,
    numpy_log_softmax,
    numpy_nll_loss,
    numpy_softmax,
)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
# half an ulp of bfloat16's 8-bit significand, relative; one ulp for values
# computed in float32 then rounded, with room for float32's own rounding
BF16_RTOL = 2.0**-8

ROW_SHAPES = [
    ((5, 37), 1),  # rows, short: split store-and-sum loops
    ((3, 9000), 1),  # rows, tiled (> TILE): fused loops
    ((4, 33, 5), 1),  # columns
    ((37,), 0),  # 1-D
]


def bf16(rng, shape, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(BF16)


def as64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


# --- softmax family -----------------------------------------------------------


@pytest.mark.parametrize("shape, dim", ROW_SHAPES)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_is_float32_rounded_once(rng, shape, dim, fn):
    x = bf16(rng, shape)
    before = x.copy()
    y = getattr(sk, fn)(x, dim)
    assert y.dtype == BF16 and y.shape == x.shape
    wide = getattr(sk, fn)(x.astype(np.float32), dim)
    np.testing.assert_array_equal(bits(y), bits(wide.astype(BF16)))
    ref = (numpy_softmax if fn == "softmax" else numpy_log_softmax)(as64(x), dim)
    np.testing.assert_allclose(as64(y), ref, rtol=BF16_RTOL, atol=1e-6)
    np.testing.assert_array_equal(bits(x), bits(before))


@pytest.mark.parametrize("shape, dim", [((5, 37), 1), ((4, 33, 5), (0, 2))])
def test_logsumexp(rng, shape, dim):
    x = bf16(rng, shape)
    y = sk.logsumexp(x, dim)
    assert y.dtype == BF16
    wide = sk.logsumexp(x.astype(np.float32), dim)
    np.testing.assert_array_equal(bits(y), bits(wide.astype(BF16)))
    m = as64(x).max(axis=dim, keepdims=True)
    ref = np.log(np.exp(as64(x) - m).sum(axis=dim)) + np.squeeze(m, axis=dim)
    np.testing.assert_allclose(as64(y), ref, rtol=BF16_RTOL)


@pytest.mark.parametrize("shape, dim", ROW_SHAPES[:3])
@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_backward(rng, shape, dim, kind):
    y = getattr(sk, kind)(bf16(rng, shape), dim)
    g = bf16(rng, shape, 1.0)
    fn = getattr(sk, f"{kind}_backward")
    grad = fn(g, y, dim)
    assert grad.dtype == BF16
    wide = fn(g.astype(np.float32), y.astype(np.float32), dim)
    np.testing.assert_array_equal(bits(grad), bits(wide.astype(BF16)))
    g64, y64 = as64(g), as64(y)
    if kind == "softmax":
        ref = y64 * (g64 - (g64 * y64).sum(dim, keepdims=True))
    else:
        ref = g64 - np.exp(y64) * g64.sum(dim, keepdims=True)
    scale = np.abs(g64).sum(dim, keepdims=True)  # the sum's cancellation
    assert (np.abs(as64(grad) - ref) <= BF16_RTOL * (np.abs(ref) + scale)).all()


def test_dtype_casts_to_bfloat16_first(rng):
    x = rng.standard_normal((4, 50)) * 3
    for dtype in (BF16, "bfloat16"):
        y = sk.softmax(x, 1, dtype=dtype)
        assert y.dtype == BF16
        expected = sk.softmax(x.astype(BF16), 1)
        np.testing.assert_array_equal(bits(y), bits(expected))
    # and from bfloat16 to a wider dtype: the exact widening, then float64
    xb = bf16(rng, (4, 50))
    np.testing.assert_array_equal(
        sk.softmax(xb, 1, dtype=np.float64), sk.softmax(xb.astype(np.float64), 1)
    )


def test_out_of_bfloat16(rng):
    x = bf16(rng, (6, 40))
    out = np.full(x.shape, np.nan, BF16)
    assert sk.softmax(x, 1, out=out) is out
    np.testing.assert_array_equal(bits(out), bits(sk.softmax(x, 1)))
    with pytest.raises(TypeError, match="dtype"):
        sk.softmax(x, 1, out=np.empty(x.shape, np.float32))


def test_special_values():
    x = np.array(
        [[1.0, np.nan, 0.0], [-np.inf] * 3, [np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0]],
        BF16,
    )
    y = as64(sk.softmax(x, 1))
    expected = numpy_softmax(as64(x), 1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y[3], expected[3], rtol=BF16_RTOL)
    assert as64(sk.logsumexp(x, 1))[1] == -np.inf


# --- losses -----------------------------------------------------------------


LOSS_SHAPES = [(5, 37), (3, 9000), (4, 11, 3)]


@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_cross_entropy(rng, shape, reduction, kind):
    x = bf16(rng, shape)
    n = shape[1]
    if kind == "index":
        target = rng.integers(0, n, (shape[0], *shape[2:]))
        target.flat[0] = -100
        target64 = target
    else:
        q = rng.random(shape) ** 3
        target = (q / q.sum(1, keepdims=True)).astype(BF16)
        target64 = as64(target)
    weight = (rng.random(n) + 0.5).astype(BF16)
    options = dict(reduction=reduction, label_smoothing=0.1)
    loss = sk.cross_entropy(x, target, weight, **options)
    assert loss.dtype == BF16
    ref = numpy_cross_entropy(as64(x), target64, as64(weight), **options)
    np.testing.assert_allclose(as64(loss), ref, rtol=BF16_RTOL, atol=1e-6)
    wide = sk.cross_entropy(x.astype(np.float32), target, weight, **options)
    np.testing.assert_allclose(as64(loss), as64(wide), rtol=2.0**-8)


@pytest.mark.parametrize("shape", LOSS_SHAPES)
def test_cross_entropy_gradient(rng, shape):
    x = bf16(rng, shape)
    target = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    options = dict(softcap=5.0, lse_square_scale=1e-3)
    loss, grad = sk.cross_entropy_and_grad(x, target, **options)
    assert loss.dtype == grad.dtype == BF16
    # the fused kernel and the backward kernel alike: float32 rounded once
    wide_loss, wide_grad = sk.cross_entropy_and_grad(
        x.astype(np.float32), target, **options
    )
    np.testing.assert_array_equal(bits(grad), bits(wide_grad.astype(BF16)))
    backward = sk.cross_entropy_backward(x, target, np.array(1.0, BF16), **options)
    np.testing.assert_array_equal(bits(backward), bits(grad))
    np.testing.assert_allclose(as64(loss), float(wide_loss), rtol=2.0**-8)


def test_nll_loss(rng):
    logp = sk.log_softmax(bf16(rng, (6, 20)), 1)
    target = rng.integers(0, 20, 6)
    loss = sk.nll_loss(logp, target, reduction="none")
    assert loss.dtype == BF16
    np.testing.assert_array_equal(as64(loss), -as64(logp)[np.arange(6), target])
    np.testing.assert_allclose(
        as64(sk.nll_loss(logp, target)),
        numpy_nll_loss(as64(logp), target),
        rtol=BF16_RTOL,
    )


# --- reductions ---------------------------------------------------------------

SMALL = ["float16", "bfloat16", "bool", "int8", "uint8", "int16"]
DIMS = [None, 1, 0, (0, 2)]  # full, rows, columns, columns over two dims


def small_array(rng, name, shape=(7, 130, 3)):
    dtype = _dtypes.dtype_named(name)
    if name == "bool":
        return rng.random(shape) < 0.3
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dim", DIMS)
def test_sum_of_small_dtypes(rng, name, dim):
    x = small_array(rng, name)
    total = sk.sum(x, dim)
    if name in ("float16", "bfloat16"):
        assert total.dtype == x.dtype  # computed in float32, rounded once
        ref = as64(x).sum(axis=dim)
        bound = 2.0**-8 * np.abs(ref) + 1e-6 * np.abs(as64(x)).sum(axis=dim)
        assert (np.abs(as64(total) - ref) <= bound).all()
        # the float32 call's accumulators, rounded
        wide = sk.sum(x.astype(np.float32), dim)
        np.testing.assert_array_equal(
            as64(total), as64(np.asarray(wide).astype(x.dtype))
        )
    else:  # counts in int64, as NumPy and PyTorch
        assert total.dtype == np.int64
        np.testing.assert_array_equal(total, x.sum(axis=dim, dtype=np.int64))


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("op", ["amax", "amin"])
def test_max_and_min_of_small_dtypes(rng, name, dim, op):
    x = small_array(rng, name)
    result = getattr(sk, op)(x, dim)
    assert result.dtype == x.dtype
    npop = np.max if op == "amax" else np.min
    expected = npop(x.astype(np.float64), axis=dim).astype(x.dtype)
    np.testing.assert_array_equal(as64(result), as64(expected))


def test_max_of_bfloat16_propagates_nan():
    x = np.array([[1.0, np.nan, 3.0], [2.0, -np.inf, 0.5]], BF16)
    assert np.isnan(as64(sk.amax(x, 1))[0]) and as64(sk.amin(x, 1))[1] == -np.inf
    assert np.isnan(as64(sk.sum(x)))


def test_mask_sum():
    mask = np.zeros(1000, bool)
    mask[::7] = True
    assert sk.sum(mask) == 143 and sk.sum(mask).dtype == np.int64
    assert sk.amax(mask) and sk.amax(mask).dtype == np.bool_
    assert not sk.amin(mask)


def test_unsupported_dtypes_are_named():
    with pytest.raises(TypeError, match="uint16"):
        sk.sum(np.ones(3, np.uint16))
    with pytest.raises(TypeError, match="bfloat16"):
        sk.softmax(np.ones((2, 3), np.int8), 1)


def test_without_ml_dtypes_bfloat16_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import fails
    with pytest.raises(TypeError, match="ml_dtypes"):
        _dtypes.bfloat16()
    with pytest.raises(TypeError, match="ml_dtypes"):
        sk.softmax(np.ones((2, 3)), 1, dtype="bfloat16")


# --- through PyTorch ------------------------------------------------------------


def test_torch_bfloat16_tensors(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((16, 300)).astype(np.float32) * 3)
    x = x.bfloat16()
    target = torch.from_numpy(rng.integers(0, 300, 16))
    for fn, peer in ((sk.softmax, torch.softmax), (sk.log_softmax, torch.log_softmax)):
        y = fn(x, 1)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), peer(x.float(), 1).bfloat16().float())
    mine = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    loss = sk.cross_entropy(mine, target, label_smoothing=0.05)
    expected = torch.nn.functional.cross_entropy(theirs, target, label_smoothing=0.05)
    assert loss.dtype == torch.bfloat16
    loss.backward()
    expected.backward()
    assert mine.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), expected.float(), rtol=2**-7, atol=0)
    # PyTorch's bfloat16 gradient goes through bfloat16 log-probabilities;
    # ours is float32 rounded once: both against float64
    exact = x.double().requires_grad_()
    torch.nn.functional.cross_entropy(exact, target, label_smoothing=0.05).backward()
    scale = exact.grad.abs().max().item()
    mine_error = (mine.grad.double() - exact.grad).abs().max().item()
    theirs_error = (theirs.grad.double() - exact.grad).abs().max().item()
    assert mine_error <= 2**-8 * scale
    assert mine_error <= theirs_error
    mask = torch.from_numpy(rng.random(1000) < 0.5)
    assert sk.sum(mask).item() == mask.sum().item()
    assert sk.sum(mask).dtype == torch.int64
    assert sk.amax(x, 1).dtype == torch.bfloat16
