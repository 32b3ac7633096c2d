"""Helpers shared by the GPU tests (imported after conftest chose the device)."""

import numpy as np
from numba import config as numba_config
from numba import cuda

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
# The simulator runs a Python thread per CUDA thread: keep its blocks small.
GPU_BLOCKS = (32, 64) if SIMULATOR else (256, 1024)


def to_gpu(a: np.ndarray):
    return cuda.to_device(np.ascontiguousarray(a))


def to_host(a) -> np.ndarray:
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
