"""How every benchmark row is timed (shared by bench_*.py).

A row runs once when benchmarks are disabled (the smoke run of a plain
``pytest``). Otherwise it gets about TARGET_S of rounds, at least
MIN_ROUNDS, each round long enough (ROUND_MIN_S, by repeating the call) that
the timer's own cost does not show; this keeps a full CPU run to a few
minutes on 2 cores. GB/s is computed from the minimum round time: on a
shared machine noise only ever adds time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from numba import config as numba_config
from numba import cuda


def gpu_skip_reason() -> str | None:
    """Why the GPU rows cannot run here, or None when a real GPU is present."""
    if numba_config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1: the simulator runs Python threads, not a GPU"
    if not cuda.is_available():
        return "no CUDA GPU"
    return None


TARGET_S = 0.5
MIN_ROUNDS = 5
MAX_ROUNDS = 500
ROUND_MIN_S = 100e-6


@dataclass
class Row:
    """One implementation in a group: what to time and how to judge it."""

    impl: str
    label: str
    fn: Callable[[], Any]
    nbytes: int
    reference: bool = False
    version: str | None = None
    # For a copy: the check compares the copied bytes instead of the answer.
    check: Callable[[Any], None] | None = None


def plan_rounds(fn: Callable[[], Any]) -> tuple[int, int]:
    """(rounds, iterations) for `fn`, from the best of three untimed calls."""
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    iterations = max(1, min(1000, math.ceil(ROUND_MIN_S / best)))
    rounds = math.ceil(TARGET_S / (best * iterations))
    return max(MIN_ROUNDS, min(MAX_ROUNDS, rounds)), iterations


def time_row(benchmark: Any, fn: Callable[[], Any], nbytes: int) -> None:
    """Time `fn` with pytest-benchmark and record GB/s = nbytes / min time."""
    if benchmark.disabled:
        benchmark(fn)  # runs once: the smoke run
    else:
        rounds, iterations = plan_rounds(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gbps"] = nbytes / stats.stats.min / 1e9
