"""softkern's softmax and log_softmax against PyTorch, SciPy, NumPy and a copy.

``pytest bench/bench_softmax.py --benchmark-only`` times every row; a plain
``pytest`` (pyproject disables benchmarks) runs each row once on the small
shapes (<= 1e5 elements) as a smoke test. Each group is one function over one
dim of one shape on the CPU; every row checks its result against the float64
NumPy formula (``softkern.testing.references.EXACT``) once, before it is timed.

Every group runs in float32 and in float64. Rows, in two protocols that are
only ever compared with each other:

- allocating a result on every call: ``softkern``, ``torch``
  (``torch.softmax`` on ``torch.from_numpy(x)``, all cores), ``scipy``
  (``scipy.special``, the reference row: ``references.BASELINE``) and
  ``numpy`` (the formula written in NumPy: ``references.numpy_softmax``);
- writing into a preallocated result: ``softkern-out`` (``out=``) and
  ``torch-out`` (``torch._softmax(x, dim, False, out=t)``, PyTorch's kernel
  writing into ``t``; ``torch._log_softmax`` likewise);

and ``copy`` (``np.copyto`` into a preallocated array of the same bytes: the
memory floor, to compare with the preallocated rows).

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

DTYPES = (np.float32, np.float64)
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
IMPLS = ("softkern", "torch", "softkern-out", "torch-out", "scipy", "numpy", "copy")
# The row each softkern row is compared with: the same protocol.
PEER = {"softkern": "torch", "softkern-out": "torch-out"}
# The reference row runs references.BASELINE: SciPy when it is installed.
HAVE_SCIPY = importlib_util.find_spec("scipy") is not None
REFERENCE_IMPL = "scipy" if HAVE_SCIPY else "numpy"
# |got - want| <= RTOL * |want| + ATOL: float32 rounding of every step, with
# room to spare; a lost row, a wrong max or a wrong sum fails by far more.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
ATOL = {
    ("softmax", np.float32): 0.0,
    ("log_softmax", np.float32): 1e-5,
    ("softmax", np.float64): 0.0,
    ("log_softmax", np.float64): 1e-12,
}
LABEL = {
    "softkern": "softkern",
    "softkern-out": "softkern out=",
    "torch": "torch.{fn}",
    "torch-out": "torch._{fn}(out=)",
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
    """Standard-normal input of one shape and dtype (seeded: the same values
    on every run) and preallocated outputs."""

    def __init__(self, shape: tuple[int, ...], dtype: type) -> None:
        self.shape = shape
        rng = np.random.default_rng([SEED, *shape])
        self.x = rng.standard_normal(shape, dtype=dtype)

    @functools.cached_property
    def out(self) -> np.ndarray:
        """The softkern-out row's result array."""
        return np.empty_like(self.x)

    @functools.cached_property
    def torch_out(self) -> Any:
        """The torch-out row's result tensor."""
        return _torch().from_numpy(np.empty_like(self.x))

    @functools.cached_property
    def dst(self) -> np.ndarray:
        """The copy row's destination."""
        return np.empty_like(self.x)


def _torch() -> Any:
    torch = pytest.importorskip("torch")
    # torch defaults to physical cores; use every core, as Numba does.
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


@pytest.fixture(scope="module")
def host_inputs() -> Callable[[tuple[int, ...], type], HostInputs]:
    """Inputs per shape, drawn on first use and kept for the module (two
    groups share each (4096, 4096) input)."""
    return functools.cache(HostInputs)


@pytest.fixture(scope="module")
def exact(
    host_inputs: Callable[[tuple[int, ...], type], HostInputs],
) -> Callable[[str, tuple[int, ...], type, int], np.ndarray]:
    """The float64 answer of one group, computed once. Rows of a group run one
    after another, so only the latest answer (128 MB at 16M elements) is kept."""

    @functools.lru_cache(maxsize=1)
    def answer(fn: str, shape: tuple[int, ...], dtype: type, dim: int) -> np.ndarray:
        return EXACT[fn](host_inputs(shape, dtype).x, dim)

    return answer


def check_result(
    fn: str,
    want: np.ndarray,
    result: Any,
    impl: str,
    shape: tuple,
    dtype: type,
    dim: int,
) -> None:
    if hasattr(result, "numpy"):  # torch tensor
        result = result.numpy()
    got = np.asarray(result)
    where = f"{impl}: {fn}(shape={shape}, dtype={np.dtype(dtype)}, dim={dim})"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert got.dtype == dtype, f"{where}: dtype {got.dtype}, expected {dtype}"
    err = np.abs(got - want)
    rtol, atol = RTOL[dtype], ATOL[fn, dtype]
    tol = rtol * np.abs(want) + atol
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(
            int(np.argmax(np.where(bad, err - tol, -np.inf))), bad.shape
        )
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {bad.size} elements differ from "
            f"float64 NumPy beyond rtol {rtol} / atol {atol}; worst at "
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
        torch = _torch()
        tx = torch.from_numpy(x)
        tfn = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}[fn]
        return Row(impl, label, lambda: tfn(tx, dim), nbytes, version=torch.__version__)
    if impl == "torch-out":
        torch = _torch()
        tx, tout = torch.from_numpy(x), inp.torch_out
        # half_to_float=False: the result has x's dtype, as softmax's.
        kernel = {"softmax": torch._softmax, "log_softmax": torch._log_softmax}[fn]
        return Row(
            impl,
            label,
            lambda: kernel(tx, dim, False, out=tout),
            nbytes,
            version=torch.__version__,
        )
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
    for dtype in DTYPES:
        for fn in FUNCTIONS:
            for shape, dim in (*SMOKE_CASES, *CASES):
                n = math.prod(shape)  # bench/conftest.py skips n > 1e5 in smoke runs
                for impl in IMPLS:
                    name = f"{fn}-{np.dtype(dtype)}-{shape_label(shape)}-dim{dim}"
                    cases.append(
                        pytest.param(
                            fn, shape, dtype, dim, n, impl, id=f"{name}-{impl}"
                        )
                    )
    return cases


@pytest.mark.parametrize(("fn", "shape", "dtype", "dim", "n", "impl"), _cases())
def test_softmax_cpu(
    benchmark: Any,
    host_inputs: Callable[[tuple[int, ...], type], HostInputs],
    exact: Callable[[str, tuple[int, ...], type, int], np.ndarray],
    fn: str,
    shape: tuple[int, ...],
    dtype: type,
    dim: int,
    n: int,
    impl: str,
) -> None:
    inp = host_inputs(shape, dtype)
    row = cpu_row(fn, impl, inp, dim)
    # The first call compiles the JIT kernels (seconds), so it must not be
    # timed; it doubles as the correctness check, so a wrong kernel is never
    # timed.
    result = row.fn()
    if row.check is not None:
        row.check(result)
    else:
        want = exact(fn, shape, dtype, dim)
        check_result(fn, want, result, impl, shape, dtype, dim)
    del result

    dtype_name = np.dtype(dtype).name
    benchmark.group = f"{fn} {dtype_name} {shape_label(shape)} dim={dim} cpu"
    benchmark.extra_info.update(
        bench="softmax",
        function=fn,
        impl=impl,
        label=row.label,
        device="cpu",
        shape=list(shape),
        dim=dim,
        n=n,
        dtype=dtype_name,
        peer=PEER.get(impl, "torch-out" if impl == "torch-out" else "torch"),
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    if row.version is not None:
        benchmark.extra_info["version"] = row.version
    time_row(benchmark, row.fn, row.nbytes)
