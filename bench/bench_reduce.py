"""softkern's full reductions (reduce=0/1/2) against NumPy, PyTorch and a copy.

``pytest bench/bench_reduce.py --benchmark-only`` times every row; a plain
``pytest`` (pyproject disables benchmarks) runs each row once at n <= 1e5 as a
smoke test. Each group is one op at one size on one device; every row checks
its result against float64 NumPy once, before it is timed.

``extra_info["bytes"]`` is what a row moves: a reduction reads its inputs, the
copy reads and writes. ``extra_info["gbps"]`` is bytes / the *minimum* round
time (the machine is shared, so noise only ever adds time).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _timing import gpu_skip_reason, time_row
from numba import cuda

import softkern as sk

DTYPE = np.float32
SUM_SIZES = (10**4, 10**5, 10**6, 10**7, 10**8)
# 1e5 is not a headline size: it is there so the smoke run checks amax and dot.
OTHER_SIZES = (10**5, 10**7, 10**8)
OPS = ("sum", "amax", "dot")
CPU_IMPLS = ("softkern-r0", "softkern-r1", "softkern-r2", "numpy", "torch", "copy")
GPU_IMPLS = ("softkern-r0", "softkern-r1", "softkern-r2", "cupy", "copy")
# Relative tolerance on sum(|terms|): loose enough for any float32 association
# order, tight enough that a lost block or a double count fails at n <= 1e5.
RTOL = 1e-5

BASELINE_NAME = {"sum": "np.sum", "amax": "np.max", "dot": "np.dot"}
TORCH_NAME = {"sum": "torch.sum", "amax": "torch.amax", "dot": "torch.dot"}
CUPY_NAME = {"sum": "cupy.sum", "amax": "cupy.max", "dot": "cupy.dot"}
SOFTKERN = {"sum": sk.sum, "amax": sk.amax, "dot": sk.dot}


GPU_SKIP = gpu_skip_reason()


def size_label(n: int) -> str:
    """1e4 rather than 1e+04 (sizes are powers of ten, or printed whole)."""
    exp = len(str(n)) - 1
    return f"1e{exp}" if n == 10**exp else str(n)


class HostInputs:
    """Fresh standard-normal float32 inputs of one size, and exact answers."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rng = np.random.default_rng()
        self.x = self.rng.standard_normal(n, dtype=DTYPE)
        self._exact: dict[str, tuple[float, float]] = {}

    @functools.cached_property
    def y(self) -> np.ndarray:
        return self.rng.standard_normal(self.n, dtype=DTYPE)

    @functools.cached_property
    def dst(self) -> np.ndarray:
        return np.empty_like(self.x)

    def exact(self, op: str) -> tuple[float, float]:
        """(float64 answer, scale for the tolerance), computed once per op."""
        if op not in self._exact:
            x = self.x.astype(np.float64)
            if op == "sum":
                self._exact[op] = float(x.sum()), float(np.abs(x).sum())
            elif op == "amax":
                self._exact[op] = float(x.max()), 0.0
            else:
                terms = x * self.y.astype(np.float64)
                self._exact[op] = float(terms.sum()), float(np.abs(terms).sum())
        return self._exact[op]


class GpuInputs:
    """Device copies of one HostInputs (the same values, so the same answers)."""

    def __init__(self, host: HostInputs) -> None:
        self.host = host
        self.x = cuda.to_device(host.x)

    @functools.cached_property
    def y(self) -> Any:
        return cuda.to_device(self.host.y)

    @functools.cached_property
    def dst(self) -> Any:
        return cuda.device_array_like(self.x)


@pytest.fixture(scope="module")
def host_inputs() -> Callable[[int], HostInputs]:
    """Inputs per size, drawn on first use and kept for the module: drawing
    1e8 normals takes longer than timing every row of a group."""
    return functools.cache(HostInputs)


@pytest.fixture(scope="module")
def gpu_inputs(
    host_inputs: Callable[[int], HostInputs],
) -> Callable[[int], GpuInputs]:
    return functools.cache(lambda n: GpuInputs(host_inputs(n)))


@dataclass
class Row:
    """One implementation in a group: what to time and how to judge it."""

    impl: str
    fn: Callable[[], Any]
    nbytes: int
    reference: bool = False
    # For a copy: the check compares the copied bytes instead of a number.
    check: Callable[[Any], None] | None = None


def _to_float(result: Any) -> float:
    if hasattr(result, "copy_to_host"):  # Numba device array
        result = result.copy_to_host()
    return float(result)


