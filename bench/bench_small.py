"""The fixed cost of a call: every public function against its fastest peer.

``pytest bench/bench_small.py --benchmark-only`` times each public function
on float32 input at three sizes, (32, 10), (100, 100) (1e4 elements) and
(256, 1000), next to NumPy and PyTorch CPU doing the same job (the same
result, both allocating it, as softkern does), and the ``busy`` group: a
(1000, 1000) softmax while another process keeps one core busy, softkern
against PyTorch under the same load (and both on an idle machine). A plain
``pytest`` runs each row once (a smoke test that also checks its answer).

Each group is one function at one size; rows are ``softkern``, ``numpy``
(the function written with NumPy, or NumPy's own: ``np.sum``, ``np.where``,
``np.dot``, ``np.broadcast_to(...).copy()``) and ``torch`` (on
``torch.from_numpy`` views, every core). ``bench/table.py --bench small``
puts softkern's time over the faster peer's in one table: the target is 3x
at (32, 10) and 1x from 1e5 elements up. Every row's answer is checked
against NumPy's (float64 where NumPy's own float32 would not do) before it
is timed; random rows (gumbel_softmax) are checked for shape, dtype and
normalisation.

PyTorch peers for the functions it has no public name for: the backward
passes call ``torch._softmax_backward_data`` / ``_log_softmax_backward_data``
(what autograd runs), and cross_entropy_backward is the gradient of the mean
loss from the logits written in PyTorch, softmax then the one-hot
subtracted and scaled in place.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _timing import time_row

import softkern as sk

SEED = 20261130
SIZES = ((32, 10), (100, 100), (256, 1000))
RTOL, ATOL = 1e-5, 1e-6


@dataclass
class Inputs:
    """Seeded float32 operands of one (rows, cols) size."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        rng = np.random.default_rng([SEED, self.rows, self.cols])
        shape = (self.rows, self.cols)
        self.x = rng.standard_normal(shape, dtype=np.float32)
        self.y = rng.standard_normal(shape, dtype=np.float32)
        self.c = rng.random(shape) > 0.5
        self.column = rng.standard_normal((self.rows, 1), dtype=np.float32)
        self.target = rng.integers(0, self.cols, self.rows)
        e = np.exp(self.x - self.x.max(1, keepdims=True))
        self.probs = (e / e.sum(1, keepdims=True)).astype(np.float32)
        self.logp = np.log(self.probs)
        self.flat = self.x.reshape(-1)
        self.flat2 = self.y.reshape(-1)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _np_cross_entropy_backward(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    p = _np_softmax(x)
    p[np.arange(len(t)), t] -= 1
    p /= len(t)
    return p


_GUMBEL_RNG = np.random.default_rng(SEED)


def _np_gumbel_softmax(x: np.ndarray) -> np.ndarray:
    return _np_softmax(x + _GUMBEL_RNG.gumbel(size=x.shape).astype(np.float32))


@dataclass(frozen=True)
class Case:
    """One public function: how softkern, NumPy and PyTorch call it."""

    name: str
    softkern: Callable[[Inputs], Callable[[], Any]]
    numpy: Callable[[Inputs], Callable[[], Any]]
    torch: Callable[[Any, Any], Callable[[], Any]] | None  # (torch, tensors)
    random: bool = False


CASES = (
    Case(
        "sum",
        lambda d: lambda: sk.sum(d.x),
        lambda d: lambda: np.sum(d.x),
        lambda torch, t: lambda: torch.sum(t.x),
    ),
    Case(
        "sum dim=1",
        lambda d: lambda: sk.sum(d.x, 1),
        lambda d: lambda: np.sum(d.x, 1),
        lambda torch, t: lambda: torch.sum(t.x, 1),
    ),
    Case(
        "sum dim=0",
        lambda d: lambda: sk.sum(d.x, 0),
        lambda d: lambda: np.sum(d.x, 0),
        lambda torch, t: lambda: torch.sum(t.x, 0),
    ),
    Case(
        "amax dim=1",
        lambda d: lambda: sk.amax(d.x, 1),
        lambda d: lambda: np.max(d.x, 1),
        lambda torch, t: lambda: torch.amax(t.x, 1),
    ),
    Case(
        "amin dim=0",
        lambda d: lambda: sk.amin(d.x, 0),
        lambda d: lambda: np.min(d.x, 0),
        lambda torch, t: lambda: torch.amin(t.x, 0),
    ),
    Case(
        "dot",
        lambda d: lambda: sk.dot(d.flat, d.flat2),
        lambda d: lambda: np.dot(d.flat, d.flat2),
        lambda torch, t: lambda: torch.dot(t.flat, t.flat2),
    ),
    Case(
        "softmax",
        lambda d: lambda: sk.softmax(d.x, 1),
        lambda d: lambda: _np_softmax(d.x),
        lambda torch, t: lambda: torch.softmax(t.x, 1),
    ),
    Case(
        "log_softmax",
        lambda d: lambda: sk.log_softmax(d.x, 1),
        lambda d: lambda: _np_log_softmax(d.x),
        lambda torch, t: lambda: torch.log_softmax(t.x, 1),
    ),
    Case(
        "logsumexp",
        lambda d: lambda: sk.logsumexp(d.x, 1),
        lambda d: (
            lambda: (lambda m: m[:, 0] + np.log(np.exp(d.x - m).sum(1)))(
                d.x.max(1, keepdims=True)
            )
        ),
        lambda torch, t: lambda: torch.logsumexp(t.x, 1),
    ),
    Case(
        "softmax_backward",
        lambda d: lambda: sk.softmax_backward(d.y, d.probs, 1),
        lambda d: lambda: d.probs * (d.y - (d.y * d.probs).sum(1, keepdims=True)),
        lambda torch, t: (
            lambda: torch._softmax_backward_data(t.y, t.probs, 1, torch.float32)
        ),
    ),
    Case(
        "log_softmax_backward",
        lambda d: lambda: sk.log_softmax_backward(d.y, d.logp, 1),
        lambda d: lambda: d.y - np.exp(d.logp) * d.y.sum(1, keepdims=True),
        lambda torch, t: (
            lambda: torch._log_softmax_backward_data(t.y, t.logp, 1, torch.float32)
        ),
    ),
    Case(
        "expand",
        lambda d: lambda: sk.expand(d.column, d.rows, d.cols),
        lambda d: lambda: np.broadcast_to(d.column, (d.rows, d.cols)).copy(),
        lambda torch, t: lambda: t.column.expand(t.x.shape).contiguous(),
    ),
    Case(
        "where",
        lambda d: lambda: sk.where(d.c, d.x, 0.0),
        lambda d: lambda: np.where(d.c, d.x, np.float32(0.0)),
        lambda torch, t: lambda: torch.where(t.c, t.x, 0.0),
    ),
    Case(
        "cross_entropy",
        lambda d: lambda: sk.cross_entropy(d.x, d.target),
        lambda d: lambda: -_np_log_softmax(d.x)[np.arange(d.rows), d.target].mean(),
        lambda torch, t: lambda: torch.nn.functional.cross_entropy(t.x, t.target),
    ),
    Case(
        "cross_entropy_backward",
        lambda d: lambda: sk.cross_entropy_backward(d.x, d.target),
        lambda d: lambda: _np_cross_entropy_backward(d.x, d.target),
        lambda torch, t: (
            lambda: (
                lambda p: p.index_put_(
                    (t.rows, t.target), torch.tensor(-1.0), accumulate=True
                ).div_(len(t.target))
            )(torch.softmax(t.x, 1))
        ),
    ),
    Case(
        "nll_loss",
        lambda d: lambda: sk.nll_loss(d.logp, d.target),
        lambda d: lambda: -d.logp[np.arange(d.rows), d.target].mean(),
        lambda torch, t: lambda: torch.nn.functional.nll_loss(t.logp, t.target),
    ),
    Case(
        "sigmoid",
        lambda d: lambda: sk.sigmoid(d.x),
        lambda d: lambda: 1 / (1 + np.exp(-d.x)),
        lambda torch, t: lambda: torch.sigmoid(t.x),
    ),
    Case(
        "logsigmoid",
        lambda d: lambda: sk.logsigmoid(d.x),
        lambda d: lambda: -np.logaddexp(np.float32(0), -d.x),
        lambda torch, t: lambda: torch.nn.functional.logsigmoid(t.x),
    ),
    Case(
        "gumbel_softmax",
        lambda d: lambda: sk.gumbel_softmax(d.x),
        lambda d: lambda: _np_gumbel_softmax(d.x),
        lambda torch, t: lambda: torch.nn.functional.gumbel_softmax(t.x),
        random=True,
    ),
    Case(
        "broadcast_shapes",
        lambda d: lambda: sk.broadcast_shapes((d.rows, 1), (1, d.cols)),
        lambda d: lambda: np.broadcast_shapes((d.rows, 1), (1, d.cols)),
        lambda torch, t: (
            lambda: torch.broadcast_shapes((len(t.target), 1), (1, t.x.shape[1]))
        ),
    ),
)
IMPLS = ("softkern", "numpy", "torch")


class Tensors:
    """torch.from_numpy views of one size's inputs (no copies)."""

    def __init__(self, torch: Any, d: Inputs) -> None:
        for name in ("x", "y", "c", "column", "target", "probs", "logp"):
            setattr(self, name, torch.from_numpy(getattr(d, name)))
        self.flat, self.flat2 = self.x.reshape(-1), self.y.reshape(-1)
        self.rows = torch.arange(d.rows)


def _torch() -> Any:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(os.cpu_count() or 1)  # every core, as Numba does
    return torch


def _check(case: Case, got: Any, want: Any) -> None:
    if hasattr(got, "numpy"):
        got = got.numpy()
    if isinstance(want, tuple):
        assert tuple(got) == want, case.name
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{case.name}: shape {got.shape} != {want.shape}"
    if case.random:  # a sample: rows of probabilities
        assert np.allclose(got.sum(1), 1, rtol=1e-5), case.name
        return
    bad = ~(np.abs(got - want) <= RTOL * np.abs(want) + ATOL * math.sqrt(want.size))
    assert not bad.any(), f"{case.name}: {int(bad.sum())} elements differ"


def _cases() -> Iterator[Any]:
    for case in CASES:
        for rows, cols in SIZES:
            for impl in IMPLS:
                yield pytest.param(
                    case, rows, cols, impl, id=f"{case.name}-{rows}x{cols}-{impl}"
                )


@pytest.mark.parametrize(("case", "rows", "cols", "impl"), _cases())
def test_small(benchmark: Any, case: Case, rows: int, cols: int, impl: str) -> None:
    d = Inputs(rows, cols)
    if impl == "softkern":
        fn, version = case.softkern(d), sk.__version__
    elif impl == "numpy":
        fn, version = case.numpy(d), np.__version__
    else:
        torch = _torch()
        fn, version = case.torch(torch, Tensors(torch, d)), torch.__version__
    _check(case, fn(), case.numpy(d)())  # compiles, and checks, untimed
    benchmark.group = f"small: {case.name} float32 {rows}x{cols}"
    benchmark.extra_info.update(
        bench="small",
        function=case.name,
        impl=impl,
        label=impl,
        device="cpu",
        shape=[rows, cols],
        n=rows * cols,
        dtype="float32",
        bytes=d.x.nbytes,
        version=version,
    )
    time_row(benchmark, fn, d.x.nbytes)


# --- the busy group: a core kept busy by another process ---------------------

BUSY_SHAPE = (1000, 1000)


@pytest.fixture
def busy_core() -> Iterator[None]:
    """Another process spinning on one core while the row is timed."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("load", ["idle", "busy"])
@pytest.mark.parametrize("impl", ["softkern", "torch"])
def test_busy(benchmark: Any, request: Any, impl: str, load: str) -> None:
    x = np.random.default_rng([SEED, *BUSY_SHAPE]).standard_normal(
        BUSY_SHAPE, dtype=np.float32
    )
    if impl == "softkern":
        fn = lambda: sk.softmax(x, 1)  # noqa: E731
    else:
        torch = _torch()
        tx = torch.from_numpy(x)
        fn = lambda: torch.softmax(tx, 1)  # noqa: E731
    got = fn()
    np.testing.assert_allclose(np.asarray(got), _np_softmax(x), rtol=RTOL, atol=1e-7)
    if load == "busy":
        request.getfixturevalue("busy_core")
    benchmark.group = f"busy: softmax float32 1000x1000 {load}"
    benchmark.extra_info.update(
        bench="small",
        function="softmax",
        impl=impl,
        label=impl,
        device="cpu",
        shape=list(BUSY_SHAPE),
        n=x.size,
        dtype="float32",
        bytes=2 * x.nbytes,
        load=load,
    )
    time_row(benchmark, fn, 2 * x.nbytes)
