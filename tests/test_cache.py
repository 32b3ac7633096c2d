"""Numba's on-disk cache: every CPU kernel compiles at most once per machine.

Each test runs fresh Python processes over ``softkern.warmup.catalogue()``
(one call per public function, kernel regime and supported dtype) and
counts Numba's compilations there (``numba:compile`` events; a kernel
loaded from the cache raises none). The first process may compile what the
cache lacks (nothing, after ``python -m softkern warmup``); a second one
must compile nothing, and a third must leave the cache's file count as it
was. Kernels built in factories that close over other dispatchers failed
exactly this: their cache key changed in every process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "softkern"

# Runs the catalogue (or the calls labelled as argv[1:]) and prints what it
# compiled and where Numba keeps the kernels.
SCRIPT = """
import json, os, sys
from softkern import warmup
calls = [c for c in warmup.catalogue() if len(sys.argv) == 1 or c.label in sys.argv]
summary = warmup.warmup(calls, progress=False, jobs=int(os.environ["JOBS"]))
print(json.dumps({"calls": summary.calls, "compiled": summary.compiled,
                  "cache_dir": summary.cache_dir}))
"""


def run_catalogue(env: dict[str, str], *labels: str, cwd: Path = ROOT) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *labels],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc"))


def base_env(**changes: str) -> dict[str, str]:
    env = dict(os.environ, **changes)
    env.pop("NUMBA_DISABLE_CACHE", None)
    return env


def softkern_cache(cache_dir: str) -> Path:
    """The folder holding every softkern kernel's cache files: the package
    itself (a __pycache__ beside each module), or the folder Numba gives it
    under NUMBA_CACHE_DIR or the user cache folder (one per module folder)."""
    path = Path(cache_dir)
    return PACKAGE if path.name == "__pycache__" else path.parent


def test_catalogue_calls_every_function_once_per_label():
    import softkern
    from softkern import warmup

    calls = warmup.catalogue()
    assert len({c.label for c in calls}) == len(calls)  # workers find calls by label
    kernels = {n for n in softkern.__all__ if callable(getattr(softkern, n))}
    not_kernels = {"broadcast_shapes", "device_of", "softmax_plan"}
    assert {c.op for c in calls} == kernels - not_kernels
    assert set(warmup.FAMILY) == {c.op for c in calls}


def test_every_kernel_compiles_once_per_machine():
    # the first run in two processes at once, as `python -m softkern warmup`
    env = base_env(PYTHONPATH=str(ROOT), JOBS="2")
    first = run_catalogue(env)
    env["JOBS"] = "1"
    from softkern import warmup

    assert first["calls"] == len(warmup.catalogue())
    cache = softkern_cache(first["cache_dir"])
    second = run_catalogue(env)
    assert second["compiled"] == 0, "a second process compiled kernels again"
    files = cache_files(cache)
    assert files > 0
    third = run_catalogue(env)
    assert third["compiled"] == 0
    assert cache_files(cache) == files


def read_only_copy(tmp_path: Path) -> Path:
    """The package copied where nothing can be written beside its modules:
    read-only folders, and a file in place of every __pycache__ folder (so
    that even root, whom permissions do not stop, cannot create one)."""
    target = tmp_path / "site" / "softkern"
    shutil.copytree(
        PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]")
    )
    for folder in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        (folder / "__pycache__").write_text("not a folder\n")
    for path in [target, *target.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return target.parent


# A few calls keep these cold runs short: a full sum and a softmax.
FEW = ("sum(x) float32", "softmax(x, dim=1) float32 (rows)")


@pytest.mark.parametrize("where", ["NUMBA_CACHE_DIR", "user cache folder"])
def test_cache_works_when_the_package_is_read_only(tmp_path, where):
    site = read_only_copy(tmp_path)
    env = base_env(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "xdg"), JOBS="1")
    env.pop("NUMBA_CACHE_DIR", None)
    if where == "NUMBA_CACHE_DIR":
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
        expected = tmp_path / "numba-cache"
    else:
        expected = tmp_path / "xdg" / "numba"
    try:
        first = run_catalogue(env, *FEW, cwd=tmp_path)
        assert first["calls"] == len(FEW)
        assert first["compiled"] > 0  # a new copy of the package: cold
        assert Path(first["cache_dir"]).is_relative_to(expected)
        second = run_catalogue(env, *FEW, cwd=tmp_path)
        assert second["compiled"] == 0
        assert cache_files(expected) > 0
        assert not list(site.rglob("*.nbi"))  # nothing written beside the code
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(0o755)
