"""Benchmark set-up: full timings on request, a quick smoke run otherwise.

pyproject's addopts pass ``--benchmark-disable``, so a plain ``pytest`` runs
each benchmark body once; here that also skips the large sizes. Numba is not
imported at module level: ``tests/conftest.py`` may still have to choose the
CUDA simulator, which only works before Numba's first import.
"""

from __future__ import annotations

import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# `pytest bench/` (not `python -m pytest`) does not put the checkout on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Largest size a smoke run touches: enough to cross several blocks and a
# grid-stride step, small enough that the bench/ smoke run takes seconds.
SMOKE_MAX_N = 10**5
SMOKE_MAX_LABEL = "1e5"


def benchmarks_disabled(config: pytest.Config) -> bool:
    """The same rule pytest-benchmark applies to its own options."""
    return bool(config.getoption("benchmark_disable", False)) and not bool(
        config.getoption("benchmark_enable", False)
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark rejects --benchmark-only next to the --benchmark-disable
    # that pyproject adds to every run; asking for --benchmark-only is the
    # clearer intent, so it wins. Runs before the plugin's (trylast) configure.
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not benchmarks_disabled(config):
        return
    skip = pytest.mark.skip(
        reason=f"smoke run (benchmarks disabled): n > {SMOKE_MAX_LABEL} only "
        "runs with --benchmark-only or --benchmark-enable"
    )
    for item in items:
        if not Path(str(item.path)).is_relative_to(BENCH_DIR):
            continue
        callspec = getattr(item, "callspec", None)
        n = callspec.params.get("n") if callspec is not None else None
        if isinstance(n, int) and n > SMOKE_MAX_N:
            item.add_marker(skip)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    # Numba is imported by now (the benchmark module needs it).
    import numba
    from numba import config as numba_config

    versions = {
        d: _version(d) for d in ("numba", "numba-cuda", "numpy", "torch", "cupy")
    }
    machine_info["softkern"] = {
        "versions": {k: v for k, v in versions.items() if v},
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "cuda_simulator": bool(numba_config.ENABLE_CUDASIM),
        "gpu": _gpu_name(),
    }


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not started"


def _gpu_name() -> str | None:
    from numba import config as numba_config
    from numba import cuda

    if numba_config.ENABLE_CUDASIM or not cuda.is_available():
        return None
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict[str, Any]
) -> None:
    # The exact command, so a table can say how to reproduce it.
    args = shlex.join(config.invocation_params.args)
    output_json["command"] = f"python -m pytest {args}".rstrip()
    output_json["cwd"] = str(config.invocation_params.dir)
