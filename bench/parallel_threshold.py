"""Where a parallel region starts to pay: serial and parallel CPU kernels
timed side by side over input sizes, for ``_launch.CPU_PARALLEL_MIN_BYTES``.

    python bench/parallel_threshold.py [--repeat 7] [--busy]

Each operation runs at float32 inputs of 16 KiB to 4 MiB with every kernel
forced onto the calling thread, then forced into a parallel region (the
limit set to infinity, then 0); the table shows the best time of each and
their ratio, and the size from which parallel wins for good. ``--busy``
repeats it while another process keeps one core busy.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import timeit
from collections.abc import Callable

import numpy as np

import softkern as sk
from softkern import _dispatch, _launch

KIB = 1024
SIZES = [16 * KIB * 2**k for k in range(9)]  # 16 KiB .. 4 MiB


def operations(nbytes: int) -> dict[str, Callable[[], object]]:
    rows = max(1, nbytes // 4 // 256)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 256), dtype=np.float32)
    c = x > 0
    t = rng.integers(0, 256, rows)
    return {
        "softmax (rows)": lambda: sk.softmax(x, 1),
        "softmax (columns)": lambda: sk.softmax(x, 0),
        "sum dim=1": lambda: sk.sum(x, 1),
        "cross_entropy": lambda: sk.cross_entropy(x, t),
        "sigmoid": lambda: sk.sigmoid(x),
        "where": lambda: sk.where(c, x, 0.0),
    }


def best(fn: Callable[[], object], repeat: int) -> float:
    fn()
    number = max(1, int(2e-3 / max(timeit.timeit(fn, number=1), 1e-7)))
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def timed(limit: float, nbytes: int, repeat: int) -> dict[str, float]:
    _launch.CPU_PARALLEL_MIN_BYTES = limit
    _launch.CPU_COPY_PARALLEL_MIN_BYTES = limit
    _dispatch.clear_plan_caches()
    return {name: best(fn, repeat) for name, fn in operations(nbytes).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--busy", action="store_true", help="one core kept busy")
    args = parser.parse_args()
    spinner = None
    if args.busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        names = list(operations(SIZES[0]))
        print("| op | " + " | ".join(f"{s // KIB} KiB" for s in SIZES) + " |")
        print("|---|" + "---:|" * len(SIZES))
        results = {name: [] for name in names}
        for nbytes in SIZES:
            serial = timed(math.inf, nbytes, args.repeat)
            parallel = timed(0, nbytes, args.repeat)
            for name in names:
                results[name].append((serial[name], parallel[name]))
        for name in names:
            cells = [f"{s * 1e6:.0f}/{p * 1e6:.0f} us" for s, p in results[name]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("\n(serial/parallel best time; parallel wins for good from:)")
        for name in names:
            wins = [p < s for s, p in results[name]]
            first = next((i for i in range(len(SIZES)) if all(wins[i:])), None)
            where = "never" if first is None else f"{SIZES[first] // KIB} KiB"
            print(f"  {name}: {where}")
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
