"""The dispatcher: which device runs, and what comes back."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import to_gpu

import softkern as sk


def test_cpu_kinds():
    assert sk.device_of(np.ones(3)) == "cpu"
    assert sk.device_of(np.float32(1.0), 2, 3.5, True, [1, 2], (3,)) == "cpu"
    assert sk.device_of() == "cpu"
    assert isinstance(sk.sum([1.0, 2.0]), np.ndarray)
    assert float(sk.sum((1, 2, 3))) == 6


def test_gpu_kinds():
    d = to_gpu(np.ones(3, np.float32))
    assert sk.device_of(d) == "cuda"
    assert sk.device_of(d, 1.0, None) == "cuda"


def test_unsupported_and_mixed_types_name_what_is_accepted():
    with pytest.raises(TypeError, match="accepted: NumPy arrays"):
        sk.device_of(object())
    with pytest.raises(TypeError, match="accepted"):
        sk.device_of({1: 2})
    with pytest.raises(TypeError, match=r"ndarray on the CPU and .* on the GPU"):
        sk.device_of(np.ones(2), to_gpu(np.ones(2)))


def test_cupy_and_torch_are_never_imported_by_softkern():
    code = (
        "import sys, softkern, numpy as np; softkern.sum(np.ones(4)); "
        "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
