"""softkern's where and expand against NumPy, PyTorch and a copy.

``pytest bench/bench_broadcast.py --benchmark-only`` times every row; a plain
``pytest`` (pyproject disables benchmarks) runs each row once on the small
cases (<= 1e5 elements) as a smoke test. Each group is one call pattern on
the CPU: three of ``where`` (same-shape operands; a column condition against
row x and y; a Python scalar y) and three of ``expand`` (a column, a row, a
row into 3-D), each writing a 2**24-element float32 result; every row checks
its result against NumPy's, bit for bit, once, before it is timed.

Rows: ``softkern`` (``sk.where`` / ``sk.expand``: a fresh result array per
call), ``numpy`` (``np.where`` / ``np.broadcast_to(x, shape).copy()``: the
reference row), ``torch`` (``torch.where`` / ``x.expand(shape).contiguous()``
on ``torch.from_numpy`` views, all cores; skipped without PyTorch) and
``copy`` (``np.copyto`` into a preallocated array of the output's shape and
dtype: the memory floor for writing that output).

``extra_info["bytes"]`` is what a row must move at the least: the operands'
bytes, each read once, plus the output's (a broadcast operand is small, so
an expand moves little more than its output); the copy reads and writes the
output's bytes. ``extra_info["gbps"]`` is bytes / the *minimum* round time
(the machine is shared, so noise only ever adds time).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _timing import Row, time_row

import softkern as sk

DTYPE = np.float32
SEED = 20240917


@dataclass(frozen=True)
class Case:
    """One call pattern: ``where(c, x, y)`` with operands of `inputs` shapes
    (None for y: the Python scalar 0.0), or ``expand(x, out_shape)``."""

    name: str
    op: str
    inputs: tuple[tuple[int, ...] | None, ...]
    out_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    @property
    def call(self) -> str:
        """The call in words, for tables: ``where(c 4096x1, x 1x4096, ...)``."""
        if self.op == "expand":
            (shape,) = self.inputs
            return f"expand(x {shape_label(shape)}, {shape_label(self.out_shape)})"
        args = [
            "0.0" if shape is None else f"{arg} {shape_label(shape)}"
            for arg, shape in zip("cxy", self.inputs, strict=True)
        ]
        return f"where({', '.join(args)})"


def shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


N = M = 4096
# The headline cases: 2**24-element float32 results (64 MiB).
CASES = (
    Case("where-same", "where", ((N, M), (N, M), (N, M)), (N, M)),
    Case("where-col-row", "where", ((N, 1), (1, M), (1, M)), (N, M)),
    Case("where-scalar", "where", ((N, M), (N, M), None), (N, M)),
    Case("expand-col", "expand", ((N, 1),), (N, M)),
    Case("expand-row", "expand", ((1, M),), (N, M)),
    Case("expand-3d", "expand", ((1, 1, M),), (64, 64, M)),
)
# One small case per headline case (the same pattern, 98,304 <= 1e5 elements):
# the smoke run checks these; they are not headline sizes. The rows are not
# square, so a swapped dim shows, and the flat cases (same shape, scalar y)
# span two CPU work items of BroadcastPlan.chunk = 65,536 elements, the second
# one partial.
R, C = 96, 1024
SMOKE_CASES = (
    Case("where-same", "where", ((R, C), (R, C), (R, C)), (R, C)),
    Case("where-col-row", "where", ((R, 1), (1, C), (1, C)), (R, C)),
    Case("where-scalar", "where", ((R, C), (R, C), None), (R, C)),
    Case("expand-col", "expand", ((R, 1),), (R, C)),
    Case("expand-row", "expand", ((1, C),), (R, C)),
    Case("expand-3d", "expand", ((1, 1, C),), (8, 12, C)),
)
CASE_NAMES = tuple(case.name for case in CASES)
IMPLS = ("softkern", "numpy", "torch", "copy")
REFERENCE_IMPL = "numpy"

LABEL = {
    ("where", "softkern"): "sk.where",
    ("where", "numpy"): "np.where",
    ("where", "torch"): "torch.where",
    ("expand", "softkern"): "sk.expand",
    ("expand", "numpy"): "np.broadcast_to(x, shape).copy()",
    ("expand", "torch"): "x.expand(shape).contiguous()",
}
COPY_LABEL = "np.copyto (floor)"


class HostInputs:
    """A case's operands (seeded: the same values on every run; a condition
    about half true, standard-normal x and y, so never zeros), NumPy's answer
    and the copy row's arrays."""

    def __init__(self, case: Case) -> None:
        self.case = case
        seed = [SEED, CASE_NAMES.index(case.name), *case.out_shape]
        rng = np.random.default_rng(seed)
        if case.op == "where":
            cshape, xshape, yshape = case.inputs
            self.c = rng.random(cshape) < 0.5
            self.x = rng.standard_normal(xshape, dtype=DTYPE)
            self.y = 0.0 if yshape is None else rng.standard_normal(yshape, dtype=DTYPE)
            self.operands: tuple[Any, ...] = (self.c, self.x, self.y)
        else:
            (xshape,) = case.inputs
            self.x = rng.standard_normal(xshape, dtype=DTYPE)
            self.operands = (self.x,)

    @functools.cached_property
    def expected(self) -> np.ndarray:
        """NumPy's answer: the reference row's call, made once."""
        if self.case.op == "where":
            return np.where(self.c, self.x, self.y)
        return np.broadcast_to(self.x, self.case.out_shape).copy()

    @functools.cached_property
    def dst(self) -> np.ndarray:
        """The copy row's destination (its source is `expected`)."""
        return np.empty_like(self.expected)

    @property
    def nbytes(self) -> int:
        """Operands read once, the result written once."""
        read = sum(a.nbytes for a in self.operands if isinstance(a, np.ndarray))
        return read + self.case.n * np.dtype(DTYPE).itemsize


