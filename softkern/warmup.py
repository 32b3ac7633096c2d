"""Compile every CPU kernel ahead of use: ``python -m softkern warmup``.

Numba compiles a kernel the first time it meets a new combination of
argument types (dtype, number of dims, contiguous or strided, writeable or
read-only) and keeps the machine code in its on-disk cache, so each
combination costs a few seconds once per machine and milliseconds to load
in every later process. ``catalogue()`` lists one small call per public
operation, kernel regime and supported dtype, on C-contiguous arrays and,
in float32 and float64, on strided views too (not for the losses, whose
logits are rarely strided); ``warmup()`` runs them all, in one process per
core when asked, so that the calls a program makes afterwards find their
kernels in the cache.

The same catalogue serves the tests (every call compiles nothing in a second
process; eight threads running it at once get the single-threaded results)
and ``bench/first_call.py`` (what a cold and a warm first call cost).
Arrays are drawn at random, seeded, so every run is the same.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba.core import event

import softkern as sk
from softkern import _dtypes
from softkern.ops import broadcast as broadcast_ops

FLOATS = ("float32", "float64", "float16", "bfloat16")
# bool is summed as uint8's kernels; float16 as float32's (a copy).
REDUCE = ("float32", "float64", "int32", "int64", "bfloat16", "int8", "uint8", "int16")
# expand and where copy every real dtype and bool (ops.broadcast.DTYPES).
BROADCAST = tuple(sorted(d.name for d in broadcast_ops.DTYPES))
# Strided views (another compiled variant) are warmed for these dtypes; the
# others compile on their first strided call.
STRIDED = ("float32", "float64")


@dataclass(frozen=True)
class Call:
    """One call of a public function: `op` the function's name, `label` the
    call in words (with its dtype; unique in the catalogue), `run` makes it."""

    op: str
    label: str
    run: Callable[[], Any]

    @property
    def family(self) -> str:
        return FAMILY[self.op]


# The module of softkern.cpu whose kernels each public function compiles.
# Parallel warmup workers split the catalogue by it, so that no two processes
# compile one kernel, or one of its cached helpers, with different argument
# types at once: Numba's cache keeps one index file per kernel, and two
# processes adding entries to it at once could lose one, or pair one with
# the other's code. (Across families they share only simd_exp's exp32 and
# exp64, one signature each: the same entry, written twice.)
FAMILY = {
    "sum": "reduce",
    "amax": "reduce",
    "amin": "reduce",
    "dot": "reduce",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "logsumexp": "softmax",
    "softmax_backward": "softmax",
    "log_softmax_backward": "softmax",
    "gumbel_softmax": "softmax",  # softmax's kernels, then the one-hot
    "cross_entropy": "losses",
    "cross_entropy_backward": "losses",
    "cross_entropy_and_grad": "losses",
    "nll_loss": "losses",
    "sigmoid": "activations",
    "logsigmoid": "activations",
    "expand": "broadcast",
    "where": "broadcast",
}
# Seconds a cold call of each family took to compile on the 2-core CI
# machine, one process alone (reduce 178 s for 52 calls; the others 175 s
# together), to share the families out evenly among workers.
COST = {
    "reduce": 3.4,
    "softmax": 1.05,
    "losses": 2.2,
    "activations": 0.7,
    "broadcast": 0.8,
}


def _data(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == _dtypes.BFLOAT16:
        return rng.standard_normal(shape).astype(np.float32).astype(_dtypes.bfloat16())
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _available(dtypes: Iterable[str]) -> Iterator[str]:
    """`dtypes` less bfloat16 where ml_dtypes is not installed."""
    for dtype in dtypes:
        if dtype != _dtypes.BFLOAT16 or importlib.util.find_spec("ml_dtypes"):
            yield dtype


def _layouts(dtype: str, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """x itself, and for the STRIDED dtypes a strided view of the same shape
    (every other column of an array twice as wide)."""
    yield "", x
    if dtype in STRIDED:
        wide = np.repeat(x, 2, axis=-1)
        yield " strided", wide[..., ::2]


def _reductions() -> Iterator[Call]:
    for dtype in _available(REDUCE):
        x = _data(dtype, (6, 40), 1)
        for op in ("sum", "amax", "amin"):
            fn = getattr(sk, op)
            yield Call(op, f"{op}(x) {dtype}", lambda fn=fn, x=x: fn(x))
            for layout, v in _layouts(dtype, x):
                for dim, regime in ((1, "rows"), (0, "columns")):
                    yield Call(
                        op,
                        f"{op}(x, dim={dim}) {dtype}{layout} ({regime})",
                        lambda fn=fn, v=v, dim=dim: fn(v, dim),
                    )
    for dtype in ("float32", "float64"):
        x = _data(dtype, (2, 300), 2)
        for layout, v in _layouts(dtype, x):
            yield Call("dot", f"dot {dtype}{layout}", lambda v=v: sk.dot(v[0], v[1]))


def _softmax_family() -> Iterator[Call]:
    for dtype in _available(FLOATS):
        x = _data(dtype, (6, 40), 3)
        for layout, v in _layouts(dtype, x):
            for op in ("softmax", "log_softmax"):
                fn = getattr(sk, op)
                for dim, regime in ((1, "rows"), (0, "columns")):
                    yield Call(
                        op,
                        f"{op}(x, dim={dim}) {dtype}{layout} ({regime})",
                        lambda fn=fn, v=v, dim=dim: fn(v, dim),
                    )
            for dim, regime in ((1, "rows"), (0, "columns")):
                yield Call(
                    "logsumexp",
                    f"logsumexp(x, dim={dim}) {dtype}{layout} ({regime})",
                    lambda v=v, dim=dim: sk.logsumexp(v, dim),
                )
                for op in ("softmax_backward", "log_softmax_backward"):
                    fn = getattr(sk, op)
                    yield Call(
                        op,
                        f"{op}(g, y, dim={dim}) {dtype}{layout} ({regime})",
                        lambda fn=fn, v=v, dim=dim: fn(v, v, dim),
                    )
    ints = _data("int64", (6, 40), 4)
    yield Call(
        "softmax",
        "softmax(x, dim=1, dtype=float32) int64",
        lambda: sk.softmax(ints, 1, dtype=np.float32),
    )
    yield Call("logsumexp", "logsumexp(x, dim=1) int64", lambda: sk.logsumexp(ints, 1))
    for acc in ("float32", "float64"):  # the compute types
        yield Call(
            "softmax",
            f"softmax over a dim split into Dask chunks (second pass) {acc}",
            lambda acc=acc: _split_softmax_pass(_data(acc, (6, 40, 1), 3)),
        )
        for shape in ((6, 40), (6, 40, 3)):  # rows, columns
            yield Call(
                "logsumexp",
                f"float64 logsumexp of a Dask class chunk {acc} {len(shape)}-d",
                lambda acc=acc, shape=shape: _chunk_logsumexp(_data(acc, shape, 5)),
            )


def _split_softmax_pass(x: np.ndarray) -> np.ndarray:
    """The pass softkern._dask runs after merging a split dim's statistics
    (the kernel itself: Dask is optional)."""
    from softkern.cpu import softmax as cpu_softmax

    lse = np.log(np.exp(x).sum(1))
    out = np.empty_like(x)
    cpu_softmax.from_logsumexp(x, lse, out, False, False)
    return out


def _chunk_logsumexp(x: np.ndarray) -> np.ndarray:
    """The float64 log-sum-exp of a class chunk that softkern._dask's
    vocabulary-parallel losses merge."""
    from softkern.ops.softmax import logsumexp_float64

    return logsumexp_float64(x, 1)


def _losses() -> Iterator[Call]:
    rng = np.random.default_rng(5)
    for dtype in _available(FLOATS):
        x2 = _data(dtype, (6, 40), 6)
        x3 = _data(dtype, (3, 10, 4), 7)
        cases = (("(N, C)", x2), ("(N, C, d)", x3))
        for shape, x in cases:
            classes = x.shape[1]
            index = rng.integers(0, classes, x.shape[:1] + x.shape[2:])
            probs = _data(dtype, x.shape, 8) ** 2
            probs = probs / probs.sum(1, keepdims=True)
            probs = probs.astype(_dtypes.dtype_named(dtype))
            # Strided logits are rare: they compile on first use.
            for layout, v in (("", x),):
                label = f"{shape} {dtype}{layout}"
                yield Call(
                    "cross_entropy",
                    f"cross_entropy {label} index",
                    lambda v=v, t=index: sk.cross_entropy(v, t),
                )
                yield Call(
                    "cross_entropy",
                    f"cross_entropy {label} probabilities",
                    lambda v=v, q=probs: sk.cross_entropy(v, q),
                )
                yield Call(
                    "cross_entropy_backward",
                    f"cross_entropy_backward {label} index",
                    lambda v=v, t=index: sk.cross_entropy_backward(v, t),
                )
                yield Call(
                    "cross_entropy_backward",
                    f"cross_entropy_backward {label} probabilities",
                    lambda v=v, q=probs: sk.cross_entropy_backward(v, q),
                )
                yield Call(
                    "cross_entropy_and_grad",
                    f"cross_entropy_and_grad {label} index",
                    lambda v=v, t=index: sk.cross_entropy_and_grad(v, t),
                )
                yield Call(
                    "nll_loss",
                    f"nll_loss {label}",
                    lambda v=v, t=index: sk.nll_loss(v, t),
                )


def _activations() -> Iterator[Call]:
    for dtype in ("float32", "float64"):
        x = _data(dtype, (6, 40), 9)
        for op in ("sigmoid", "logsigmoid"):
            fn = getattr(sk, op)
            yield Call(op, f"{op} {dtype}", lambda fn=fn, x=x: fn(x))
        yield Call(
            "gumbel_softmax",
            f"gumbel_softmax hard {dtype}",
            lambda x=x: sk.gumbel_softmax(x, hard=True, seed=0),
        )


def _broadcasting() -> Iterator[Call]:
    condition = _data("bool", (6, 40), 10)
    column = _data("bool", (6, 1), 11)
    for dtype in BROADCAST:
        x = _data(dtype, (6, 40), 12)
        y = _data(dtype, (6, 40), 13)
        row = _data(dtype, (1, 40), 14)
        scalar = x.flat[0].item()  # a Python scalar of the kind
        yield Call("expand", f"expand (copy) {dtype}", lambda x=x: sk.expand(x, 6, 40))
        yield Call(
            "expand", f"expand (broadcast) {dtype}", lambda r=row: sk.expand(r, 6, 40)
        )
        yield Call(
            "where", f"where arrays {dtype}", lambda x=x, y=y: sk.where(condition, x, y)
        )
        yield Call(
            "where",
            f"where scalar {dtype}",
            lambda x=x, s=scalar: sk.where(condition, x, s),
        )
        yield Call(
            "where",
            f"where broadcast {dtype}",
            lambda r=row, y=y: sk.where(column, r, y),
        )


def catalogue() -> list[Call]:
    """Every call the warmup makes, in a fixed order."""
    return [
        *_reductions(),
        *_softmax_family(),
        *_losses(),
        *_activations(),
        *_broadcasting(),
    ]


@dataclass
class Summary:
    calls: int
    compiled: int  # kernels (with their callees) Numba compiled
    seconds: float
    cache_dir: str | None
    threading_layer: str


class CompileCounter(event.Listener):
    """Counts Numba compilations while active (a kernel loaded from the
    on-disk cache is not one)."""

    def __init__(self) -> None:
        self.count = 0

    def on_start(self, ev: event.Event) -> None:
        self.count += 1

    def on_end(self, ev: event.Event) -> None:
        pass

    def __enter__(self) -> CompileCounter:
        event.register("numba:compile", self)
        return self

    def __exit__(self, *exc: object) -> None:
        event.unregister("numba:compile", self)


def cache_dir() -> str | None:
    """Where Numba keeps softkern's compiled CPU kernels."""
    from softkern.cpu import reduce as cpu_reduce

    try:
        return str(cpu_reduce.full_reduce_kernel.stats.cache_path)
    except AttributeError:
        return None


