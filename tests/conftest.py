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

import numpy as np
import pytest
from numba import config as numba_config
from numba import cuda

import softkern  # noqa: F401  (installs the warp emulation in the simulator)
from softkern import _launch
from softkern.ops import reduce as ops_reduce


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


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every output starts as NaN (or a sentinel integer), so a test that
    compares all elements also proves every element was written."""
    original = ops_reduce._Operand.empty

    def empty(self, shape, dtype):
        native, view = original(self, shape, dtype)
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            fill = np.nan
        elif dtype.kind == "b":
            fill = True  # half the values a test expects are False
        else:
            fill = np.iinfo(dtype).min + 7
        if isinstance(view, np.ndarray):
            view.fill(fill)
        else:
            view.copy_to_device(np.full(view.shape, fill, dtype))
        return native, view

    monkeypatch.setattr(ops_reduce._Operand, "empty", empty)
