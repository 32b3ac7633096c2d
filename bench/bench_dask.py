"""softkern on Dask beyond one machine's memory, and against Dask's own
formulation of the same computations.

    python bench/bench_dask.py                      # 32 GiB scale run + comparison
    python bench/bench_dask.py --scale-gib 2 --compare-gib 1   # a quick look

On a ``distributed.LocalCluster`` of ``--workers`` processes of one thread
each, with ``--memory-limit`` per worker:

1. **Scale**: `cross_entropy` (class-index targets, mean) and `logsumexp`
   over dim 1 of a float32 logit matrix of ``--scale-gib`` GiB (default 32,
   more than this machine's 24 GiB), generated lazily chunk by chunk and
   never held whole: each chunk is a random tile drawn once per worker, row
   by row, each row shifted by a fresh random draw (``_uniform_logits``);
   the run's seeds come from the OS. Reported: time, GB/s of logits,
   and each worker's peak resident memory (``ru_maxrss`` of a worker
   restarted just before), in MiB and in chunks above the worker's idle size.
2. **Comparison** on ``--compare-gib`` GiB with the same chunks and cluster:
   softkern against what a Dask user writes without it, for logsumexp ``m +
   log(sum(exp(x - m)))`` with ``m = x.max(1, keepdims=True)``, and for
   cross-entropy that lse minus the target's logit (a per-chunk
   ``take_along_axis``, the cheapest gather Dask allows), meaned. Both on
   the lazily generated array (what the scale run does) and on an array
   persisted in the workers' memory first (only the computation is timed).
   Each time is the best of ``--repeat`` runs.

Writes ``--out``.json and .md (default bench/results/cpu-dask), and with
``--readme README.md`` the same tables between that file's
``<!-- bench:dask:start -->`` and ``<!-- bench:dask:end -->``;
``--from-json`` renders an earlier report instead of running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import secrets
import sys
import time
import types
from pathlib import Path

import numpy as np

try:
    import dask
    import dask.array as da
    import dask.distributed
except ImportError:  # the `dask` extra; plain pytest collects this file too
    if __name__ == "__main__":
        raise
    import pytest

    pytest.skip("dask and distributed are not installed", allow_module_level=True)

import softkern as sk

GIB = 1 << 30
MIB = 1 << 20


# Rows of the random tile each worker draws once and reuses.
TILE_ROWS = 256


def _random_tile(classes: int, seed: int) -> np.ndarray:
    """The run's (TILE_ROWS, classes) float32 tile, uniform in [-8, 8),
    drawn from `seed` once per worker process (every worker draws the same
    tile). Kept in a module of its own in sys.modules, which outlives tasks
    (this script's functions reach workers by value, their globals copied
    per task)."""
    cache = sys.modules.setdefault("_bench_dask_tiles", types.ModuleType("tiles"))
    name = f"tile_{classes}_{seed}"
    tile = getattr(cache, name, None)
    if tile is None:
        tile = np.random.default_rng(seed).random((TILE_ROWS, classes), np.float32)
        tile *= 16
        tile -= 8
        setattr(cache, name, tile)
    return tile


def _uniform_logits(block_shape, block_id, seed):
    """One chunk of logits: the worker's random tile, row after row, each
    row shifted by its own draw from the chunk's stream (uniform in [-4,
    4)): one write pass (NumPy draws uniform float32 at about 3 GB/s a
    core, normals at 0.5, either of which would be most of the time)."""
    rows, classes = block_shape
    tile = _random_tile(classes, seed)
    shifts = np.random.default_rng([seed, *block_id]).random((rows, 1), np.float32)
    shifts *= 8
    shifts -= 4
    out = np.empty(block_shape, np.float32)
    for r0 in range(0, rows, TILE_ROWS):
        r1 = min(rows, r0 + TILE_ROWS)
        np.add(tile[: r1 - r0], shifts[r0:r1], out=out[r0:r1])
    return out


def _make_chunk(block_info=None, *, seed):
    info = block_info[None]
    return _uniform_logits(info["chunk-shape"], info["chunk-location"], seed)


def _targets_chunk(block_info=None, *, seed, classes):
    info = block_info[None]
    rng = np.random.default_rng([seed, 7, *info["chunk-location"]])
    return rng.integers(0, classes, info["chunk-shape"])


def logits(gib: float, classes: int, chunk_mib: int, seed: int, class_chunks=1):
    """A lazily generated (rows, classes) float32 Dask array of `gib` GiB,
    in chunks of about `chunk_mib` MiB (whole rows, or rows split into
    `class_chunks` pieces), and its targets."""
    rows = int(gib * GIB) // (4 * classes)
    width = -(-classes // class_chunks)
    rows_per_chunk = max(1, chunk_mib * MIB // (4 * width))
    chunks = (
        (rows_per_chunk,) * (rows // rows_per_chunk),
        da.core.normalize_chunks(width, (classes,))[0],
    )
    if rows % rows_per_chunk:
        chunks = (chunks[0] + (rows % rows_per_chunk,), chunks[1])
    x = da.map_blocks(
        _make_chunk, seed=seed, chunks=chunks, dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
    )  # fmt: skip
    t = da.map_blocks(
        _targets_chunk, seed=seed, classes=classes, chunks=chunks[:1],
        dtype=np.int64, meta=np.empty(0, np.int64),
    )  # fmt: skip
    return x, t


def _take_target(x_block, t_block):
    return np.take_along_axis(x_block, t_block[:, None], 1)[:, 0]


def dask_logsumexp(x):
    """logsumexp over dim 1 as a Dask user writes it."""
    top = x.max(axis=1, keepdims=True)
    return top[:, 0] + da.log(da.exp(x - top).sum(axis=1))


def dask_cross_entropy(x, t):
    """Mean cross-entropy of class-index targets, written in Dask."""
    picked = da.blockwise(
        _take_target, "i", x, "ij", t, "i", concatenate=True, dtype=x.dtype
    )
    return (dask_logsumexp(x) - picked).mean()


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_worker():
    # load the kernels from Numba's cache, as the first task would
    x = np.random.default_rng().random((64, 128), dtype=np.float32)
    sk.cross_entropy(x, np.zeros(64, np.int64))
    sk.logsumexp(x, 1)
    return _peak_rss_mib()


def timed(client, build, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        client.compute(build()).result()
        best = min(best, time.perf_counter() - start)
    return best


def scale_run(client, args) -> list[dict]:
    seed = secrets.randbits(32)
    rows = []
    for name, class_chunks, build in (
        ("cross_entropy", 1, sk.cross_entropy),
        ("logsumexp", 1, lambda x, t: sk.logsumexp(x, 1).sum()),
        ("cross_entropy", 4, sk.cross_entropy),
    ):
        x, t = logits(args.scale_gib, args.classes, args.chunk_mib, seed, class_chunks)
        chunk_bytes = x.chunksize[0] * x.chunksize[1] * 4
        client.restart()
        idle = client.run(_warm_worker)
        start = time.perf_counter()
        value = float(client.compute(build(x, t)).result())
        seconds = time.perf_counter() - start
        peaks = client.run(_peak_rss_mib)
        rows.append(
            {
                "op": name,
                "class_chunks": class_chunks,
                "shape": list(x.shape),
                "chunk": list(x.chunksize),
                "chunks": x.npartitions,
                "gib": x.nbytes / GIB,
                "seconds": seconds,
                "gbps": x.nbytes / seconds / 1e9,
                "value": value,
                "peak_mib": sorted(peaks.values()),
                "idle_mib": sorted(idle.values()),
                "peak_chunks": max(
                    (peaks[w] - idle[w]) * MIB / chunk_bytes for w in peaks
                ),
            }
        )
        print(rows[-1], flush=True)
    return rows


def compare_run(client, args) -> list[dict]:
    x, t = logits(args.compare_gib, args.classes, args.chunk_mib, secrets.randbits(32))
    client.restart()
    client.run(_warm_worker)
    rows = []
    for where in ("generated", "persisted"):
        if where == "persisted":
            x, t = client.persist([x, t])
            client.wait_for_workers(args.workers)
            dask.distributed.wait([x, t])
        pairs = {
            "cross_entropy": (
                lambda x=x, t=t: sk.cross_entropy(x, t),
                lambda x=x, t=t: dask_cross_entropy(x, t),
            ),
            "logsumexp": (
                lambda x=x: sk.logsumexp(x, 1).sum(),
                lambda x=x: dask_logsumexp(x).sum(),
            ),
        }
        for name, (ours, theirs) in pairs.items():
            a = float(client.compute(ours()).result())
            b = float(client.compute(theirs()).result())
            assert abs(a - b) <= 1e-4 * abs(b), (name, a, b)
            mine = timed(client, ours, args.repeat)
            dasks = timed(client, theirs, args.repeat)
            rows.append(
                {
                    "op": name,
                    "input": where,
                    "shape": list(x.shape),
                    "chunk": list(x.chunksize),
                    "gib": x.nbytes / GIB,
                    "softkern_s": mine,
                    "dask_s": dasks,
                    "softkern_gbps": x.nbytes / mine / 1e9,
                    "dask_gbps": x.nbytes / dasks / 1e9,
                    "ratio": dasks / mine,
                }
            )
            print(rows[-1], flush=True)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} logical cores, "
        f"{m['memory_gib']:.0f} GiB; {report['cluster']}",
        f"- Date: {report['date']}",
        f"- {m['versions']}",
        f"- Command: `{report['command']}`",
        "- Logits: float32, generated lazily per chunk (a random tile per "
        "worker, uniform in [-8, 8), each row shifted by a fresh uniform "
        "draw in [-4, 4)); "
        "targets: class indices. GB/s = logit bytes / wall time. Peak: each "
        "worker's max resident memory during the run (restarted before it); "
        "chunks = (peak - idle) / chunk bytes, the largest over workers.",
        "",
        "| scale run | shape | chunk | GiB | s | GB/s | peak MiB per worker "
        "| peak in chunks |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in report["scale"]:
        lines.append(
            f"| {r['op']}{' (vocabulary-parallel)' if r['class_chunks'] > 1 else ''}"
            f" | {r['shape'][0]}x{r['shape'][1]} | "
            f"{r['chunk'][0]}x{r['chunk'][1]} | {r['gib']:.1f} | "
            f"{r['seconds']:.1f} | {r['gbps']:.2f} | "
            f"{', '.join(f'{p:.0f}' for p in r['peak_mib'])} | "
            f"{r['peak_chunks']:.1f} |"
        )
    lines += [
        "",
        "| vs Dask's formulation | input | GiB | softkern GB/s | Dask GB/s | "
        "Dask s / softkern s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["compare"]:
        lines.append(
            f"| {r['op']} | {r['input']} | {r['gib']:.1f} | "
            f"{r['softkern_gbps']:.2f} | {r['dask_gbps']:.2f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    versions = (
        f"CPython {platform.python_version()}; numba {numba.__version__}, "
        f"NumPy {np.__version__}, dask {dask.__version__}, "
        f"distributed {dask.distributed.__version__}"
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale-gib", type=float, default=32.0)
    parser.add_argument("--compare-gib", type=float, default=2.0)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--chunk-mib", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GiB")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="bench/results/cpu-dask")
    parser.add_argument(
        "--readme", help="also put the tables between the dask markers of this file"
    )
    parser.add_argument(
        "--from-json", help="render this earlier report instead of running"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        if args.readme:
            fill_readme(Path(args.readme), markdown(report))
        print(markdown(report))
        return report

    cluster_desc = (
        f"LocalCluster(n_workers={args.workers}, threads_per_worker=1, "
        f"processes=True, memory_limit={args.memory_limit!r})"
    )
    with (
        dask.distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.memory_limit,
            dashboard_address=None,
        ) as cluster,
        dask.distributed.Client(cluster) as client,
    ):
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "machine": machine(),
            "cluster": cluster_desc,
            "scale": scale_run(client, args) if args.scale_gib else [],
            "compare": compare_run(client, args) if args.compare_gib else [],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    if args.readme:
        fill_readme(Path(args.readme), markdown(report))
    print(markdown(report))
    return report


START, END = "<!-- bench:dask:start -->", "<!-- bench:dask:end -->"


def fill_readme(path: Path, tables: str) -> None:
    """Replace what lies between the dask markers of `path` with `tables`."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{tables}{END}{tail}")


def test_smoke(tmp_path):
    """A plain pytest runs the whole script on a few MiB: the scale run, the
    comparison (whose answers must agree) and both reports."""
    out = tmp_path / "dask"
    report = main(
        ["--scale-gib", "0.01", "--compare-gib", "0.01", "--classes", "512",
         "--chunk-mib", "1", "--repeat", "1", "--out", str(out)]
    )  # fmt: skip
    assert [r["op"] for r in report["scale"]] == [
        "cross_entropy", "logsumexp", "cross_entropy"
    ]  # fmt: skip
    assert all(r["gbps"] > 0 and r["peak_mib"] for r in report["scale"])
    assert len(report["compare"]) == 4
    assert "| vs Dask's formulation |" in out.with_suffix(".md").read_text()


if __name__ == "__main__":
    main()