def _run(calls: Iterable[Call], done: Callable[[Call], None]) -> int:
    """Run `calls`, reporting each to `done`; returns the compilations."""
    with CompileCounter() as counter:
        for call in calls:
            call.run()
            done(call)
    return counter.count


def _worker(labels: list[str], queue: Any) -> None:
    """A warmup process: runs the catalogue's calls named `labels`, putting
    ("done", label) after each and ("compiled", count) or ("error", text)
    at the end."""
    try:
        by_label = {call.label: call for call in catalogue()}
        count = _run(
            [by_label[label] for label in labels],
            lambda call: queue.put(("done", call.label)),
        )
        queue.put(("compiled", count))
    except BaseException:  # handed to the parent, which raises it
        import traceback

        queue.put(("error", traceback.format_exc()))


def _share(calls: list[Call], jobs: int) -> list[list[Call]]:
    """The calls split by family over `jobs` workers, the heaviest family
    first onto the least loaded worker."""
    families: dict[str, list[Call]] = {}
    for call in calls:
        families.setdefault(call.family, []).append(call)
    shares: list[list[Call]] = [[] for _ in range(jobs)]
    loads = [0.0] * jobs
    for family, members in sorted(
        families.items(), key=lambda kv: -COST[kv[0]] * len(kv[1])
    ):
        k = loads.index(min(loads))
        shares[k] += members
        loads[k] += COST[family] * len(members)
    return [share for share in shares if share]


