"""expand, where and broadcast_shapes on the CPU and the GPU (the simulator
without one), against NumPy's broadcasting and PyTorch's expand rules."""

import numpy as np
import pytest
from helpers import GPU_BLOCKS, to_gpu, to_host
from numba import njit

import softkern as sk
from softkern import _index, _launch, _layout

try:
    import torch
except ImportError:  # optional oracle
    torch = None

BLOCK = GPU_BLOCKS[0]


def on(device, a):
    return to_gpu(a) if device == "gpu" else a


# --- broadcast_shapes ------------------------------------------------------------


def test_broadcast_shapes():
    assert sk.broadcast_shapes((2, 1, 1, 1), (1, 3, 4, 1), (1, 1, 4, 2)) == (2, 3, 4, 2)
    assert sk.broadcast_shapes((3,), (2, 1)) == (2, 3)
    assert sk.broadcast_shapes() == ()
    assert sk.broadcast_shapes((0, 1), (1, 5)) == (0, 5)
    assert sk.broadcast_shapes(4, (2, 1)) == (2, 4)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 1\) and \(1, 2, 4, 2\)"):
        sk.broadcast_shapes((1, 3, 4, 1), (1, 2, 4, 2))
    with pytest.raises(TypeError):
        sk.broadcast_shapes(("a",))
    if torch is not None:
        for shapes in [((5, 1, 3), (4, 1)), ((1,), (7, 1, 1)), ((0,), (1,))]:
            assert sk.broadcast_shapes(*shapes) == tuple(
                torch.broadcast_shapes(*shapes)
            )


# --- expand ----------------------------------------------------------------------

EXPANDS = [
    ((2, 1, 5, 1), (2, 4, 5, 6)),  # the seed's example: general kernel
    ((3, 1), (-1, 4)),  # -1 keeps a size
    ((3,), (2, 4, 3)),  # new leading dims
    ((), (2, 3)),  # 0-d grows
    ((4, 5), (4, 5)),  # nothing to broadcast: the flat copy
    ((1, 1, 1, 1, 1, 1, 1, 3), (2, 1, 3, 1, 2, 1, 2, 3)),  # 8 dims
    ((2, 1), (2, 0)),  # empty result
]


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize(("shape", "sizes"), EXPANDS)
def test_expand_matches_numpy(rng, device, shape, sizes):
    x = rng.standard_normal(shape).astype(np.float32)
    got = sk.expand(on(device, x), *sizes, block=BLOCK)
    target = tuple(
        s if s != -1 else shape[i - (len(sizes) - len(shape))]
        for i, s in enumerate(sizes)
    )
    expected = np.broadcast_to(x, target)
    got = to_host(got)
    assert got.shape == target and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    # sizes may also come as one tuple
    np.testing.assert_array_equal(to_host(sk.expand(on(device, x), sizes)), expected)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_expand_follows_torch_expand(rng):
    x = rng.standard_normal((3, 1, 2))
    for sizes in [(3, 4, 2), (5, 3, -1, 2), (-1, 7, -1)]:
        np.testing.assert_array_equal(
            sk.expand(x, *sizes), torch.from_numpy(x).expand(*sizes).numpy()
        )


def test_expand_errors_read_like_pytorch():
    x = np.ones((2, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"size \(4\) must match the existing size \(2\)"
    ):
        sk.expand(x, 2, 4)
    with pytest.raises(ValueError, match="number of sizes provided"):
        sk.expand(x, 4)
    with pytest.raises(ValueError, match="leading, non-existing dimension 0"):
        sk.expand(x, -1, 2, 2)
    with pytest.raises(TypeError):
        sk.expand(x, "a", 2)
    with pytest.raises(TypeError, match="complex"):
        sk.expand(np.ones(2, np.complex64), 3, 2)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_expand_dtypes_and_strided_input(rng, device):
    base = rng.standard_normal((6, 8))
    for dtype in (np.float64, np.float16, np.int32, np.uint8, np.bool_):
        x = (base * 10).astype(dtype)
        src = on(device, x)[::2, 3:4]  # a strided view: read in place
        got = to_host(sk.expand(src, 2, 3, 5))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, np.broadcast_to(x[::2, 3:4], (2, 3, 5)))
    reversed_ = base[::-1, ::-2]  # negative strides: copied first
    np.testing.assert_array_equal(
        to_host(sk.expand(on(device, np.ascontiguousarray(reversed_))[:, :1], 4, 6, 4)),
        np.broadcast_to(reversed_[:, :1], (4, 6, 4)),
    )
    np.testing.assert_array_equal(
        sk.expand(reversed_[:, :1], 2, 6, 3),
        np.broadcast_to(reversed_[:, :1], (2, 6, 3)),
    )


