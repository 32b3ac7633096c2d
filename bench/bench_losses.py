"""softkern's cross_entropy and its backward against PyTorch and a copy.

``pytest bench/bench_losses.py --benchmark-only`` times every row; a plain
``pytest`` (pyproject disables benchmarks) runs each row once on the small
shapes (<= 1e5 elements) as a smoke test. Inputs are float32 and float64
logits (seeded standard normals) of shape (N, C) and int64 class indices
(seeded, uniform over the C classes); every loss is reduction="mean". Each group is one
function over one shape on the CPU, and every row checks its result against
the float64 NumPy formula (``softkern.testing.references.EXACT``) once,
before it is timed.

Groups and rows:

- ``cross_entropy``: ``softkern`` (``sk.cross_entropy(x, t)``), ``torch``
  (``F.cross_entropy`` on ``torch.from_numpy`` views, all cores),
  ``torch-unfused`` (``F.nll_loss(torch.log_softmax(x, 1), t)``: writes and
  reads back the N x C log-probabilities) and ``copy``.
- ``cross_entropy_backward``: ``softkern`` (``sk.cross_entropy_backward(x,
  t)``, which recomputes the softmax from x), ``softkern-out`` (the same into
  a preallocated ``out=``) and ``torch``: what autograd runs for the
  backward of ``F.cross_entropy`` and nothing else,
  ``aten.nll_loss_backward`` then ``aten._log_softmax_backward_data`` on the
  log-probabilities that the forward saved (computed once, untimed), and
  ``copy``.
- ``forward+backward``: ``softkern`` (``sk.cross_entropy_and_grad(x, t)``:
  the loss and the gradient in one pass), ``softkern-out`` (the same, the
  gradient into a preallocated ``out=``, as a training loop can),
  ``softkern-unfused`` (``sk.cross_entropy`` then
  ``sk.cross_entropy_backward``), ``torch`` (``F.cross_entropy(x).
  backward()`` through autograd on a leaf tensor that requires grad), and
  ``copy``.

Rows that allocate their result are compared with PyTorch (which allocates);
preallocated rows with the copy (which is preallocated).

``copy`` is ``np.copyto`` of x into a preallocated array (2 * x.nbytes
moved), the same in every group: the memory floor.

``extra_info["bytes"]`` is the least traffic of the group's job, the same
for every row of a group except the copy: the forward reads x and t; the
backward reads x and t and writes the gradient; forward+backward needs no
more than the backward (x read once, as ``sk.cross_entropy_and_grad`` does).
So a forward can at best take about half the copy's time, a backward and
forward+backward about the copy's. ``extra_info["gbps"]`` is bytes / the
*minimum* round time.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _timing import Row, time_row

import softkern as sk
from softkern.testing.references import EXACT

DTYPES = (np.float32, np.float64)
SEED = 20240612
FUNCTIONS = ("cross_entropy", "cross_entropy_backward", "forward+backward")
# (N, C): many rows of a typical vocabulary slice, and few very long rows.
CASES = ((8192, 4096), (512, 65536))
# One small case per headline case (same row length regime, <= 1e5 elements):
# the smoke run checks these; they are timed in the full run too.
SMOKE_CASES = ((256, 256), (4, 16384))
IMPLS = {
    "cross_entropy": ("softkern", "torch", "torch-unfused", "copy"),
    "cross_entropy_backward": ("softkern", "softkern-out", "torch", "copy"),
    "forward+backward": (
        "softkern",
        "softkern-out",
        "softkern-unfused",
        "torch",
        "copy",
    ),
}
LABEL = {
    ("cross_entropy", "softkern"): "sk.cross_entropy",
    ("cross_entropy", "torch"): "F.cross_entropy",
    ("cross_entropy", "torch-unfused"): "F.nll_loss(torch.log_softmax)",
    ("cross_entropy_backward", "softkern"): "sk.cross_entropy_backward",
    ("cross_entropy_backward", "softkern-out"): "sk.cross_entropy_backward(out=)",
    ("cross_entropy_backward", "torch"): (
        "aten nll_loss_backward + _log_softmax_backward_data"
    ),
    ("forward+backward", "softkern"): "sk.cross_entropy_and_grad",
    ("forward+backward", "softkern-out"): "sk.cross_entropy_and_grad(out=)",
    ("forward+backward", "softkern-unfused"): (
        "sk.cross_entropy + sk.cross_entropy_backward"
    ),
    ("forward+backward", "torch"): "F.cross_entropy(x).backward() (autograd)",
}
COPY_LABEL = "np.copyto (floor)"
# The loss: |got - want| <= RTOL * |want| (the spec's float32 bound). The
# gradient crosses zero: per row, |got - want| <= RTOL * max |want| of the row.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
TORCH_MEAN = 1  # at::Reduction::Mean, for the aten ops


def shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


class HostInputs:
    """Seeded logits of one shape and dtype and targets (the same values on
    every run), the copy row's destination and the out= rows' gradient."""

    def __init__(self, shape: tuple[int, int], dtype: type) -> None:
        self.shape = shape
        self.dtype = dtype
        rng = np.random.default_rng([SEED, *shape])
        self.x = rng.standard_normal(shape, dtype=dtype)
        self.t = rng.integers(0, shape[1], size=shape[0], dtype=np.int64)

    @functools.cached_property
    def dst(self) -> np.ndarray:
        return np.empty_like(self.x)

    @functools.cached_property
    def grad_out(self) -> np.ndarray:
        return np.empty_like(self.x)


@pytest.fixture(scope="module")
def host_inputs() -> Callable[[tuple[int, int], type], HostInputs]:
    """Inputs per shape, drawn on first use and kept for the module (the three
    groups of a shape share them)."""
    return functools.cache(HostInputs)


class Exact:
    """The float64 loss and gradient of one shape, computed on first use."""

    def __init__(self, inp: HostInputs) -> None:
        self.inp = inp

    @functools.cached_property
    def loss(self) -> float:
        return float(EXACT["cross_entropy"](self.inp.x, self.inp.t))

    @functools.cached_property
    def grad(self) -> np.ndarray:
        return EXACT["cross_entropy_backward"](self.inp.x, self.inp.t)


@pytest.fixture(scope="module")
def exact(
    host_inputs: Callable[[tuple[int, int], type], HostInputs],
) -> Callable[[tuple[int, int], type], Exact]:
    """The answers of one shape; cases run shape by shape, so only the latest
    shape's (a 256 MB float64 gradient at 8192 x 4096) is kept."""

    @functools.lru_cache(maxsize=1)
    def answer(shape: tuple[int, int], dtype: type) -> Exact:
        return Exact(host_inputs(shape, dtype))

    return answer


