"""`python -m softkern`, the tour, runs and checks itself."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_main_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "softkern", "--size", "200000"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "softkern" in text and ("CPU" in text or "GPU" in text)
    assert "all examples agree with NumPy" in text
    for strategy in ("0", "1", "2"):
        assert any(line.split()[:1] == [strategy] for line in text.splitlines())
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        assert "simulator" in text and "gpu: sum(x)" in text


def test_warmup_compiles_into_the_cache_and_reports(tmp_path):
    # After the first run (CI's README command), this one finds every kernel
    # in Numba's cache; either way it must finish and say where the cache is.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "softkern", "warmup", "--jobs", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "softkern warmup:" in out.stdout and "calls" in out.stdout
    assert "Numba cache:" in out.stdout and "threading layer:" in out.stdout
    assert "100%" in out.stderr  # tqdm's bar went all the way
