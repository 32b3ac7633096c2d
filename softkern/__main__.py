"""The tour, ``python -m softkern``, and ``python -m softkern warmup``.

The tour prints the device it found, runs every operation on a small example
and checks it against NumPy in float64, then times reduce=0/1/2 side by side
on that device. ``--size`` sets the element count of the timing run.

``warmup`` compiles every CPU kernel for every supported dtype into Numba's
on-disk cache (minutes, once per machine and softkern version), so that no
later process waits for a compiler; see ``softkern.warmup``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
from numba import config as numba_config
from numba import cuda

import softkern as sk
from softkern import _launch


def describe_device() -> tuple[str, bool]:
    """A line naming the device, and whether the GPU kernels run on real hardware."""
    if numba_config.ENABLE_CUDASIM:
        return (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
            "cores); GPU kernels run in Numba's CUDA simulator "
            "(NUMBA_ENABLE_CUDASIM=1), warp intrinsics emulated",
            False,
        )
    if cuda.is_available():
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        cc = ".".join(map(str, dev.compute_capability))
        return f"GPU {name} (compute capability {cc})", True
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        "cores); no CUDA GPU found, simulator off",
        False,
    )


def check_examples(on_gpu: bool, block: int | None) -> list[tuple[str, bool, str]]:
    """Run each operation on a small random example on every device we have."""
    rng = np.random.default_rng()
    x = rng.standard_normal((7, 45)).astype(np.float32)
    y = rng.standard_normal(45).astype(np.float32)
    x64 = x.astype(np.float64)
    e1 = np.exp(x64 - x64.max(1, keepdims=True))
    e0 = np.exp(x64 - x64.max(0, keepdims=True))
    cases = [
        ("sum(x)", lambda m: sk.sum(m(x), block=block), x64.sum()),
        ("sum(x, dim=1)", lambda m: sk.sum(m(x), 1, block=block), x64.sum(1)),
        ("sum(x, dim=0)", lambda m: sk.sum(m(x), 0, block=block), x64.sum(0)),
        ("amax(x, dim=1)", lambda m: sk.amax(m(x), 1, block=block), x64.max(1)),
        ("amin(x)", lambda m: sk.amin(m(x), block=block), x64.min()),
        ("dot(x[0], y)", lambda m: sk.dot(m(x[0]), m(y), block=block), x64[0] @ y),
        (
            "softmax(x, dim=1)",
            lambda m: sk.softmax(m(x), 1, block=block),
            e1 / e1.sum(1, keepdims=True),
        ),
        (
            "log_softmax(x, dim=0)",
            lambda m: sk.log_softmax(m(x), 0, block=block),
            np.log(e0 / e0.sum(0, keepdims=True)),
        ),
        (
            "logsumexp(x, dim=1)",
            lambda m: sk.logsumexp(m(x), 1, block=block),
            np.log(np.exp(x64).sum(1)),
        ),
    ]
    col = rng.standard_normal((7, 1)).astype(np.float32)
    cond = x > 0
    cases += [
        (
            "expand(x[:, :1], 3, 7, 45)",
            lambda m: sk.expand(m(col), 3, 7, 45, block=block),
            np.broadcast_to(col.astype(np.float64), (3, 7, 45)),
        ),
        (
            "where(x > 0, x, y)",
            lambda m: sk.where(m(cond), m(x), m(y), block=block),
            np.where(cond, x64, y.astype(np.float64)),
        ),
    ]
    target = rng.integers(0, x.shape[1], x.shape[0])
    lse = np.log(np.exp(x64).sum(1))
    picked = x64[np.arange(x.shape[0]), target]
    onehot = np.eye(x.shape[1])[target]
    cases += [
        (
            "cross_entropy(x, target)",
            lambda m: sk.cross_entropy(m(x), m(target), block=block),
            np.mean(lse - picked),
        ),
        (
            "cross_entropy(x, target, label_smoothing=0.1, reduction='sum')",
            lambda m: sk.cross_entropy(
                m(x), m(target), reduction="sum", label_smoothing=0.1, block=block
            ),
            np.sum(0.9 * (lse - picked) + 0.1 * np.mean(lse[:, None] - x64, 1)),
        ),
        (
            "nll_loss(log_softmax(x, 1), target, reduction='none')",
            lambda m: sk.nll_loss(
                sk.log_softmax(m(x), 1, block=block),
                m(target),
                reduction="none",
                block=block,
            ),
            lse - picked,
        ),
        (
            "cross_entropy_backward(x, target)",
            lambda m: sk.cross_entropy_backward(m(x), m(target), block=block),
            (e1 / e1.sum(1, keepdims=True) - onehot) / x.shape[0],
        ),
        ("sigmoid(x)", lambda m: sk.sigmoid(m(x), block=block), 1 / (1 + np.exp(-x64))),
        (
            "logsigmoid(x)",
            lambda m: sk.logsigmoid(m(x), block=block),
            -np.log1p(np.exp(-x64)),
        ),
    ]
    devices = [("cpu", np.ascontiguousarray)]
    if on_gpu or numba_config.ENABLE_CUDASIM:
        devices.append(("gpu", cuda.to_device))
    results = []
    for dev, move in devices:
        for name, run, ref in cases:
            got = run(move)
            got = got.copy_to_host() if hasattr(got, "copy_to_host") else got
            ok = bool(np.allclose(got, ref, rtol=2e-6, atol=1e-5))
            err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
            results.append((f"{dev}: {name}", ok, f"max abs error {err:.1e}"))
    return results


def time_strategies(size: int, on_gpu: bool, repeat: int = 5) -> list[tuple]:
    """Best-of-`repeat` time of a full float32 sum for reduce=0/1/2."""
    x = np.random.default_rng().standard_normal(size).astype(np.float32)
    if on_gpu:
        data = cuda.to_device(x)

        def run(r):
            sk.sum(data, reduce=r)
            cuda.synchronize()
    else:
        data = x

        def run(r):
            sk.sum(data, reduce=r)

    rows = []
    for r in _launch.STRATEGIES:
        run(r)  # compile
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            run(r)
            best = min(best, time.perf_counter() - start)
        rows.append((r, best * 1e3, x.nbytes / best / 1e9))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m softkern",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("tour", "warmup"),
        default="tour",
        help="tour (the default) or warmup",
    )
    parser.add_argument("--size", type=int, default=None, help="elements to time")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="warmup: processes compiling at once (default: one per core)",
    )
    args = parser.parse_args(argv)
    if args.command == "warmup":
        from softkern import warmup

        return warmup.main(args.jobs)

    line, on_gpu = describe_device()
    print(f"softkern {sk.__version__} on {line}\n")
    # The simulator runs each GPU thread as a Python thread: small blocks only.
    block = 32 if numba_config.ENABLE_CUDASIM else None
    results = check_examples(on_gpu, block)
    width = max(len(name) for name, _, _ in results)
    for name, ok, note in results:
        print(f"  {name:<{width}}  {'ok  ' if ok else 'FAIL'}  {note}")
    failed = [name for name, ok, _ in results if not ok]

    size = args.size or (1 << 26 if on_gpu else 10_000_000)
    where = "GPU" if on_gpu else "CPU"
    print(f"\nfloat32 sum of {size:,} elements on the {where}, best of 5:")
    print(f"  {'reduce':>6}  {'time (ms)':>10}  {'GB/s':>8}")
    for r, ms, gbs in time_strategies(size, on_gpu):
        print(f"  {r:>6}  {ms:>10.3f}  {gbs:>8.1f}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    print("\nall examples agree with NumPy (float64)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