def _numpy(result: Any) -> np.ndarray:
    if hasattr(result, "detach"):  # torch tensor
        result = result.detach().numpy()
    return np.asarray(result)


def check_loss(got: Any, want: float, dtype: type, where: str) -> None:
    got = _numpy(got)
    assert got.shape == (), f"{where}: loss shape {got.shape}, expected ()"
    assert got.dtype == dtype, f"{where}: loss dtype {got.dtype}, expected {dtype}"
    err = abs(float(got) - want)
    assert err <= RTOL[dtype] * abs(want), (
        f"{where}: loss {float(got)!r}, float64 reference {want!r} "
        f"(relative error {err / abs(want):.2e} > {RTOL[dtype]})"
    )


def check_grad(got: Any, want: np.ndarray, dtype: type, where: str) -> None:
    got = _numpy(got)
    assert got.shape == want.shape, f"{where}: grad shape {got.shape} != {want.shape}"
    assert got.dtype == dtype, f"{where}: grad dtype {got.dtype}, expected {dtype}"
    err = np.abs(got - want)
    tol = RTOL[dtype] * np.abs(want).max(axis=1, keepdims=True)
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(
            int(np.argmax(np.where(bad, err - tol, -np.inf))), bad.shape
        )
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {bad.size} gradient elements differ "
            f"from float64 NumPy beyond {RTOL[dtype]} x the row's max |grad|; worst at "
            f"{tuple(int(k) for k in i)}: got {got[i]!r}, want {want[i]!r}"
        )


