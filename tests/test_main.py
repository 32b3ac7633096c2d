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
