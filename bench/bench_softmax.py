"""softkern's softmax and log_softmax against PyTorch, SciPy, NumPy and a copy.

``pytest bench/bench_softmax.py --benchmark-only`` times every row; a plain
``pytest`` (pyproject disables benchmarks) runs each row once on the small
shapes (<= 1e5 elements) as a smoke test. Each group is one function over one
dim of one shape on the CPU; every row checks its result against the float64
NumPy formula (``softkern.testing.references.EXACT``) once, before it is timed.

Rows: ``softkern`` (a fresh result array per call), ``softkern-out`` (into a
preallocated ``out=``, which saves the page faults of a fresh allocation),
``torch`` (on ``torch.from_numpy(x)``, all cores), ``scipy``
(``scipy.special``, the reference row: ``references.BASELINE``), ``numpy``
(the formula written in NumPy: ``references.numpy_softmax``) and ``copy``
(``np.copyto`` into a preallocated array of the same bytes: the memory floor).

``extra_info["bytes"]`` is x.nbytes + out.nbytes for every row (read the
input, write the result; the copy moves the same). ``extra_info["gbps"]`` is
bytes / the *minimum* round time (the machine is shared, so noise only ever
adds time).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from importlib import util as importlib_util
from typing import Any

import numpy as np
import pytest
from _timing import Row, time_row

import softkern as sk
from softkern.testing.references import (
    BASELINE,
    EXACT,
    numpy_log_softmax,
    numpy_softmax,
)

DTYPE = np.float32
SEED = 20240611
FUNCTIONS = ("softmax", "log_softmax")
# (shape, dim): the headline cases, one per CPU regime and row length.
CASES = (
    ((4096, 4096), -1),
    ((65536, 128), -1),
    ((256, 65536), -1),
    ((4096, 4096), 0),
    ((64, 128, 512), 1),
)
# One small case per headline case (same regime, <= 1e5 elements): the smoke
# run checks these; they are not headline sizes.
SMOKE_CASES = (
    ((256, 256), -1),
    ((1024, 64), -1),
    ((4, 16384), -1),
    ((256, 256), 0),
    ((4, 32, 512), 1),
)
IMPLS = ("softkern", "softkern-out", "torch", "scipy", "numpy", "copy")
# The reference row runs references.BASELINE: SciPy when it is installed.
HAVE_SCIPY = importlib_util.find_spec("scipy") is not None
REFERENCE_IMPL = "scipy" if HAVE_SCIPY else "numpy"
# |got - want| <= RTOL * |want| + ATOL: float32 rounding of every step, with
# room to spare; a lost row, a wrong max or a wrong sum fails by far more.
RTOL = 1e-5
ATOL = {"softmax": 0.0, "log_softmax": 1e-5}
LABEL = {
    "softkern": "softkern",
    "softkern-out": "softkern out=",
    "torch": "torch.{fn}",
    "scipy": "scipy.special.{fn}",
    "numpy": "numpy {formula}",
    "copy": "np.copyto (floor)",
}
NUMPY = {"softmax": numpy_softmax, "log_softmax": numpy_log_softmax}
FORMULA = {
    "softmax": "exp(x - max) / sum",
    "log_softmax": "(x - max) - log(sum(exp))",
}
SOFTKERN = {"softmax": sk.softmax, "log_softmax": sk.log_softmax}


def shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


class HostInputs:
    """Standard-normal float32 input of one shape (seeded: the same values on
    every run) and preallocated outputs."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        rng = np.random.default_rng([SEED, *shape])
        self.x = rng.standard_normal(shape, dtype=DTYPE)

    @functools.cached_property
    def out(self) -> np.ndarray:
        """The softkern-out row's result array."""
        return np.empty_like(self.x)

    @functools.cached_property
    def dst(self) -> np.ndarray:
        """The copy row's destination."""
        return np.empty_like(self.x)


@pytest.fixture(scope="module")
def host_inputs() -> Callable[[tuple[int, ...]], HostInputs]:
    """Inputs per shape, drawn on first use and kept for the module (two
    groups share each (4096, 4096) input)."""
    return functools.cache(HostInputs)


@pytest.fixture(scope="module")
def exact(
    host_inputs: Callable[[tuple[int, ...]], HostInputs],
) -> Callable[[str, tuple[int, ...], int], np.ndarray]:
    """The float64 answer of one group, computed once. Rows of a group run one
    after another, so only the latest answer (128 MB at 16M elements) is kept."""

    @functools.lru_cache(maxsize=1)
    def answer(fn: str, shape: tuple[int, ...], dim: int) -> np.ndarray:
        return EXACT[fn](host_inputs(shape).x, dim)

    return answer


