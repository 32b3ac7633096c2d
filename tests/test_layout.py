"""Shapes, strides and launch plans: pure functions, shared by both devices."""

import numpy as np
import pytest
from numpy.exceptions import AxisError

from softkern import _launch, _layout
from softkern.ops.losses import loss_plan


@pytest.mark.parametrize(
    ("dim", "ndim", "expected"),
    [
        (None, 3, (0, 1, 2)),
        ((), 3, (0, 1, 2)),  # torch.sum(x, dim=()) reduces everything
        (-1, 3, (2,)),
        ((2, 0), 3, (0, 2)),
        ([1, -1], 3, (1, 2)),
        (0, 0, ()),  # a 0-d array accepts dim 0 and -1, as in PyTorch
        (-1, 0, ()),
        (np.int64(1), 2, (1,)),
    ],
)
def test_normalize_dims(dim, ndim, expected):
    assert _layout.normalize_dims(dim, ndim) == expected


@pytest.mark.parametrize(("dim", "ndim"), [(3, 3), (-4, 3), ((0, 5), 3), (1, 0)])
def test_normalize_dims_out_of_range_is_axis_error(dim, ndim):
    with pytest.raises(AxisError):
        _layout.normalize_dims(dim, ndim)


def test_normalize_dims_rejects_repeats_and_non_ints():
    with pytest.raises(ValueError, match="twice"):
        _layout.normalize_dims((1, -2), 3)
    with pytest.raises(TypeError, match="dim"):
        _layout.normalize_dims(1.5, 3)
    with pytest.raises(TypeError, match="bool"):
        _layout.normalize_dims(True, 3)


@pytest.mark.parametrize(
    ("shape", "view"),
    [
        ((4, 5, 6), lambda a: a),
        ((4, 5, 6), lambda a: a[:, 1:4]),
        ((4, 5, 6), lambda a: a[::2]),
        ((4, 5, 6), lambda a: a.transpose(2, 0, 1)),
        ((4, 1, 6), lambda a: a[:, :, ::3]),
        ((4, 5, 6), lambda a: a[::-1]),
    ],
)
def test_merge_strides_agrees_with_numpy(shape, view):
    base = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    a = view(base)
    for groups in ([(0, 1), (1, 3)], [(0, 2), (2, 3)], [(0, 3)], [(0, 0), (0, 3)]):
        merged = _layout.merge_strides(a.shape, a.strides, groups, a.itemsize)
        sizes = tuple(int(np.prod(a.shape[lo:hi])) for lo, hi in groups)
        if merged is None:
            # numpy must also need a copy for this reshape
            with pytest.raises((AttributeError, ValueError)):
                a.view().shape = sizes
            continue
        got = np.lib.stride_tricks.as_strided(a, *merged)
        np.testing.assert_array_equal(got, a.reshape(sizes))


def test_full_plan_grid_depends_only_on_size():
    assert _launch.full_reduce_plan(1, 256).grid == 1
    assert _launch.full_reduce_plan(257, 256).grid == 2
    assert _launch.full_reduce_plan(1 << 28, 256).grid == _launch.MAX_GRID
    assert _launch.full_reduce_plan(0, 256).grid == 1


@pytest.mark.parametrize(
    ("shape", "regime", "group"),
    [
        ((1000, 1, 1), "rows", 1),  # rows of one element: 256 rows per block
        ((10, 5, 1), "rows", 8),  # short rows: 32 rows per 256-thread block
        ((10, 1025, 1), "rows", 256),  # block-per-row
        ((9, 2**16, 1), "rows", 256),  # long rows, but enough of them
        ((8, 2**16 - 1, 1), "rows", 256),  # few rows, but short
        ((8, 2**16, 1), "split", 256),  # few long rows: 128 blocks a row
        ((1, 10**8, 1), "split", 256),  # one row: 1024 blocks
        ((3, 7, 2), "columns", 8),  # 32-column tiles, 8 threads along n
    ],
)
def test_dim_plan_regimes(shape, regime, group):
    plan = _launch.dim_reduce_plan(*shape, 256)
    assert (plan.regime, plan.group) == (regime, group)
    assert 1 <= plan.grid <= _launch.MAX_GRID
    if regime == "split":  # the rows share one full reduction's grid
        total = plan.grid * shape[0]
        assert _launch.MAX_GRID <= total < _launch.MAX_GRID + shape[0]


def test_block_and_strategy_checks():
    assert _launch.check_block(None) == _launch.DEFAULT_BLOCK
    for bad in (16, 48, 2048, 64.0, True):
        with pytest.raises(ValueError, match="block"):
            _launch.check_block(bad)
    for bad in (3, -1, "2", None, True):
        with pytest.raises(ValueError, match="reduce"):
            _launch.check_strategy(bad)


@pytest.mark.parametrize(
    ("shape", "split", "regime", "segments"),
    [
        ((8, 2**20), True, "split", 128),  # few long rows: 128 blocks a row
        ((1, 10**7), True, "split", 1024),  # one row: MAX_GRID blocks
        ((9, 2**20), True, "stream", 0),  # enough rows for the SMs
        ((8, 2**20 - 1), True, "stream", 0),  # rows too short to split
        ((8, 2**20), False, "stream", 0),  # backward passes
    ],
)
def test_softmax_split_regime(shape, split, regime, segments):
    limit = _launch.SPLIT_MIN_SOFTMAX_ROW if split else 0
    plan = _launch.softmax_plan(shape, 1, np.float32, 256, limit)
    assert (plan.regime, plan.segments) == (regime, segments)
    assert plan.items == (shape[0] * segments if segments else shape[0])


@pytest.mark.parametrize(
    ("shape", "regime", "segments"),
    [
        ((8, 262144), "split", 128),  # few rows of many classes: 128 blocks a row
        ((262144,), "split", 1024),  # (C,): one row, MAX_GRID blocks
        ((2, 65536), "split", 256),  # from the reductions' limit
        ((2, 65535), "stream", 0),  # rows too short to split
        ((9, 262144), "stream", 0),  # enough rows for the SMs
        ((2, 65536, 3), "columns", 0),  # (N, C, d): positions fill the grid
    ],
)
def test_loss_split_regime(shape, regime, segments):
    t_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    p = loss_plan(
        "cross_entropy", True, shape, np.dtype(np.float32), t_shape,
        np.dtype(np.int64), None, -100, "mean", 0.0, 256,
    )  # fmt: skip
    assert (p.plan.regime, p.plan.segments) == (regime, segments)
    assert p.plan.cpu_regime == ("columns" if len(shape) == 3 else "rows")
