"""GPU kernels (the CUDA simulator without a GPU) against the CPU, bit for bit.

The CPU kernels replay the GPU's association order, so for the same strategy
and block size the two devices must agree exactly, not approximately. The
simulator is slow, so shapes stay small and `small_grid` caps the grid at 4
blocks to reach grid-stride loops with few elements.
"""

import numpy as np
import pytest
from helpers import GPU_BLOCKS, SIMULATOR, to_gpu, to_host
from numba import cuda

import softkern as sk
from softkern import _launch
from softkern.testing.references import EXACT

pytestmark = pytest.mark.usefixtures("small_grid")

SMALL, LARGE = GPU_BLOCKS


def sizes_for(block):
    grid_span = 4 * block  # small_grid: one grid stride
    return [
        0,
        1,
        31,
        32,
        33,
        block - 1,
        block,
        block + 1,
        3 * grid_span + 5,  # several grid strides, a ragged tail
        17 * grid_span + 7,  # the CPU's four-rows-per-pass loop, then single rows
    ]


@pytest.mark.parametrize("strategy", [0, 1, 2])
@pytest.mark.parametrize("block", [LARGE])
def test_full_sum_bitwise_equal_to_cpu(rng, strategy, block):
    for n in sizes_for(block):
        x = rng.standard_normal(n).astype(np.float32)
        gpu = sk.sum(to_gpu(x), reduce=strategy, block=block)
        cpu = sk.sum(x, reduce=strategy, block=block)
        assert to_host(gpu).tobytes() == cpu.tobytes(), n


@pytest.mark.parametrize("strategy", [0, 1, 2])
def test_full_sum_float64_and_small_block(rng, strategy):
    for n in (SMALL + 1, 4 * SMALL * 2 + 3):
        x = rng.standard_normal(n)
        gpu = sk.sum(to_gpu(x), reduce=strategy, block=SMALL)
        cpu = sk.sum(x, reduce=strategy, block=SMALL)
        assert to_host(gpu).tobytes() == cpu.tobytes(), n


@pytest.mark.parametrize("strategy", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dot_bitwise_equal_to_cpu(rng, strategy, dtype):
    for n in (0, 33, LARGE + 1, 3 * 4 * LARGE + 5):
        x = rng.standard_normal(n).astype(dtype)
        y = rng.standard_normal(n).astype(dtype)
        gpu = sk.dot(to_gpu(x), to_gpu(y), reduce=strategy, block=LARGE)
        cpu = sk.dot(x, y, reduce=strategy, block=LARGE)
        assert to_host(gpu).tobytes() == cpu.tobytes(), n


DIM_CASES = [
    ((5, 40), 1),  # rows, group 64 = block: block-per-row, two warps
    ((9, 20), 1),  # rows, group 32: one row per warp
    ((40, 3), 1),  # rows, group 4: 16 rows per 64-thread block
    ((7, 70), 0),  # columns: 32-column tiles, 2 lanes along n (block 64)
    ((3, 50, 2), 1),  # columns, inner 2
    ((2, 3, 4, 5), (1, 3)),  # dims apart: permuted to the end, rows
    ((4, 6, 5), (0, 1)),  # consecutive dims merged, columns
]


@pytest.mark.parametrize(("shape", "dim"), DIM_CASES)
@pytest.mark.parametrize("strategy", [0, 1, 2])
def test_dim_reductions_bitwise_equal_to_cpu(rng, shape, dim, strategy):
    x = rng.standard_normal(shape).astype(np.float32)
    dx = to_gpu(x)
    for op in ("sum", "amax"):
        gpu = getattr(sk, op)(dx, dim, reduce=strategy, block=LARGE)
        cpu = getattr(sk, op)(x, dim, reduce=strategy, block=LARGE)
        assert to_host(gpu).tobytes() == cpu.tobytes(), op
        assert np.allclose(cpu, EXACT[op](x, dim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "strategy"),
    [("sum", 0), ("sum", 1), ("sum", 2), ("amax", 2), ("amin", 1)],
)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((3, 1000), 1),  # split: 3 rows, each a full reduction of 3 blocks
        ((2, 2, 700), -1),  # split: 4 rows of the (outer, n) view, 2 blocks each
        ((1, 5000), 1),  # split: one row, grid-stride within its blocks
    ],
)
def test_few_long_rows_split_bitwise_equal_to_cpu(
    rng, monkeypatch, shape, dim, op, strategy
):
    monkeypatch.setattr(_launch, "SPLIT_MIN_ROW", 512)
    monkeypatch.setattr(_launch, "MAX_GRID", 8)  # the rows share 8 blocks
    plan = sk.ops.reduce.reduce_plan(
        op, shape, np.dtype(np.float32), dim, False, strategy, SMALL
    )
    assert plan.kind == "split" and plan.launch.grid > 1
    x = rng.standard_normal(shape).astype(np.float32)
    cpu = getattr(sk, op)(x, dim, reduce=strategy, block=SMALL)
    gpu = to_host(getattr(sk, op)(to_gpu(x), dim, reduce=strategy, block=SMALL))
    np.testing.assert_array_equal(gpu, cpu)
    exact = EXACT[op](x, dim)
    np.testing.assert_allclose(cpu, exact, rtol=1e-5, atol=1e-4)
    ints = rng.integers(-1000, 1000, shape).astype(np.int32)
    assert (
        to_host(getattr(sk, op)(to_gpu(ints), dim, reduce=strategy, block=SMALL))
        == EXACT[op](ints, dim)
    ).all()