def check_result(
    fn: str, want: np.ndarray, result: Any, impl: str, shape: tuple, dim: int
) -> None:
    if hasattr(result, "numpy"):  # torch tensor
        result = result.numpy()
    got = np.asarray(result)
    where = f"{impl}: {fn}(shape={shape}, dim={dim})"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert got.dtype == DTYPE, f"{where}: dtype {got.dtype}, expected float32"
    err = np.abs(got - want)
    tol = RTOL * np.abs(want) + ATOL[fn]
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(
            int(np.argmax(np.where(bad, err - tol, -np.inf))), bad.shape
        )
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {bad.size} elements differ from "
            f"float64 NumPy beyond rtol {RTOL} / atol {ATOL[fn]}; worst at "
            f"{tuple(int(k) for k in i)}: got {got[i]!r}, want {want[i]!r}"
        )


def cpu_row(fn: str, impl: str, inp: HostInputs, dim: int) -> Row:
    x = inp.x
    nbytes = 2 * x.nbytes  # read x, write a result of the same dtype and size
    label = LABEL[impl].format(fn=fn, formula=FORMULA[fn])
    ref = impl == REFERENCE_IMPL
    if impl == "softkern":
        skfn = SOFTKERN[fn]
        return Row(impl, label, lambda: skfn(x, dim), nbytes)
    if impl == "softkern-out":
        skfn, out = SOFTKERN[fn], inp.out
        return Row(impl, label, lambda: skfn(x, dim, out=out), nbytes)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        # torch defaults to physical cores; use every core, as Numba does.
        torch.set_num_threads(os.cpu_count() or 1)
        tx = torch.from_numpy(x)
        tfn = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}[fn]
        return Row(impl, label, lambda: tfn(tx, dim), nbytes, version=torch.__version__)
    if impl == "scipy":
        scipy = pytest.importorskip("scipy")
        base = BASELINE[fn]  # scipy.special's, since scipy is importable
        return Row(
            impl, label, lambda: base(x, dim), nbytes, ref, version=scipy.__version__
        )
    if impl == "numpy":
        npfn = NUMPY[fn]
        return Row(impl, label, lambda: npfn(x, dim), nbytes, ref)
    assert impl == "copy"
    dst = inp.dst

    def check(_: Any) -> None:
        assert np.array_equal(dst, x), "np.copyto did not copy"

    return Row(impl, label, lambda: np.copyto(dst, x), nbytes, check=check)


def _cases() -> list[Any]:
    cases = []
    for fn in FUNCTIONS:
        for shape, dim in (*SMOKE_CASES, *CASES):
            n = math.prod(shape)  # bench/conftest.py skips n > 1e5 in smoke runs
            for impl in IMPLS:
                cases.append(
                    pytest.param(
                        fn,
                        shape,
                        dim,
                        n,
                        impl,
                        id=f"{fn}-{shape_label(shape)}-dim{dim}-{impl}",
                    )
                )
    return cases


@pytest.mark.parametrize(("fn", "shape", "dim", "n", "impl"), _cases())
def test_softmax_cpu(
    benchmark: Any,
    host_inputs: Callable[[tuple[int, ...]], HostInputs],
    exact: Callable[[str, tuple[int, ...], int], np.ndarray],
    fn: str,
    shape: tuple[int, ...],
    dim: int,
    n: int,
    impl: str,
) -> None:
    inp = host_inputs(shape)
    row = cpu_row(fn, impl, inp, dim)
    # The first call compiles the JIT kernels (seconds), so it must not be
    # timed; it doubles as the correctness check, so a wrong kernel is never
    # timed.
    result = row.fn()
    if row.check is not None:
        row.check(result)
    else:
        check_result(fn, exact(fn, shape, dim), result, impl, shape, dim)
    del result

    benchmark.group = f"{fn} float32 {shape_label(shape)} dim={dim} cpu"
    benchmark.extra_info.update(
        bench="softmax",
        function=fn,
        impl=impl,
        label=row.label,
        device="cpu",
        shape=list(shape),
        dim=dim,
        n=n,
        dtype=np.dtype(DTYPE).name,
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    if row.version is not None:
        benchmark.extra_info["version"] = row.version
    time_row(benchmark, row.fn, row.nbytes)
