"""softkern's softmax family and cross-entropy on a real GPU, against
PyTorch's CUDA kernels, CuPy's formula and a device-to-device copy.

``pytest bench/bench_gpu.py --benchmark-only`` on a machine with a CUDA GPU
(``bench/gpu_check.sh`` runs it with the tests); without one, or under the
simulator, every row is skipped. Each group is one function on one float32
shape; every row checks its answer against float64 NumPy once, before it is
timed, and each timed call ends with a device synchronize.

Rows: ``softkern`` (Numba device arrays in and out), ``torch`` (CUDA tensors;
for the training step, ``F.cross_entropy`` forward and backward against
softkern's fused loss-and-gradient), ``cupy`` (the formula a CuPy user
writes: max, exp, sum, divide), and ``device copy (floor)``, the reference:
cudaMemcpy of the input, device to device. ``extra_info["bytes"]`` is what a
row must move at least: the input read, plus the output written where the
output has the input's size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _timing import Row, gpu_skip_reason, time_row
from numba import cuda

import softkern as sk

CASES = (
    ("softmax", (4096, 4096)),
    ("softmax", (256, 65536)),
    ("log_softmax", (4096, 4096)),
    ("logsumexp", (4096, 4096)),
    ("cross_entropy", (8192, 32768)),
    ("cross_entropy_and_grad", (8192, 32768)),
    ("cross_entropy", (8, 262144)),  # the split regime: few rows, many classes
    ("cross_entropy_and_grad", (8, 262144)),
)
IMPLS = ("softkern", "torch", "cupy", "copy")
RTOL = 2e-5


GPU_SKIP = gpu_skip_reason()


class Inputs:
    """Fresh logits (standard normal x 3) and class targets of one shape,
    on the host and on the device, and the float64 answers."""

    def __init__(self, shape: tuple[int, int]) -> None:
        rng = np.random.default_rng()
        self.x = (rng.standard_normal(shape, dtype=np.float32) * 3).astype(np.float32)
        self.t = rng.integers(0, shape[1], shape[0])
        self.dx = cuda.to_device(self.x)
        self.dt = cuda.to_device(self.t)

    @functools.cached_property
    def lse(self) -> np.ndarray:
        x = self.x.astype(np.float64)
        top = x.max(1, keepdims=True)
        return (np.log(np.exp(x - top).sum(1, keepdims=True)) + top)[:, 0]

    def expected(self, op: str) -> Any:
        x = self.x.astype(np.float64)
        if op == "softmax":
            return np.exp(x - self.lse[:, None])
        if op == "log_softmax":
            return x - self.lse[:, None]
        if op == "logsumexp":
            return self.lse
        loss = float(np.mean(self.lse - x[np.arange(len(self.t)), self.t]))
        if op == "cross_entropy":
            return loss
        grad = np.exp(x - self.lse[:, None])
        grad[np.arange(len(self.t)), self.t] -= 1
        return loss, grad / len(self.t)


@functools.cache
def inputs(shape: tuple[int, int]) -> Inputs:
    return Inputs(shape)


def _host(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_host(v) for v in value)
    if hasattr(value, "copy_to_host"):
        return value.copy_to_host()
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if hasattr(value, "get"):
        return value.get()
    return np.asarray(value)


def _nbytes(op: str, inp: Inputs) -> int:
    moved = inp.x.nbytes
    if op in ("softmax", "log_softmax", "cross_entropy_and_grad"):
        moved += inp.x.nbytes  # the output, the input's size
    if op.startswith("cross_entropy"):
        moved += inp.t.nbytes
    return moved


def _synced(fn: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        sync()
        return out

    return run


def softkern_row(op: str, inp: Inputs) -> Row:
    calls = {
        "softmax": lambda: sk.softmax(inp.dx, -1),
        "log_softmax": lambda: sk.log_softmax(inp.dx, -1),
        "logsumexp": lambda: sk.logsumexp(inp.dx, -1),
        "cross_entropy": lambda: sk.cross_entropy(inp.dx, inp.dt),
        "cross_entropy_and_grad": lambda: sk.cross_entropy_and_grad(inp.dx, inp.dt),
    }
    return Row("softkern", "softkern", _synced(calls[op], cuda.synchronize), 0)


def torch_row(op: str, inp: Inputs) -> Row:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    f = torch.nn.functional
    tx = torch.as_tensor(inp.dx, device="cuda")
    tt = torch.as_tensor(inp.dt, device="cuda")

    def step() -> Any:
        leaf = tx.detach().requires_grad_()
        loss = f.cross_entropy(leaf, tt)
        loss.backward()
        return loss, leaf.grad

    calls = {
        "softmax": lambda: torch.softmax(tx, -1),
        "log_softmax": lambda: torch.log_softmax(tx, -1),
        "logsumexp": lambda: torch.logsumexp(tx, -1),
        "cross_entropy": lambda: f.cross_entropy(tx, tt),
        "cross_entropy_and_grad": step,
    }
    return Row("torch", f"torch {op}", _synced(calls[op], torch.cuda.synchronize), 0)


def cupy_row(op: str, inp: Inputs) -> Row:
    cp = pytest.importorskip("cupy")
    cx, ct = cp.asarray(inp.dx), cp.asarray(inp.dt)
    rows = cp.arange(cx.shape[0])

    def lse() -> Any:
        top = cx.max(-1, keepdims=True)
        return cp.log(cp.exp(cx - top).sum(-1, keepdims=True)) + top

    def softmax() -> Any:
        e = cp.exp(cx - cx.max(-1, keepdims=True))
        e /= e.sum(-1, keepdims=True)
        return e

    def step() -> Any:
        total = lse()
        grad = cp.exp(cx - total)
        grad[rows, ct] -= 1
        grad /= cx.shape[0]
        return (total[:, 0] - cx[rows, ct]).mean(), grad

    calls = {
        "softmax": softmax,
        "log_softmax": lambda: cx - lse(),
        "logsumexp": lambda: lse()[:, 0],
        "cross_entropy": lambda: (lse()[:, 0] - cx[rows, ct]).mean(),
        "cross_entropy_and_grad": step,
    }
    sync = cp.cuda.Device().synchronize
    return Row("cupy", f"cupy formula ({op})", _synced(calls[op], sync), 0)


def copy_row(inp: Inputs) -> Row:
    dst = cuda.device_array_like(inp.dx)

    def copy() -> None:
        dst.copy_to_device(inp.dx)  # device to device: no host trip
        cuda.synchronize()

    def check(_: Any) -> None:
        assert np.array_equal(dst.copy_to_host(), inp.x), "D2D copy failed"

    return Row("copy", "device copy (floor)", copy, 0, reference=True, check=check)


def check(op: str, inp: Inputs, result: Any, label: str) -> None:
    got, want = _host(result), inp.expected(op)
    if op == "cross_entropy_and_grad":
        np.testing.assert_allclose(got[0], want[0], rtol=RTOL, err_msg=label)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-9, err_msg=label)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=label)


def _cases() -> list[Any]:
    return [
        pytest.param(op, shape, impl, id=f"{op}-{shape[0]}x{shape[1]}-{impl}")
        for op, shape in CASES
        for impl in IMPLS
    ]


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize(("op", "shape", "impl"), _cases())
def test_gpu(benchmark: Any, op: str, shape: tuple[int, int], impl: str) -> None:
    inp = inputs(shape)
    if impl == "copy":
        row = copy_row(inp)
        row.nbytes = 2 * inp.x.nbytes
    else:
        row = {"softkern": softkern_row, "torch": torch_row, "cupy": cupy_row}[impl](
            op, inp
        )
        row.nbytes = _nbytes(op, inp)
    result = row.fn()  # compiles (untimed) and is checked
    if row.check is not None:
        row.check(result)
    else:
        check(op, inp, result, row.label)
    benchmark.group = f"{op} float32 {shape[0]}x{shape[1]} gpu"
    benchmark.extra_info.update(
        op=op,
        impl=row.label,
        device="gpu",
        n=int(np.prod(shape)),
        dtype="float32",
        bytes=row.nbytes,
        reference=row.reference,
        gbps_from="min",
    )
    time_row(benchmark, row.fn, row.nbytes)