@pytest.fixture(scope="module")
def host_inputs() -> Callable[[Case], HostInputs]:
    """Inputs per case, drawn on first use. Rows of a case run one after
    another, so only the latest case's arrays (about 300 MB for the largest)
    are kept."""
    return functools.lru_cache(maxsize=1)(HostInputs)


def check_result(case: Case, want: np.ndarray, result: Any, impl: str) -> None:
    if hasattr(result, "numpy"):  # torch tensor
        result = result.numpy()
    got = np.asarray(result)
    where = f"{impl}: {case.call}"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert got.dtype == DTYPE, f"{where}: dtype {got.dtype}, expected float32"
    # Every row must materialise the result, not return a stride-0 view.
    assert got.flags.c_contiguous, f"{where}: result is not C-contiguous"
    bad = got != want
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {bad.size} elements differ from "
            f"NumPy's; first at {i}: got {got[i]!r}, want {want[i]!r}"
        )


def cpu_row(impl: str, inp: HostInputs) -> Row:
    case = inp.case
    if impl == "copy":
        src, dst = inp.expected, inp.dst

        def check(_: Any) -> None:
            assert np.array_equal(dst, src), "np.copyto did not copy"

        return Row(
            impl, COPY_LABEL, lambda: np.copyto(dst, src), 2 * src.nbytes, check=check
        )
    label = LABEL[case.op, impl]
    nbytes = inp.nbytes
    shape = case.out_shape
    if impl == "softkern":
        if case.op == "where":
            c, x, y = inp.operands
            return Row(impl, label, lambda: sk.where(c, x, y), nbytes)
        x = inp.x
        return Row(impl, label, lambda: sk.expand(x, shape), nbytes)
    if impl == "numpy":
        ref = impl == REFERENCE_IMPL
        if case.op == "where":
            c, x, y = inp.operands
            return Row(impl, label, lambda: np.where(c, x, y), nbytes, ref)
        x = inp.x
        return Row(impl, label, lambda: np.broadcast_to(x, shape).copy(), nbytes, ref)
    assert impl == "torch"
    torch = pytest.importorskip("torch")
    # torch defaults to physical cores; use every core, as Numba does.
    torch.set_num_threads(os.cpu_count() or 1)
    version = torch.__version__
    if case.op == "where":
        tc, tx, ty = (
            torch.from_numpy(a) if isinstance(a, np.ndarray) else a
            for a in inp.operands
        )
        return Row(
            impl, label, lambda: torch.where(tc, tx, ty), nbytes, version=version
        )
    tx = torch.from_numpy(inp.x)
    return Row(
        impl, label, lambda: tx.expand(shape).contiguous(), nbytes, version=version
    )


def _cases() -> list[Any]:
    cases = []
    for case in (*SMOKE_CASES, *CASES):
        # bench/conftest.py skips n > 1e5 in smoke runs
        for impl in IMPLS:
            cases.append(
                pytest.param(
                    case,
                    case.n,
                    impl,
                    id=f"{case.name}-{shape_label(case.out_shape)}-{impl}",
                )
            )
    return cases


@pytest.mark.parametrize(("case", "n", "impl"), _cases())
def test_broadcast_cpu(
    benchmark: Any,
    host_inputs: Callable[[Case], HostInputs],
    case: Case,
    n: int,
    impl: str,
) -> None:
    inp = host_inputs(case)
    row = cpu_row(impl, inp)
    # The first call compiles the JIT kernels (seconds), so it must not be
    # timed; it doubles as the correctness check, so a wrong kernel is never
    # timed.
    result = row.fn()
    if row.check is not None:
        row.check(result)
    else:
        check_result(case, inp.expected, result, impl)
    del result

    benchmark.group = f"{case.call} float32 cpu"
    benchmark.extra_info.update(
        bench="broadcast",
        op=case.op,
        case=case.name,
        call=case.call,
        impl=impl,
        label=row.label,
        device="cpu",
        shape=list(case.out_shape),
        inputs=[None if s is None else list(s) for s in case.inputs],
        n=n,
        dtype=np.dtype(DTYPE).name,
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    if row.version is not None:
        benchmark.extra_info["version"] = row.version
    time_row(benchmark, row.fn, row.nbytes)
