"""Test set-up: real GPU when there is one, Numba's CUDA simulator otherwise.

The simulator must be chosen before Numba is first imported, so this runs at
collection, before any test module imports softkern.
"""

from __future__ import annotations

import ctypes.util
import os
import secrets

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not ctypes.util.find_library("cuda"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # Every kernel the simulated suite runs is sanitized (racecheck,
    # initcheck, memcheck, synccheck: softkern.testing.sanitizer); its
    # block loop also yields the GIL, which made the GPU tests 5x faster.
    os.environ.setdefault("SOFTKERN_SANITIZE", "1")

import numpy as np
import pytest
from numba import config as numba_config
from numba import cuda

import softkern  # noqa: F401  (installs the warp emulation in the simulator)
from softkern import _dispatch, _dtypes, _launch

# Test files whose tests run GPU kernels (simulated without a GPU), or compile
# them all to PTX: marked so that `-m "not sim and not ptx"` skips them.
SIM_FILES = {
    "test_cudasim.py",
    "test_dtypes_gpu.py",
    "test_losses_gpu.py",
    "test_notebooks.py",  # each notebook ends with its kernels in the simulator
    "test_reduce_gpu.py",
    "test_sanitizer.py",
    "test_softmax_gpu.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        callspec = getattr(item, "callspec", None)
        on_gpu = callspec is not None and callspec.params.get("device") == "gpu"
        if name in SIM_FILES or on_gpu:
            item.add_marker(pytest.mark.sim)
        elif name == "test_ptx.py":
            item.add_marker(pytest.mark.ptx)
    # The tests that wait for the PTX compiles go last: every other test runs
    # while NVVM works (in alphabetical order they waited minutes mid-run).
    waiting = [item for item in items if _waits_for_ptx(item)]
    if waiting:
        items[:] = [item for item in items if not _waits_for_ptx(item)] + waiting


def _waits_for_ptx(item) -> bool:
    return item.path.name == "test_ptx.py" and "compiled" in item.fixturenames


def pytest_collection_finish(session):
    """Start compiling every kernel to PTX now (minutes of NVVM in two
    processes) if the PTX tests are to run, so it overlaps the other tests."""
    if any(_waits_for_ptx(item) for item in session.items):
        import test_ptx

        session.config.stash[test_ptx.PTX_JOBS] = test_ptx.start_compiles()


def pytest_sessionfinish(session):
    """Stop early-started compiles that no test waited for (a run cut short)."""
    import sys

    test_ptx = sys.modules.get("test_ptx")
    procs = test_ptx and session.config.stash.get(test_ptx.PTX_JOBS, None)
    for proc in (procs or {}).values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def pytest_report_header(config):
    if numba_config.ENABLE_CUDASIM:
        mode = "the CUDA simulator"
    elif cuda.is_available():
        mode = "a real GPU"
    else:
        mode = "nothing (no GPU found and NUMBA_ENABLE_CUDASIM=0): GPU tests fail"
    return f"softkern GPU kernels run on: {mode}"


@pytest.fixture
def rng(request):
    """A fresh generator per test; the seed is printed so a failure replays
    with SOFTKERN_SEED=<seed>."""
    seed = int(os.environ.get("SOFTKERN_SEED", secrets.randbits(32)))
    print(f"SOFTKERN_SEED={seed} ({request.node.nodeid})")
    return np.random.default_rng(seed)


@pytest.fixture
def small_grid(monkeypatch):
    """Cap the grid at 4 blocks so small arrays take several grid strides."""
    monkeypatch.setattr(_launch, "MAX_GRID", 4)


# the grid cap before any fixture lowers it
REAL_MAX_GRID = _launch.MAX_GRID


@pytest.fixture
def split_rows(monkeypatch, small_grid):  # after small_grid: its grid wins
    """The split regimes of softmax and the losses from rows of 256 elements
    in the simulator, at most 8 rows sharing a grid of 8 blocks; on a GPU
    the real limits (small_grid's 4 blocks would leave a row one segment)."""
    if numba_config.ENABLE_CUDASIM:
        monkeypatch.setattr(_launch, "SPLIT_MIN_SOFTMAX_ROW", 256)
        monkeypatch.setattr(_launch, "SPLIT_MIN_LOSS_ROW", 256)
        monkeypatch.setattr(_launch, "MAX_GRID", 8)
    else:
        monkeypatch.setattr(_launch, "MAX_GRID", REAL_MAX_GRID)


@pytest.fixture(autouse=True)
def fresh_plans():
    """Plans are cached per argument shape; tests change the limits in
    ``_launch`` that plans are made from, so each test starts afresh."""
    _dispatch.clear_plan_caches()
    yield
    _dispatch.clear_plan_caches()


def _sentinel(dtype: np.dtype):
    if _dtypes.is_float(dtype):
        return np.nan
    if dtype.kind == "b":
        return True  # half the values a test expects are False
    return np.iinfo(dtype).min + 7


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every output starts as NaN (or a sentinel integer), so a test that
    compares all elements also proves every element was written."""
    host_empty = _dispatch.host_empty
    gpu_empty = _dispatch.GpuCall.empty

    def filled_host(shape, dtype):
        arr = host_empty(shape, dtype)
        arr.fill(_sentinel(np.dtype(dtype)))
        return arr

    def filled_gpu(self, shape, dtype):
        native, view = gpu_empty(self, shape, dtype)
        dtype = np.dtype(dtype)
        filled = np.full(view.shape, _sentinel(dtype), dtype)
        view.copy_to_device(filled.view(view.dtype))  # bfloat16: as its bits
        return native, view

    monkeypatch.setattr(_dispatch, "host_empty", filled_host)
    monkeypatch.setattr(_dispatch.GpuCall, "empty", filled_gpu)