def test_int_reductions_on_gpu(rng):
    x = rng.integers(-50, 50, size=(6, 37), dtype=np.int32)
    dx = to_gpu(x)
    got = sk.sum(dx, 1, block=SMALL)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(to_host(got), x.sum(1))
    np.testing.assert_array_equal(to_host(sk.amin(dx, 0, block=SMALL)), x.min(0))
    assert int(to_host(sk.sum(dx, block=SMALL))) == int(x.sum())


def test_result_stays_on_gpu_with_the_inputs_kind(rng):
    x = rng.standard_normal((4, 33)).astype(np.float32)
    dx = to_gpu(x)
    full = sk.sum(dx, block=SMALL)
    assert sk.device_of(full) == "cuda"
    assert full.shape == ()
    assert float(to_host(full)) == float(sk.sum(x, block=SMALL))
    assert float(full) == float(sk.sum(x, block=SMALL))  # a 0-d GPU result
    assert int(sk.sum(to_gpu(np.arange(5)), block=SMALL)) == 10
    kept = sk.amax(dx, 1, keepdim=True, block=SMALL)
    assert sk.device_of(kept) == "cuda" and kept.shape == (4, 1)


def test_nan_inf_and_empty_on_gpu():
    x = np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0], [np.inf, 1.0, -np.inf]])
    dx = to_gpu(x)
    np.testing.assert_array_equal(
        to_host(sk.amax(dx, 1, block=SMALL)), [np.nan, 6.0, np.inf]
    )
    np.testing.assert_array_equal(
        to_host(sk.sum(dx, 1, block=SMALL)), [np.nan, 15.0, np.nan]
    )
    assert float(to_host(sk.sum(to_gpu(np.empty(0, np.float32)), block=SMALL))) == 0
    with pytest.raises(IndexError, match="size 0"):
        sk.amax(to_gpu(np.empty((2, 0))), 1, block=SMALL)


def test_non_contiguous_device_inputs(rng):
    x = rng.standard_normal((12, 40)).astype(np.float32)
    dx = to_gpu(x)
    for view in (lambda a: a[::3], lambda a: a[:, ::2], lambda a: a.T):
        got = sk.sum(view(dx), 1, block=SMALL)
        want = sk.sum(view(x), 1, block=SMALL)
        assert to_host(got).tobytes() == want.tobytes()
    full = sk.sum(dx[:, ::2], block=SMALL)
    assert to_host(full).tobytes() == sk.sum(x[:, ::2], block=SMALL).tobytes()


def test_gpu_inputs_are_never_modified(rng):
    x = rng.standard_normal((3, 50)).astype(np.float32)
    dx = to_gpu(x)
    sk.sum(dx, 1, block=SMALL)
    sk.amax(dx, block=SMALL)
    sk.dot(dx[0], dx[1], block=SMALL)
    np.testing.assert_array_equal(to_host(dx), x)


def test_mixed_devices_is_a_type_error(rng):
    x = rng.standard_normal(10).astype(np.float32)
    with pytest.raises(TypeError, match="two devices"):
        sk.dot(x, to_gpu(x))
    assert sk.device_of(to_gpu(x), 2.0) == "cuda"
    assert sk.device_of(x, [1, 2], 3) == "cpu"


@pytest.mark.skipif(not SIMULATOR, reason="plans are checked on the simulator")
def test_grid_capped_by_fixture():
    assert _launch.full_reduce_plan(10**6, 64).grid == 4


@pytest.mark.skipif(SIMULATOR, reason="needs a real GPU")
def test_large_full_sum_on_real_gpu(rng, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_GRID", 1024)
    x = rng.standard_normal(10_000_019).astype(np.float32)
    dx = cuda.to_device(x)
    for r in (0, 1, 2):
        assert to_host(sk.sum(dx, reduce=r)).tobytes() == sk.sum(x, reduce=r).tobytes()


def test_gather_makes_strided_device_arrays_contiguous(rng):
    # The real-GPU path for non-contiguous Numba arrays (the simulator itself
    # copies with NumPy); run here so the index arithmetic is checked.
    from softkern.cuda.copy import gather_contiguous

    base = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    views = [
        lambda a: a[1, 2, 3, ::2],
        lambda a: a[0, 1].T[::2],
        lambda a: a[:, ::2, 1:, 0].transpose((2, 0, 1)),
        lambda a: a[:, :, ::3, ::-2],
    ]
    for ndim, view in enumerate(views, start=1):
        got = to_host(gather_contiguous(view(to_gpu(base))))
        np.testing.assert_array_equal(got, view(base))
        assert got.ndim == ndim