def _torch() -> Any:
    torch = pytest.importorskip("torch")
    # torch defaults to physical cores; use every core, as Numba does.
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def cpu_row(fn: str, impl: str, inp: HostInputs, exact: Exact) -> Row:
    """The row `impl` of group `fn`, with a check of its result."""
    x, t, dtype = inp.x, inp.t, inp.dtype
    where = f"{impl}: {fn}(shape={inp.shape}, dtype={np.dtype(dtype)})"
    fwd_bytes = x.nbytes + t.nbytes  # read the logits and the targets
    nbytes = {
        "cross_entropy": fwd_bytes,
        "cross_entropy_backward": fwd_bytes + x.nbytes,  # and write the grad
        "forward+backward": fwd_bytes + x.nbytes,  # the same, once
    }[fn]

    def check_forward(result: Any) -> None:
        check_loss(result, exact.loss, dtype, where)

    def check_backward(result: Any) -> None:
        check_grad(result, exact.grad, dtype, where)

    def check_both(result: Any) -> None:
        loss, grad = result
        check_loss(loss, exact.loss, dtype, where)
        check_grad(grad, exact.grad, dtype, where)

    check = {
        "cross_entropy": check_forward,
        "cross_entropy_backward": check_backward,
        "forward+backward": check_both,
    }[fn]

    if impl == "copy":
        dst = inp.dst

        def check_copy(_: Any) -> None:
            assert np.array_equal(dst, x), "np.copyto did not copy"

        return Row(
            impl, COPY_LABEL, lambda: np.copyto(dst, x), 2 * x.nbytes, check=check_copy
        )

    label = LABEL[fn, impl]
    if impl.startswith("softkern"):
        grad_out = inp.grad_out
        call: Callable[[], Any] = {
            ("cross_entropy", "softkern"): lambda: sk.cross_entropy(x, t),
            ("cross_entropy_backward", "softkern"): lambda: sk.cross_entropy_backward(
                x, t
            ),
            ("cross_entropy_backward", "softkern-out"): (
                lambda: sk.cross_entropy_backward(x, t, out=grad_out)
            ),
            ("forward+backward", "softkern"): lambda: sk.cross_entropy_and_grad(x, t),
            ("forward+backward", "softkern-out"): (
                lambda: sk.cross_entropy_and_grad(x, t, out=grad_out)
            ),
            ("forward+backward", "softkern-unfused"): lambda: (
                sk.cross_entropy(x, t),
                sk.cross_entropy_backward(x, t),
            ),
        }[fn, impl]
        return Row(impl, label, call, nbytes, check=check)

    torch = _torch()
    functional = torch.nn.functional
    tx, tt = torch.from_numpy(x), torch.from_numpy(t)
    if impl == "torch-unfused":
        call = lambda: functional.nll_loss(torch.log_softmax(tx, 1), tt)  # noqa: E731
    elif fn == "cross_entropy":
        call = lambda: functional.cross_entropy(tx, tt)  # noqa: E731
    elif fn == "cross_entropy_backward":
        # What autograd's backward of F.cross_entropy runs (log_softmax, then
        # nll_loss), from the state its forward saved: log-probabilities and
        # the total weight. Checked against autograd itself below.
        aten = torch.ops.aten
        logp = torch.log_softmax(tx, 1)
        _, total_weight = aten.nll_loss_forward(logp, tt, None, TORCH_MEAN, -100)
        one = torch.ones((), dtype=tx.dtype)

        def call() -> Any:
            g = aten.nll_loss_backward(
                one, logp, tt, None, TORCH_MEAN, -100, total_weight
            )
            return aten._log_softmax_backward_data(g, logp, 1, tx.dtype)

        leaf = tx.clone().requires_grad_()
        functional.cross_entropy(leaf, tt).backward()
        assert torch.allclose(call(), leaf.grad, rtol=1e-6, atol=0.0), (
            f"{where}: the aten calls differ from autograd's gradient"
        )
        del leaf
    else:
        leaf = tx.clone().requires_grad_()

        def call() -> Any:
            leaf.grad = None
            loss = functional.cross_entropy(leaf, tt)
            loss.backward()
            return loss, leaf.grad

    return Row(impl, label, call, nbytes, version=torch.__version__, check=check)


def _cases() -> list[Any]:
    cases = []
    # Shape by shape, so `exact` computes each shape's answers once.
    for dtype in DTYPES:
        for shape in (*SMOKE_CASES, *CASES):
            n = math.prod(shape)  # bench/conftest.py skips n > 1e5 in smoke runs
            for fn in FUNCTIONS:
                for impl in IMPLS[fn]:
                    name = f"{fn}-{np.dtype(dtype)}-{shape_label(shape)}-{impl}"
                    cases.append(pytest.param(fn, shape, dtype, n, impl, id=name))
    return cases


@pytest.mark.parametrize(("fn", "shape", "dtype", "n", "impl"), _cases())
def test_losses_cpu(
    benchmark: Any,
    host_inputs: Callable[[tuple[int, int], type], HostInputs],
    exact: Callable[[tuple[int, int], type], Exact],
    fn: str,
    shape: tuple[int, int],
    dtype: type,
    n: int,
    impl: str,
) -> None:
    inp = host_inputs(shape, dtype)
    row = cpu_row(fn, impl, inp, exact(shape, dtype))
    # The first call compiles the JIT kernels (seconds), so it must not be
    # timed; it doubles as the correctness check, so a wrong kernel is never
    # timed.
    result = row.fn()
    assert row.check is not None
    row.check(result)
    del result

    dtype_name = np.dtype(dtype).name
    benchmark.group = f"{fn} {dtype_name} {shape_label(shape)} cpu"
    benchmark.extra_info.update(
        bench="losses",
        function=fn,
        impl=impl,
        label=row.label,
        device="cpu",
        shape=list(shape),
        n=n,
        dtype=dtype_name,
        # PyTorch has no preallocated form of these: out= rows meet the copy.
        peer="" if impl.endswith("-out") else "torch",
        target_dtype=np.dtype(inp.t.dtype).name,
        reduction="mean",
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    if row.version is not None:
        benchmark.extra_info["version"] = row.version
    time_row(benchmark, row.fn, row.nbytes)
