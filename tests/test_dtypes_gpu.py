"""bfloat16 and the small reduction dtypes on the GPU (the CUDA simulator
without a GPU). The kernels read bfloat16 as its bits and compute in float32
(``softkern.cuda.convert``), so: reductions equal the CPU's bit for bit (the
CPU replays the GPU's order, in the same float32 accumulators, and rounds
once), and the softmax family and the losses lie within one bfloat16 ulp of
the CPU's results (the GPU folds its float32 sums in another order before
the rounding). Device arrays of bfloat16 are Numba (simulator) arrays of
``ml_dtypes.bfloat16``; PyTorch's bfloat16 CUDA tensors go through the same
bits (``_dispatch._bits_of_torch``), on a GPU only.
"""

import numpy as np
import pytest
from helpers import GPU_BLOCKS, SIMULATOR, to_gpu, to_host
from numba import cuda
from test_dtypes import BF16, SMALL, as64, bf16, bits, small_array

import softkern as sk
from softkern import _launch
from softkern.ops.losses import plan_of

pytestmark = pytest.mark.usefixtures("small_grid")

BLOCK = GPU_BLOCKS[0]
ONE_ULP = 2.0**-7  # relative: bfloat16 keeps 8 significant bits


@pytest.fixture
def small_regimes(monkeypatch):
    """As in test_softmax_gpu: short rows reach every row regime."""
    if SIMULATOR:
        monkeypatch.setattr(_launch, "WARP_ROW_BYTES", 256)
        monkeypatch.setattr(_launch, "SHARED_ROW_BYTES", 512)


def small(shape_sim, shape_gpu):
    return shape_sim if SIMULATOR else shape_gpu


@pytest.mark.parametrize("name", SMALL)
def test_reductions_equal_the_cpu_bit_for_bit(rng, name):
    x = small_array(rng, name, small((2, 40, 2), (64, 1000, 3)))
    d = to_gpu(x)
    for op in ("sum", "amax", "amin"):
        for dim in (None, (0, 2)):  # full; rows of a transpose
            gpu = np.asarray(to_host(getattr(sk, op)(d, dim, block=BLOCK)))
            cpu = np.asarray(getattr(sk, op)(x, dim, block=BLOCK))
            assert gpu.dtype == cpu.dtype, (op, dim)
            np.testing.assert_array_equal(
                np.atleast_1d(gpu).view(np.uint8), np.atleast_1d(cpu).view(np.uint8)
            )


# (shape, dim, regime) as in test_softmax_gpu
CASES = [
    (small((3, 40), (4096, 250)), 1, "warp"),
    (small((2, 100), (64, 8000)), 1, "shared"),
    (small((2, 150), (16, 20000)), -1, "stream"),
    (small((2, 4, 37), (64, 128, 512)), 1, "columns"),
]


def close_to(gpu, cpu):
    """Within one bfloat16 ulp of the CPU's result, elementwise."""
    g, c = as64(gpu), as64(cpu)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(c))
    ok = ~np.isnan(c)
    assert (np.abs(g[ok] - c[ok]) <= ONE_ULP * np.abs(c[ok]) + 1e-30).all()


@pytest.mark.usefixtures("small_regimes")
@pytest.mark.parametrize(("shape", "dim", "regime"), CASES)
def test_softmax_family_every_regime(rng, shape, dim, regime):
    assert sk.softmax_plan(shape, dim, BF16, BLOCK).regime == regime
    x = bf16(rng, shape)
    d = to_gpu(x)
    for fn in (sk.softmax, sk.log_softmax):
        y = to_host(fn(d, dim, block=BLOCK))
        assert y.dtype == BF16
        close_to(y, fn(x, dim))
    close_to(to_host(sk.logsumexp(d, dim, block=BLOCK)), sk.logsumexp(x, dim))
    y = sk.softmax(x, dim)
    g = bf16(rng, shape, 1.0)
    for fn in (sk.softmax_backward, sk.log_softmax_backward):
        grad = to_host(fn(to_gpu(g), to_gpu(y), dim, block=BLOCK))
        expected = fn(g, y, dim)
        scale = np.abs(as64(g)).sum(dim, keepdims=True)  # the sum's cancellation
        assert (np.abs(as64(grad) - as64(expected)) <= ONE_ULP * scale).all()
    np.testing.assert_array_equal(bits(to_host(d)), bits(x))  # input untouched


def test_dtype_to_and_from_bfloat16(rng):
    x = rng.standard_normal((4, 40)).astype(np.float32)
    y = to_host(sk.softmax(to_gpu(x), 1, dtype=BF16, block=BLOCK))
    close_to(y, sk.softmax(x, 1, dtype=BF16))
    xb = bf16(rng, (4, 40))
    wide = to_host(sk.log_softmax(to_gpu(xb), 1, dtype=np.float32, block=BLOCK))
    assert wide.dtype == np.float32
    np.testing.assert_allclose(
        wide, sk.log_softmax(xb, 1, dtype=np.float32), rtol=1e-6, atol=1e-6
    )


SPLIT_SHAPE = small((2, 300), (4, 131072))  # split: few rows of many classes


@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize(
    "shape",
    [
        small((6, 40), (512, 1000)),  # a block (GPU) or a warp per row
        small((3, 20, 4), (64, 100, 9)),  # columns
        SPLIT_SHAPE,
    ],
)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_losses(rng, shape, kind):
    x = bf16(rng, shape)
    classes = shape[1]
    if kind == "index":
        target = rng.integers(0, classes, (shape[0], *shape[2:]))
        target.flat[0] = -100
    else:
        q = rng.random(shape) ** 3
        target = (q / q.sum(1, keepdims=True)).astype(BF16)
    weight = (rng.random(classes) + 0.5).astype(BF16)
    options = dict(label_smoothing=0.1, softcap=4.0, lse_square_scale=1e-3)
    d, t, w = to_gpu(x), to_gpu(target), to_gpu(weight)
    plan = plan_of("f", True, x, target, weight, -100, "none", 0.1, BLOCK).plan
    assert (plan.regime == "split") == (shape == SPLIT_SHAPE)
    # "mean" folds the positions on the device, "none" writes each one
    reduction = "mean" if kind == "index" else "none"
    loss = to_host(
        sk.cross_entropy(d, t, w, reduction=reduction, block=BLOCK, **options)
    )
    assert loss.dtype == BF16
    close_to(loss, sk.cross_entropy(x, target, weight, reduction=reduction, **options))
    upstream = np.array(0.75, BF16)
    grad = to_host(
        sk.cross_entropy_backward(
            d, t, cuda.to_device(upstream), w, block=BLOCK, **options
        )
    )
    expected = sk.cross_entropy_backward(x, target, upstream, weight, **options)
    scale = np.abs(as64(expected)).max()
    assert (np.abs(as64(grad) - as64(expected)) <= ONE_ULP * scale).all()
    if kind == "index":
        logp = sk.log_softmax(x, 1)
        nll = to_host(sk.nll_loss(to_gpu(logp), t, w, block=BLOCK))
        close_to(nll, sk.nll_loss(logp, target, weight))