def _run_in_processes(
    calls: list[Call], jobs: int, done: Callable[[Call], None]
) -> int:
    """Run `calls` in `jobs` fresh processes (spawned: no state shared with
    this one), each taking whole families; returns their compilations."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    by_label = {call.label: call for call in calls}
    workers = [
        context.Process(target=_worker, args=([c.label for c in share], queue))
        for share in _share(calls, jobs)
    ]
    for worker in workers:
        worker.start()
    compiled, finished = 0, 0
    try:
        while finished < len(workers):
            kind, value = queue.get()
            if kind == "done":
                done(by_label[value])
            elif kind == "compiled":
                compiled += value
                finished += 1
            else:
                raise RuntimeError(f"a softkern warmup process failed:\n{value}")
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.terminate()
    return compiled


def warmup(
    calls: Iterable[Call] | None = None,
    progress: bool = True,
    jobs: int | None = 1,
) -> Summary:
    """Run `calls` (default: the whole ``catalogue()``), compiling what the
    on-disk cache lacks; a tqdm progress bar when `progress`. `jobs` > 1
    compiles in that many processes at once, by kernel family (None: one
    per core)."""
    from softkern import _threads

    calls = list(catalogue() if calls is None else calls)
    jobs = (os.cpu_count() or 1) if jobs is None else max(1, jobs)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(calls), desc="softkern warmup", unit="call")

    def done(call: Call) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{call.label:.40}", refresh=False)
            bar.update()

    try:
        if jobs > 1 and len({c.family for c in calls}) > 1:
            compiled = _run_in_processes(calls, jobs, done)
        else:
            compiled = _run(calls, done)
    finally:
        if bar is not None:
            bar.close()
    return Summary(
        calls=len(calls),
        compiled=compiled,
        seconds=time.perf_counter() - start,
        cache_dir=cache_dir(),
        threading_layer=_threads.describe(),
    )


def main(jobs: int | None = None) -> int:
    summary = warmup(jobs=jobs)
    print(
        f"softkern warmup: {summary.calls} calls, {summary.compiled} kernels "
        f"compiled in {summary.seconds:.1f} s "
        f"({'all found in the cache' if summary.compiled == 0 else 'now cached'})"
    )
    print(f"  Numba cache: {summary.cache_dir}")
    print(f"  threading layer: {summary.threading_layer}")
    return 0