# --- where -----------------------------------------------------------------------

WHERES = [
    ((2, 1, 1, 1), (1, 3, 4, 1), (1, 1, 4, 2)),  # the seed's example
    ((5, 7), (5, 7), (5, 7)),  # same shape: the flat kernel
    ((6, 1), (1, 9), (6, 9)),  # (N, 1) against (1, M)
    ((3,), (), (2, 3)),  # 0-d x
    ((0, 3), (1, 3), (3,)),  # empty
    ((1, 2, 1, 2, 1, 2, 1, 2), (2, 1, 2, 1, 2, 1, 2, 1), (2,)),  # 8 dims
]


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize(("cshape", "xshape", "yshape"), WHERES)
def test_where_matches_numpy(rng, device, cshape, xshape, yshape):
    c = rng.random(cshape) > 0.5
    x = rng.standard_normal(xshape).astype(np.float32)
    y = rng.standard_normal(yshape)
    got = to_host(sk.where(on(device, c), on(device, x), on(device, y), block=BLOCK))
    expected = np.where(c, x, y)
    assert got.dtype == expected.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_where_python_scalars_are_weak(rng, device):
    c = rng.random((4, 5)) > 0.5
    x = rng.standard_normal((4, 5)).astype(np.float32)
    got = to_host(sk.where(on(device, c), on(device, x), 0.0))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.where(c, x, np.float32(0)))
    ints = rng.integers(-9, 9, (4, 5)).astype(np.int16)
    got = to_host(sk.where(on(device, c), 7, on(device, ints)))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, np.where(c, np.int16(7), ints))
    got = to_host(sk.where(on(device, c), 1, 2.5))  # both scalars
    np.testing.assert_array_equal(got, np.where(c, 1.0, 2.5))
    mixed = to_host(sk.where(on(device, c), on(device, ints), on(device, x)))
    assert mixed.dtype == np.result_type(np.int16, np.float32)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_where_non_contiguous_inputs(rng, device):
    c = rng.random((8, 12)) > 0.5
    x = rng.standard_normal((12, 8)).astype(np.float32)
    y = rng.standard_normal((8, 24))
    got = to_host(
        sk.where(on(device, c)[::2], on(device, x).T[::2], on(device, y)[::2, ::2])
    )
    np.testing.assert_array_equal(got, np.where(c[::2], x.T[::2], y[::2, ::2]))


def test_where_errors():
    c = np.ones((2, 3), bool)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="bool, got int64"):
        sk.where(c.astype(np.int64), x, x)
    with pytest.raises(TypeError, match="bool array"):
        sk.where(True, x, x)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
        sk.where(c, x, np.ones(4))
    with pytest.raises(TypeError, match="two devices"):
        sk.where(to_gpu(c), x, 1.0)
    with pytest.raises(TypeError):
        sk.where(c, x.astype(np.complex64), 1.0)


def test_inputs_are_not_modified(rng):
    c = rng.random((3, 4)) > 0.5
    x = rng.standard_normal((3, 1))
    keep = (c.copy(), x.copy())
    sk.where(c, x, -x)
    sk.expand(x, 2, 3, 4)
    np.testing.assert_array_equal(c, keep[0])
    np.testing.assert_array_equal(x, keep[1])


# --- plan and 64-bit index arithmetic --------------------------------------------


def test_plan_collapses_dims_and_takes_the_fast_path():
    s = lambda shape: _layout.broadcast_strides(  # noqa: E731
        shape, tuple(np.empty(shape, np.int8).strides), (4, 5, 6)
    )
    plan = _launch.broadcast_plan((4, 5, 6), [s((4, 5, 6)), s((4, 5, 6))])
    assert plan.contiguous and plan.shape == (120,)
    plan = _launch.broadcast_plan((4, 5, 6), [s((4, 5, 6)), s((1, 5, 6))])
    assert not plan.contiguous and plan.shape == (4, 30)
    assert plan.strides == ((30, 1), (0, 1))
    plan = _launch.broadcast_plan((4, 5, 6), [s((4, 1, 1))])
    assert plan.shape == (4, 30) and plan.strides == ((1, 0),)