def check_value(op: str, inputs: HostInputs, result: Any, impl: str) -> None:
    got = _to_float(result)
    want, scale = inputs.exact(op)
    if op == "amax":
        assert got == want, f"{impl}: amax {got} != {want} (n={inputs.n})"
        return
    tol = RTOL * scale
    assert abs(got - want) <= tol, (
        f"{impl}: {op} = {got!r}, float64 NumPy says {want!r} "
        f"(|diff| {abs(got - want):.3g} > tol {tol:.3g}, n={inputs.n})"
    )


def cpu_row(op: str, impl: str, inp: HostInputs) -> Row:
    x = inp.x
    args = (x, inp.y) if op == "dot" else (x,)
    read = sum(a.nbytes for a in args)
    if impl.startswith("softkern-r"):
        strategy = int(impl[-1])
        fn = SOFTKERN[op]
        return Row(
            f"softkern reduce={strategy}", lambda: fn(*args, reduce=strategy), read
        )
    if impl == "numpy":
        base = {"sum": np.sum, "amax": np.max, "dot": np.dot}[op]
        return Row(BASELINE_NAME[op], lambda: base(*args), read, reference=True)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        # torch defaults to physical cores; use every core, as Numba does.
        torch.set_num_threads(os.cpu_count() or 1)
        targs = tuple(torch.from_numpy(a) for a in args)
        tfn = {"sum": torch.sum, "amax": torch.amax, "dot": torch.dot}[op]
        return Row(TORCH_NAME[op], lambda: tfn(*targs), read)
    assert impl == "copy"
    dst = inp.dst

    def check(_: Any) -> None:
        assert np.array_equal(dst, x), "np.copyto did not copy"

    return Row(
        "np.copyto (floor)", lambda: np.copyto(dst, x), 2 * x.nbytes, check=check
    )


def gpu_row(op: str, impl: str, inp: GpuInputs) -> Row:
    args = (inp.x, inp.y) if op == "dot" else (inp.x,)
    read = sum(a.nbytes for a in args)
    if impl.startswith("softkern-r"):
        strategy = int(impl[-1])
        fn = SOFTKERN[op]

        def run() -> Any:
            out = fn(*args, reduce=strategy)
            cuda.synchronize()
            return out

        return Row(f"softkern reduce={strategy}", run, read)
    if impl == "cupy":
        cp = pytest.importorskip("cupy")
        cargs = tuple(cp.asarray(a) for a in args)  # zero-copy views
        cfn = {"sum": cp.sum, "amax": cp.max, "dot": cp.dot}[op]

        def run_cupy() -> Any:
            out = cfn(*cargs)
            cp.cuda.Device().synchronize()
            return out

        return Row(CUPY_NAME[op], run_cupy, read)
    assert impl == "copy"
    src, dst = inp.x, inp.dst

    def copy() -> None:
        dst.copy_to_device(src)  # device to device: cudaMemcpy, no host trip
        cuda.synchronize()

    def check(_: Any) -> None:
        assert np.array_equal(dst.copy_to_host(), inp.host.x), "D2D copy failed"

    return Row("device copy (floor)", copy, 2 * src.nbytes, reference=True, check=check)


def run_row(
    benchmark: Any, row: Row, op: str, n: int, device: str, host: HostInputs
) -> None:
    # The first call compiles the JIT kernels (seconds), so it must not be
    # timed; it doubles as the correctness check.
    result = row.fn()
    if row.check is not None:
        row.check(result)
    else:
        check_value(op, host, result, row.impl)

    benchmark.group = f"{op} float32 n={size_label(n)} {device}"
    benchmark.extra_info.update(
        op=op,
        impl=row.impl,
        device=device,
        n=n,
        dtype=np.dtype(DTYPE).name,
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    time_row(benchmark, row.fn, row.nbytes)


def _cases(impls: tuple[str, ...]) -> list[Any]:
    cases = []
    for op in OPS:
        for n in SUM_SIZES if op == "sum" else OTHER_SIZES:
            for impl in impls:
                cases.append(
                    pytest.param(op, n, impl, id=f"{op}-{size_label(n)}-{impl}")
                )
    return cases


@pytest.mark.parametrize(("op", "n", "impl"), _cases(CPU_IMPLS))
def test_reduce_cpu(
    benchmark: Any,
    host_inputs: Callable[[int], HostInputs],
    op: str,
    n: int,
    impl: str,
) -> None:
    inp = host_inputs(n)
    run_row(benchmark, cpu_row(op, impl, inp), op, n, "cpu", inp)


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize(("op", "n", "impl"), _cases(GPU_IMPLS))
def test_reduce_gpu(
    benchmark: Any,
    gpu_inputs: Callable[[int], GpuInputs],
    op: str,
    n: int,
    impl: str,
) -> None:
    inp = gpu_inputs(n)
    run_row(benchmark, gpu_row(op, impl, inp), op, n, "gpu", inp.host)