def test_index_arithmetic_beyond_two_to_the_31():
    # a (3, 2**20, 1024) output (3 * 2**30 elements) from a (3, 1, 1024)
    # operand and a transposed (1024, 2**20)-like one: planned, not allocated
    out_shape = (3, 1 << 20, 1024)
    a = _layout.broadcast_strides((3, 1, 1024), (1024, 1024, 1), out_shape)
    b = _layout.broadcast_strides((1 << 20, 1024), (1, 1 << 20), out_shape)
    plan = _launch.broadcast_plan(out_shape, [a, b])
    assert plan.n == 3 << 30 > 2**31
    offset = njit(_index.offset_of)  # the kernels' arithmetic, in int64
    shape = np.asarray(plan.shape, np.int64)
    for i in [0, 2**31 - 1, 2**31, 2**31 + 12345, 2**31 + 2**30 - 9, plan.n - 1]:
        coords = np.unravel_index(i, out_shape)
        want_a = coords[0] * 1024 + coords[2]
        want_b = coords[1] + coords[2] * (1 << 20)
        got_a = offset(np.int64(i), shape, np.asarray(plan.strides[0], np.int64))
        got_b = offset(np.int64(i), shape, np.asarray(plan.strides[1], np.int64))
        assert (got_a, got_b) == (want_a, want_b), i
        assert _index.offset_of(i, plan.shape, plan.strides[0]) == want_a
    assert plan.items == 3 * (1 << 20) * -(-1024 // plan.chunk)


# --- paths the cases above do not reach --------------------------------------------


def test_strides_that_are_not_whole_elements(rng):
    rec = np.zeros(4, dtype=[("a", "f4"), ("b", "i1")])  # field stride 5 bytes
    rec["a"] = rng.standard_normal(4)
    np.testing.assert_array_equal(
        sk.expand(rec["a"], 2, 4), np.broadcast_to(rec["a"], (2, 4))
    )
    c = rng.random(4) > 0.5
    np.testing.assert_array_equal(
        sk.where(c, rec["a"], -1.0), np.where(c, rec["a"], -1.0)
    )


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_where_float16_and_bool_operands(rng, device):
    c = rng.random((5, 6)) > 0.5
    h = rng.standard_normal((5, 6)).astype(np.float16)
    b = rng.random((1, 6)) > 0.5
    for x, y in ((h, h[::-1]), (h, np.float32(2)), (b, h), (b, ~b), (b, 3)):
        got = to_host(
            sk.where(
                on(device, c),
                x if np.isscalar(x) else on(device, x),
                y if np.isscalar(y) else on(device, y),
            )
        )
        expected = np.where(c, x, y)
        assert got.dtype == expected.dtype, (x.dtype, type(y))
        np.testing.assert_array_equal(got, expected)


def test_numpy_scalars_go_with_gpu_arrays_and_stay_strong(rng):
    c = rng.random((3, 4)) > 0.5
    x = rng.integers(0, 9, (3, 4)).astype(np.int8)
    got = to_host(sk.where(to_gpu(c), to_gpu(x), np.float32(1.5)))
    np.testing.assert_array_equal(got, np.where(c, x, np.float32(1.5)))
    assert got.dtype == np.float32


def test_gpu_negative_strides_are_copied_first(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    view = to_gpu(x)[::-1]
    np.testing.assert_array_equal(
        to_host(sk.expand(view[:, :1], 2, 6, 3)),
        np.broadcast_to(x[::-1, :1], (2, 6, 3)),
    )


@pytest.mark.usefixtures("small_grid")
def test_long_rows_in_pieces_and_grid_strides(rng, monkeypatch):
    # CPU rows cut into several work items; GPU blocks striding over the grid
    monkeypatch.setattr(_launch, "BROADCAST_CHUNK", 7)
    c = rng.random((3, 1)) > 0.5
    x = rng.standard_normal((1, 300)).astype(np.float32)
    for device in ("cpu", "gpu"):
        got = to_host(sk.where(on(device, c), on(device, x), -1.5, block=BLOCK))
        np.testing.assert_array_equal(got, np.where(c, x, np.float32(-1.5)))
        got = to_host(sk.expand(on(device, x), 3, 300, block=BLOCK))
        np.testing.assert_array_equal(got, np.broadcast_to(x, (3, 300)))
