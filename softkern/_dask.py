"""softkern's functions on Dask arrays: lazy graphs whose tasks run our
kernels chunk by chunk.

A public function given a ``dask.array.Array`` (``_dispatch.public_function``
sends it here) checks its arguments at once, from the shapes and dtypes the
Dask arrays already know (a bad dim, shapes that do not broadcast, a wrong
target shape raise at call time, as the eager call does), and returns a
lazy Dask array; nothing is computed until the caller asks. Each task calls
the public function on its chunks, so NumPy chunks run the CPU kernels and
CuPy chunks the GPU kernels, and the result's ``meta`` is of the chunks'
kind.

How each operation splits:

- sum, amax, amin, dot, logsumexp: ``dask.array.reduction``, our kernel on
  each chunk (keeping the reduced dims), then the same kernel over the
  partial results (``combine``, in a tree of ``split_every`` partials, and
  ``aggregate``). Sums of 16-bit floats keep float32 partials and round
  once at the end. logsumexp's partials are the chunks' own log-sum-exps:
  a (max m, sum of exp(x - m)) pair is m + log(sum) in one number, and the
  logsumexp of the partials is the pairs' merge M = max mᵢ, S = Σ sᵢ·exp(mᵢ
  - M), with -inf, +inf and NaN handled by the kernel as in one call.
- softmax, log_softmax: a dim held in one chunk maps our kernel over the
  chunks; a dim split over several computes the slices' log-sum-exp as
  above, then one pass (``cpu.softmax.from_logsumexp``) writes exp(x - lse)
  or x - lse: the input is read twice. Their backward passes reduce
  sum(grad * output) or sum(grad) the same way, then finish elementwise.
- cross_entropy, nll_loss, cross_entropy_backward: the batch is chunked
  freely; a class dim in one chunk runs our fused kernels per chunk. A
  class dim split over chunks runs vocabulary-parallel: each class chunk
  yields per position its log-sum-exp, its part of the target's logit (the
  chunk that holds the target) and, for label smoothing or probability
  targets, its weighted sums; these merge over the class chunks into the
  loss without any row being assembled. Targets out of range raise the
  eager call's IndexError when the graph runs.
- expand, where, sigmoid, logsigmoid, gumbel_softmax: elementwise over
  chunks, with Dask's broadcasting (gumbel_softmax needs its dim in one
  chunk and rechunks it so; each chunk draws its own noise from a seed fixed
  at call time, so recomputing gives the same sample).

Threads: each task runs our kernels on ``SOFTKERN_DASK_THREADS`` Numba
threads (default 1), since Dask already runs one task per core (the
threaded scheduler's pool, or a cluster's workers × threads); a parallel
kernel inside each task would put cores² threads on the machine. Set it
higher for a worker with few threads on a large machine (one worker of one
thread per node: the node's core count). Numba's workqueue layer is not
thread-safe (``softkern._threads``): under it, use a scheduler of processes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import dask.array as da
import numba
import numpy as np
from dask.array.utils import meta_from_array

from softkern import _dispatch, _dtypes, _launch, _layout
from softkern.cpu import softmax as cpu_softmax
from softkern.ops import activations as ops_activations
from softkern.ops import broadcast as ops_broadcast
from softkern.ops import losses as ops_losses
from softkern.ops import reduce as ops_reduce
from softkern.ops import softmax as ops_softmax

THREADS_ENV = "SOFTKERN_DASK_THREADS"
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


# --- the call and the tasks' threads ------------------------------------------


def call(name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Run public function `name` (`fn` undecorated) on Dask arrays: the
    arguments bound as `fn` binds them, plus ``split_every`` for the
    reductions (Dask's tree width)."""
    kwargs = dict(kwargs)
    split_every = kwargs.pop("split_every", None)
    handler = _HANDLERS.get(name)
    if handler is None:
        raise TypeError(f"softkern.{name} does not take Dask arrays")
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if split_every is not None:
        if name not in _SPLITS:
            raise TypeError(
                f"softkern.{name}: split_every applies to the functions that "
                "reduce over chunks"
            )
        arguments["split_every"] = split_every
    return handler(**arguments)


def task_threads() -> int:
    """Numba threads for our kernels inside one Dask task."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return 1
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive int, got {value!r}")
    return min(threads, numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def _threads_of_a_task() -> Iterator[None]:
    # Numba's thread count is per calling thread: this task's, not its
    # neighbours' in the same worker.
    threads, before = task_threads(), numba.get_num_threads()
    if threads == before:
        yield
        return
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def task(fn: Callable) -> Callable:
    """`fn`, a module-level function (so workers can unpickle it), run with
    the Numba threads of one Dask task."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _threads_of_a_task():
            return fn(*args, **kwargs)

    return run


# --- arguments -----------------------------------------------------------------


def _dask(value: Any, name: str, fn: str, like: Any = None) -> da.Array:
    """`value` as a Dask array whose shape is known, without empty chunks
    (a dim of size 1 split as (0, 1) would otherwise broadcast in Dask's
    blockwise against its chunks); a NumPy value becomes chunks of `like`'s
    kind."""
    if not isinstance(value, da.Array):
        value = da.asarray(value, like=like)
    if any(math.isnan(size) for size in value.shape):
        raise ValueError(
            f"{fn}: {name} has chunks of unknown size (shape {value.shape}); "
            f"call {name}.compute_chunk_sizes() first"
        )
    chunks = tuple(tuple(c for c in dim if c) or dim[:1] for dim in value.chunks)
    return value if chunks == value.chunks else value.rechunk(chunks)


def _meta(like: da.Array, ndim: int, dtype: np.dtype) -> Any:
    return meta_from_array(like._meta, ndim=ndim, dtype=dtype)


def _no_out(out: Any, fn: str) -> None:
    if out is not None:
        raise TypeError(
            f"{fn}: out= cannot receive a result computed from Dask arrays "
            "(they are lazy and immutable); drop out=, then compute or store "
            "the result (dask.array.store)"
        )


def _wide(block: Any, acc: np.dtype) -> Any:
    """A chunk in the accumulator type (a copy only for other dtypes)."""
    return block if block.dtype == acc else block.astype(acc)


# --- sum, amax, amin, dot -------------------------------------------------------


def _partial_dtype(op: str, dtype: np.dtype) -> np.dtype:
    """What the partial results of a reduction hold: 16-bit float sums keep
    their float32 accumulator; every other result is exact in its dtype."""
    result = np.dtype(ops_reduce.cuda_reduce.result_dtype(op, dtype))
    if op == "sum" and result.itemsize == 2 and _dtypes.is_float(result):
        return _FLOAT32
    return result


@task
def _reduce_chunk(
    block: Any,
    axis: tuple[int, ...],
    keepdims: bool,
    *,
    op: str,
    strategy: int,
    threads_per_block: int | None,
    partial: np.dtype,
) -> Any:
    if block.dtype != partial and partial == _FLOAT32:
        block = block.astype(partial)
    reduced = _REDUCERS[op](block, axis, True, reduce=strategy, block=threads_per_block)
    return reduced if reduced.dtype == partial else reduced.astype(partial)


@task
def _reduce_aggregate(
    parts: Any,
    axis: tuple[int, ...],
    keepdims: bool,
    *,
    op: str,
    strategy: int,
    threads_per_block: int | None,
    result: np.dtype,
) -> Any:
    reduced = _REDUCERS[op](
        parts, axis, keepdims, reduce=strategy, block=threads_per_block
    )
    return reduced if reduced.dtype == result else reduced.astype(result)


def _xp(block: Any) -> Any:
    """The array module of a chunk (NumPy or CuPy)."""
    if isinstance(block, np.ndarray):
        return np
    import cupy

    return cupy


def reduction(
    op: str,
    x: Any,
    dim: Any = None,
    keepdim: bool = False,
    reduce: int = 2,
    block: int | None = None,
    split_every: Any = None,
) -> da.Array:
    fn = f"softkern.{op}"
    x = _dask(x, "x", fn)
    plan = ops_reduce.reduce_plan(
        op, x.shape, x.dtype, _dispatch.key(dim), keepdim, reduce, block
    )
    partial = _partial_dtype(op, x.dtype)
    options = {"op": op, "strategy": plan.strategy, "threads_per_block": block}
    return da.reduction(
        x,
        functools.partial(_reduce_chunk, **options, partial=partial),
        functools.partial(_reduce_aggregate, **options, result=plan.result),
        axis=plan.dims,
        keepdims=bool(keepdim),
        dtype=plan.result,
        split_every=split_every,
        combine=functools.partial(_reduce_aggregate, **options, result=partial),
        meta=_meta(x, len(plan.out_shape), plan.result),
    )


@task
def _dot_chunk(a: Any, b: Any, *, strategy: int, threads_per_block: int | None) -> Any:
    return ops_reduce.dot(a, b, reduce=strategy, block=threads_per_block).reshape(1)


def dot(
    x: Any,
    y: Any,
    reduce: int = 2,
    block: int | None = None,
    split_every: Any = None,
) -> da.Array:
    fn = "softkern.dot"
    x, y = _dask(x, "x", fn), _dask(y, "y", fn)
    ops_reduce.dot_plan(x.shape, x.dtype, y.shape, y.dtype, reduce, block)
    y = y.rechunk(x.chunks)
    partials = da.blockwise(
        functools.partial(_dot_chunk, strategy=reduce, threads_per_block=block),
        "i",
        x,
        "i",
        y,
        "i",
        adjust_chunks={"i": 1},
        dtype=x.dtype,
        meta=_meta(x, 1, x.dtype),
    )
    return reduction("sum", partials, 0, False, reduce, block, split_every)


# --- logsumexp, softmax, log_softmax ------------------------------------------


@task
def _lse_chunk(
    block: Any,
    axis: tuple[int, ...],
    keepdims: bool,
    *,
    acc: np.dtype,
    result: np.dtype,
    strategy: int,
    threads_per_block: int | None,
) -> Any:
    lse = ops_softmax.logsumexp(
        _wide(block, acc), axis, keepdims, reduce=strategy, block=threads_per_block
    )
    return lse if lse.dtype == result else lse.astype(result)


def _lse_graph(
    x: da.Array,
    dims: tuple[int, ...],
    keepdim: bool,
    acc: np.dtype,
    result: np.dtype,
    strategy: int,
    block: int | None,
    split_every: Any,
) -> da.Array:
    """log(sum(exp(x))) over `dims`: each chunk's in `acc`, merged by
    logsumexp of the partials (in `acc`), rounded to `result` at the end."""
    options = {"strategy": strategy, "threads_per_block": block}
    return da.reduction(
        x,
        functools.partial(_lse_chunk, acc=acc, result=acc, **options),
        functools.partial(_lse_chunk, acc=acc, result=result, **options),
        axis=dims,
        keepdims=keepdim,
        dtype=result,
        split_every=split_every,
        combine=functools.partial(_lse_chunk, acc=acc, result=acc, **options),
        meta=_meta(x, x.ndim if keepdim else x.ndim - len(dims), result),
    )


def logsumexp(
    x: Any,
    dim: Any,
    keepdim: bool = False,
    reduce: int = 2,
    block: int | None = None,
    split_every: Any = None,
) -> da.Array:
    fn = "softkern.logsumexp"
    x = _dask(x, "x", fn)
    plan = ops_softmax.logsumexp_plan(
        x.shape, x.dtype, _dispatch.key(dim), keepdim, reduce, block
    )
    call = plan.call
    return _lse_graph(
        x, plan.dims, bool(keepdim), call.acc, call.out_dtype, reduce, block,
        split_every,
    )  # fmt: skip


@task
def _softmax_chunk(
    block: Any,
    *,
    kind: str,
    dim: int,
    dtype: Any,
    strategy: int,
    threads_per_block: int | None,
) -> Any:
    forward = ops_softmax.softmax if kind == "softmax" else ops_softmax.log_softmax
    return forward(block, dim, dtype=dtype, reduce=strategy, block=threads_per_block)


@task
def _softmax_from_lse(
    block: Any, lse: Any, *, kind: str, dim: int, acc: np.dtype, result: np.dtype
) -> Any:
    x = _wide(block, acc)
    log = kind == "log_softmax"
    if not isinstance(x, np.ndarray):  # CuPy chunks: the same formula
        xp = _xp(x)
        shifted = x - lse
        shifted = xp.where(lse < np.inf, shifted, lse - lse)
        out = shifted if log else xp.exp(shifted)
        return out.astype(result, copy=False)
    outer, n, inner = _layout.outer_n_inner(x.shape, (dim,))
    out = _dispatch.host_empty(x.shape, acc)
    cpu_softmax.from_logsumexp(
        x.reshape(outer, n, inner),
        lse.reshape(outer, inner),
        out.reshape(outer, n, inner),
        log,
        _launch.cpu_parallel(x.nbytes),
    )
    return out if acc == result else out.astype(result)


def _forward(
    kind: str,
    x: Any,
    dim: Any,
    dtype: Any,
    out: Any,
    reduce: int,
    block: int | None,
    split_every: Any = None,
) -> da.Array:
    fn = f"softkern.{kind}"
    _no_out(out, fn)
    x = _dask(x, "x", fn)
    if dim is None:
        dim = ops_softmax.legacy_softmax_dim(x.ndim, fn)
    call = ops_softmax.forward_plan(kind, x.shape, x.dtype, dim, dtype, reduce, block)
    d = call.plan.dim
    meta = _meta(x, x.ndim, call.out_dtype)
    if x.ndim == 0 or x.numblocks[d] == 1:
        chunk = functools.partial(
            _softmax_chunk, kind=kind, dim=d, dtype=dtype, strategy=reduce,
            threads_per_block=block,
        )  # fmt: skip
        return x.map_blocks(chunk, dtype=call.out_dtype, meta=meta)
    if dtype is not None and x.dtype != call.out_dtype:
        x = x.astype(call.out_dtype)  # as the eager call: cast first
    lse = _lse_graph(x, (d,), True, call.acc, call.acc, reduce, block, split_every)
    finish = functools.partial(
        _softmax_from_lse, kind=kind, dim=d, acc=call.acc, result=call.out_dtype
    )
    return da.map_blocks(finish, x, lse, dtype=call.out_dtype, meta=meta)


def softmax(x, dim=None, dtype=None, out=None, reduce=2, block=None, split_every=None):
    return _forward("softmax", x, dim, dtype, out, reduce, block, split_every)


def log_softmax(
    x, dim=None, dtype=None, out=None, reduce=2, block=None, split_every=None
):
    return _forward("log_softmax", x, dim, dtype, out, reduce, block, split_every)


@task
def _backward_chunk(
    g: Any, y: Any, *, kind: str, dim: int, strategy: int, threads_per_block: int | None
) -> Any:
    backward = (
        ops_softmax.softmax_backward
        if kind == "softmax_backward"
        else ops_softmax.log_softmax_backward
    )
    return backward(g, y, dim, reduce=strategy, block=threads_per_block)


@task
def _backward_partial_sum(
    g: Any, y: Any, *, kind: str, dim: int, acc: np.dtype, strategy: int
) -> Any:
    """sum(grad * output) (softmax) or sum(grad) (log_softmax) of a chunk
    along `dim`, kept, in `acc`."""
    terms = _wide(g, acc) * _wide(y, acc) if kind == "softmax_backward" else g
    return ops_reduce.sum(_wide(terms, acc), dim, True, reduce=strategy)


@task
def _backward_finish(
    g: Any, y: Any, total: Any, *, kind: str, acc: np.dtype, result: np.dtype
) -> Any:
    g, y = _wide(g, acc), _wide(y, acc)
    if kind == "softmax_backward":
        out = y * (g - total)
    else:
        out = g - _xp(y).exp(y) * total
    return out.astype(result, copy=False)


def _backward(
    kind: str,
    grad_output: Any,
    output: Any,
    dim: Any,
    reduce: int,
    block: int | None,
    split_every: Any = None,
) -> da.Array:
    fn = f"softkern.{kind}"
    g = _dask(grad_output, "grad_output", fn)
    y = _dask(output, "output", fn)
    call = ops_softmax.backward_plan(
        kind, g.shape, g.dtype, y.shape, y.dtype, dim, reduce, block
    )
    y = y.rechunk(g.chunks)
    d, meta = call.plan.dim, _meta(g, g.ndim, g.dtype)
    if g.ndim == 0 or g.numblocks[d] == 1:
        chunk = functools.partial(
            _backward_chunk, kind=kind, dim=d, strategy=reduce, threads_per_block=block
        )
        return da.map_blocks(chunk, g, y, dtype=g.dtype, meta=meta)
    partials = da.map_blocks(
        functools.partial(
            _backward_partial_sum, kind=kind, dim=d, acc=call.acc, strategy=reduce
        ),
        g,
        y,
        chunks=tuple(
            (1,) * g.numblocks[d] if i == d else c for i, c in enumerate(g.chunks)
        ),
        dtype=call.acc,
        meta=_meta(g, g.ndim, call.acc),
    )
    total = reduction("sum", partials, d, True, reduce, block, split_every)
    finish = functools.partial(
        _backward_finish, kind=kind, acc=call.acc, result=g.dtype
    )
    return da.map_blocks(finish, g, y, total, dtype=g.dtype, meta=meta)


def softmax_backward(grad_output, output, dim, reduce=2, block=None, split_every=None):
    return _backward(
        "softmax_backward", grad_output, output, dim, reduce, block, split_every
    )


def log_softmax_backward(
    grad_output, output, dim, reduce=2, block=None, split_every=None
):
    return _backward(
        "log_softmax_backward", grad_output, output, dim, reduce, block, split_every
    )


# --- losses ----------------------------------------------------------------------


class _Facts(NamedTuple):
    """What a loss task needs of the plan: scalars only. A task carries its
    arguments to the worker, and the plan holds a weight of ones of the
    class count (a MiB per task at 262144 classes)."""

    fn: str
    kind: str  # "index" or "probs"
    class_dim: int
    classes: int
    ignore_index: int
    smoothing: float
    cap: float  # 0 for none
    zscale: float
    acc: np.dtype
    out_dtype: np.dtype
    block: int

    @classmethod
    def of(cls, p: ops_losses.LossPlan) -> _Facts:
        return cls(
            p.fn, p.kind, p.class_dim, p.classes, p.ignore_index, p.smoothing,
            float(p.cap), p.zscale, p.acc, p.out_dtype, p.plan.block,
        )  # fmt: skip

    def options(self) -> dict[str, Any]:
        """The eager loss functions' keywords that these facts fix."""
        return {
            "ignore_index": self.ignore_index,
            "label_smoothing": self.smoothing,
            "softcap": self.cap or None,
            "lse_square_scale": self.zscale,
        }


class _LossGraph:
    """A loss call's Dask operands, aligned: the target chunked as the
    input's batch dims (or as the input, for probabilities), the weight as
    its class dim; Dask's index names of each for ``blockwise``."""

    def __init__(
        self,
        fn: str,
        probabilities: bool,
        input: Any,
        target: Any,
        weight: Any,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        block: int | None,
        softcap: float | None = None,
        lse_square_scale: float = 0.0,
    ):
        x = _dask(input, "input", fn)
        like = x._meta
        t = _dask(target, "target", fn, like)
        w = None if weight is None else _dask(weight, "weight", fn, like)
        self.p = p = ops_losses.plan_of(
            fn, probabilities, x, t, w, ignore_index, reduction, label_smoothing,
            block, softcap, lse_square_scale,
        )  # fmt: skip
        self.facts = _Facts.of(p)
        cd = p.class_dim
        self.x_ind = tuple(f"d{i}" for i in range(x.ndim))
        self.class_ind = self.x_ind[cd]
        self.batch_ind = tuple(i for i in self.x_ind if i != self.class_ind)
        self.batch_chunks = tuple(c for i, c in enumerate(x.chunks) if i != cd)
        if p.kind == "probs":
            t, self.t_ind = t.rechunk(x.chunks), self.x_ind
        else:
            t, self.t_ind = t.rechunk(self.batch_chunks), self.batch_ind
        if w is not None:
            w = w.rechunk((x.chunks[cd],))
        self.x, self.t, self.w = x, t, w
        self.split = x.numblocks[cd] > 1  # vocabulary-parallel

    def operands(self) -> list[Any]:
        """blockwise's (array, index) arguments: input, target[, weight]."""
        args = [self.x, self.x_ind, self.t, self.t_ind]
        if self.w is not None:
            args += [self.w, (self.class_ind,)]
        return args

    def meta(self, ndim: int, dtype: np.dtype) -> Any:
        return _meta(self.x, ndim, dtype)

    def classes(self) -> da.Array:
        """The class numbers, chunked as the class dim: each class chunk's
        task learns which classes it holds."""
        return da.arange(
            self.p.classes, chunks=(self.x.chunks[self.p.class_dim],), like=self.x._meta
        )

    def target_weights(self) -> da.Array:
        """Each position's target weight, float64, 0 where ignored (class
        indices only); out-of-range targets raise when it is computed."""
        args: list[Any] = [self.t, self.batch_ind]
        if self.w is not None:
            args += [self.w, ("w",)]  # the whole weight in each task
        return da.blockwise(
            functools.partial(_target_weights_chunk, facts=self.facts),
            self.batch_ind,
            *args,
            concatenate=True,
            dtype=_FLOAT64,
            meta=self.meta(len(self.batch_ind), _FLOAT64),
        )

    def weight_total(self, split_every: Any) -> da.Array:
        """The sum of the class weights (the class count without weights),
        a 0-d float64 array."""
        if self.w is None:
            return da.asarray(np.array(float(self.p.classes)), like=self.x._meta)
        return reduction(
            "sum", self.w.astype(_FLOAT64), None, False, 2, None, split_every
        )


def _loss_graph(fn: str, reduce: int, out: Any, *loss_args: Any) -> _LossGraph:
    """The checks every cross-entropy entry makes at call time, then its
    graph of operands (`loss_args`: input to lse_square_scale, as
    ``_LossGraph`` takes them after `probabilities`)."""
    _launch.check_strategy(reduce)
    _no_out(out, fn)
    return _LossGraph(fn, True, *loss_args)


def _target_weights(t: Any, w: Any, facts: _Facts) -> Any:
    """Each position's target weight as float64, 0 where ignored; an
    out-of-range target raises the eager call's IndexError."""
    xp = _xp(t)
    ignored = t == facts.ignore_index
    bad = ~ignored & ((t < 0) | (t >= facts.classes))
    if bad.any():
        ops_losses._raise_bad_target(facts, int(t[bad].ravel()[0]))
    if w is None:
        return xp.where(ignored, 0.0, 1.0)
    return xp.where(ignored, 0.0, w.astype(_FLOAT64)[xp.where(ignored, 0, t)])


@task
def _target_weights_chunk(t: Any, w: Any = None, *, facts: _Facts) -> Any:
    return _target_weights(t, w, facts)


@task
def _quotient(a: Any, b: Any) -> Any:
    """a / b, quietly: 0 / 0 is NaN and x / 0 is ±inf, as in PyTorch."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


@task
def _mean_scale(g: Any, denominator: Any) -> Any:
    """grad_output / the mean's denominator; NaN when that is 0 (every
    counted target weighs 0), where PyTorch's gradient is NaN in every
    row that is not ignored (its -w_t / total weight is 0 / 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _xp(g).where(denominator == 0, np.nan, g / denominator)


@task
def _loss_chunk(
    x: Any, t: Any, w: Any = None, *, nll: bool, strategy: int, facts: _Facts
) -> Any:
    """Per-position losses of a chunk holding whole rows, by our fused
    kernel, with the class dim kept (size 1)."""
    if nll:
        losses = ops_losses.nll_loss(
            x, t, w, facts.ignore_index, "none", reduce=strategy
        )
    else:
        losses = ops_losses.cross_entropy(
            x, t, w, **facts.options(), reduction="none", reduce=strategy
        )
    return _xp(losses).expand_dims(losses, facts.class_dim)


def _capped(x: Any, cap: float) -> Any:
    return x if not cap else cap * _xp(x).tanh(x / cap)


@task
def _class_chunk_stats(
    x: Any,
    t: Any,
    classes: Any,
    w: Any = None,
    *,
    facts: _Facts,
    strategy: int,
    nll: bool,
) -> Any:
    """One class chunk's statistics per position, stacked on a new first
    axis (float64; the class dim kept with size 1):

    - cross entropy, class indices: the chunk's log-sum-exp, the target's
      (capped) logit where this chunk holds it (else 0), and with label
      smoothing the weighted sum of the logits;
    - cross entropy, probabilities q (smoothed): log-sum-exp, sum of
      w·q·x and sum of w·q;
    - nll_loss: the target's value where this chunk holds it.
    """
    xp, cd = _xp(x), facts.class_dim
    x = _capped(_wide(x, facts.acc), facts.cap)
    shape = [1] * x.ndim
    shape[cd] = x.shape[cd]
    if w is not None:
        w = _wide(w, facts.acc).reshape(shape)
    stats = []
    if not nll and xp is np:
        stats.append(ops_softmax.logsumexp_float64(x, cd))
    elif not nll:
        lse = ops_softmax.logsumexp(x, cd, True, reduce=strategy, block=facts.block)
        stats.append(lse.astype(_FLOAT64))
    with np.errstate(invalid="ignore"):  # 0 * inf: NaN, as PyTorch's
        if facts.kind == "index":
            first = int(classes[0]) if classes.shape[0] else 0
            local = xp.expand_dims(t, cd).astype(np.int64) - first
            holds = (local >= 0) & (local < x.shape[cd])
            if x.shape[cd]:
                picked = xp.take_along_axis(x, xp.where(holds, local, 0), cd)
            else:
                picked = xp.zeros(local.shape, facts.acc)
            stats.append(xp.where(holds, picked, 0).astype(_FLOAT64))
            if facts.smoothing:
                weighted = x if w is None else x * w
                stats.append(weighted.sum(cd, keepdims=True, dtype=_FLOAT64))
        elif not nll:
            eps = facts.smoothing
            q = _wide(t, facts.acc) * (1 - eps) + eps / facts.classes
            if w is not None:
                q = q * w
            stats.append((q * x).sum(cd, keepdims=True, dtype=_FLOAT64))
            stats.append(q.sum(cd, keepdims=True, dtype=_FLOAT64))
    return xp.stack(stats)


def _row_stats(
    graph: _LossGraph, strategy: int, nll: bool, split_every: Any
) -> list[da.Array]:
    """The class chunks' statistics merged over the class dim, one array of
    the batch shape per statistic: log-sum-exp first (by logsumexp of the
    chunks'), the others summed."""
    p = graph.p
    cd, ci = p.class_dim, graph.class_ind
    args = [graph.x, graph.x_ind, graph.t, graph.t_ind, graph.classes(), (ci,)]
    if graph.w is not None:
        args += [graph.w, (ci,)]
    count = 1 if nll else (3 if p.kind == "probs" or p.smoothing else 2)
    stats = da.blockwise(
        functools.partial(
            _class_chunk_stats, facts=graph.facts, strategy=strategy, nll=nll
        ),
        ("stat", *graph.x_ind),
        *args,
        new_axes={"stat": count},
        adjust_chunks={ci: 1},
        dtype=_FLOAT64,
        meta=graph.meta(graph.x.ndim + 1, _FLOAT64),
    )
    merged = []
    for i in range(count):
        if i == 0 and not nll:
            merged.append(
                _lse_graph(stats[0], (cd,), False, _FLOAT64, _FLOAT64, strategy,
                           p.plan.block, split_every)
            )  # fmt: skip
        else:
            merged.append(
                reduction("sum", stats[i], cd, False, strategy, None, split_every)
            )
    return merged


def _nan_where_infinite(lse: Any, values: Any) -> Any:
    """A row holding +inf or NaN (lse +inf or NaN) has every log-probability
    NaN, as PyTorch's log_softmax: its loss and gradient are NaN."""
    return _xp(lse).where(lse < np.inf, values, lse - lse)


@task
def _index_loss_from_stats(
    t: Any, wt: Any, total_w: Any, *stats: Any, facts: _Facts, nll: bool
) -> Any:
    """Per-position losses (float64) of class-index targets from the merged
    statistics: log-sum-exp, the target's logit[, the weighted logit sum]."""
    xp = _xp(wt)
    ignored = t == facts.ignore_index
    with np.errstate(invalid="ignore"):
        if nll:
            return xp.where(ignored, 0.0, -wt * stats[0])
        lse, target_logit = stats[0], stats[1]
        eps, classes = facts.smoothing, facts.classes
        loss = (1 - eps) * wt * (lse - target_logit)
        if eps:  # as PyTorch: no smoothing term at all without smoothing
            loss = loss + eps / classes * (total_w * lse - stats[2])
        if facts.zscale:
            loss = loss + facts.zscale * lse * lse
        return xp.where(ignored, 0.0, _nan_where_infinite(lse, loss))


@task
def _probs_loss_from_stats(lse: Any, wqx: Any, wq: Any, *, facts: _Facts) -> Any:
    """Per-position losses (float64) of probability targets: lse · Σ w·q
    - Σ w·q·x (+ the z-loss)."""
    with np.errstate(invalid="ignore"):
        loss = lse * wq - wqx
        if facts.zscale:
            loss = loss + facts.zscale * lse * lse
        return _nan_where_infinite(lse, loss)


def _position_losses(
    graph: _LossGraph, strategy: int, nll: bool, split_every: Any
) -> da.Array:
    """The loss of every position (reduction "none"): the input's dtype
    from the fused kernel per chunk, float64 from the merged statistics."""
    p, facts, bi = graph.p, graph.facts, graph.batch_ind
    meta = graph.meta(len(bi), _FLOAT64)
    if not graph.split:
        # The class dim stays in the output (size 1), so Dask never
        # concatenates the input's chunks (it copies them, even one).
        losses = da.blockwise(
            functools.partial(_loss_chunk, nll=nll, strategy=strategy, facts=facts),
            graph.x_ind,
            *graph.operands(),
            adjust_chunks={graph.class_ind: 1},
            dtype=p.out_dtype,
            meta=graph.meta(len(graph.x_ind), p.out_dtype),
        )
        return losses.squeeze(axis=p.class_dim)
    stats = [(s, bi) for s in _row_stats(graph, strategy, nll, split_every)]
    if p.kind == "probs":
        return da.blockwise(
            functools.partial(_probs_loss_from_stats, facts=facts),
            bi, *(a for pair in stats for a in pair), dtype=_FLOAT64, meta=meta,
        )  # fmt: skip
    args = [graph.t, bi, graph.target_weights(), bi, graph.weight_total(split_every)]
    args += [(), *(a for pair in stats for a in pair)]
    return da.blockwise(
        functools.partial(_index_loss_from_stats, facts=facts, nll=nll),
        bi, *args, dtype=_FLOAT64, meta=meta,
    )  # fmt: skip


def _denominator(graph: _LossGraph, split_every: Any) -> Any:
    """reduction="mean"'s divisor: the counted targets' summed weight, or
    the number of positions for probabilities."""
    if graph.p.kind == "probs":
        return float(graph.p.positions)
    return reduction("sum", graph.target_weights(), None, False, 2, None, split_every)


def _divided(
    a: da.Array, a_ind: tuple, b: Any, quotient: Callable = _quotient
) -> da.Array:
    b_args = (b, ()) if isinstance(b, da.Array) else (b, None)
    return da.blockwise(
        quotient, a_ind, a, a_ind, *b_args, dtype=_FLOAT64,
        meta=_meta(a, len(a_ind), _FLOAT64),
    )  # fmt: skip


def _reduced_loss(
    graph: _LossGraph, strategy: int, nll: bool, split_every: Any
) -> da.Array:
    p = graph.p
    if p.positions == 0:  # nothing to chunk: the eager result of no positions
        empty = ops_losses._empty_result(p, ops_losses._host_empty)
        return da.asarray(empty, like=graph.x._meta)
    losses = _position_losses(graph, strategy, nll, split_every)
    if p.reduction == "none":
        return losses.astype(p.out_dtype)
    total = reduction(
        "sum", losses.astype(_FLOAT64), None, False, strategy, None, split_every
    )
    if p.reduction == "mean":
        # zero total weight: NaN with smoothing or the z-loss (eager's rule)
        quotient = _mean_scale if p.weightless_mean_is_nan else _quotient
        total = _divided(total, (), _denominator(graph, split_every), quotient)
    return total.astype(p.out_dtype)


def cross_entropy(
    input, target, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, softcap=None, lse_square_scale=0.0, reduce=2, block=None,
    split_every=None,
):  # fmt: skip
    graph = _loss_graph(
        "softkern.cross_entropy", reduce, None, input, target, weight,
        ignore_index, reduction, label_smoothing, block, softcap, lse_square_scale,
    )  # fmt: skip
    return _reduced_loss(graph, reduce, False, split_every)


def nll_loss(
    input, target, weight=None, ignore_index=-100, reduction="mean", reduce=2,
    block=None, split_every=None,
):  # fmt: skip
    fn = "softkern.nll_loss"
    _launch.check_strategy(reduce)
    graph = _LossGraph(
        fn, False, input, target, weight, ignore_index, reduction, 0.0, block
    )
    return _reduced_loss(graph, reduce, True, split_every)


def _grad_scale(graph: _LossGraph, grad_output: Any, split_every: Any) -> tuple:
    """(scale, its blockwise index): what each position's gradient is
    multiplied by. "none": grad_output per position (or one number);
    "sum": grad_output; "mean": grad_output over the denominator."""
    p, fn, like = graph.p, graph.p.fn, graph.x._meta
    if isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool):
        g = da.asarray(np.array(grad_output, _FLOAT64), like=like)
    else:
        g = _dask(grad_output, "grad_output", fn, like)
        if g.dtype.kind not in "fiu" and not _dtypes.is_bfloat16(g.dtype):
            raise TypeError(
                f"{fn}: grad_output has dtype {g.dtype}; expected a real dtype"
            )
        want = p.batch_shape if p.reduction == "none" else ()
        if g.shape not in ((), want):
            raise ValueError(
                f"{fn}: grad_output must be a number or an array of the loss's "
                f"shape {want} (reduction={p.reduction!r}), got shape {g.shape}"
            )
        g = g.astype(_FLOAT64)
    if g.ndim:
        g = g.rechunk(graph.batch_chunks)
    g_ind = graph.batch_ind if g.ndim else ()
    if p.reduction == "mean":
        g = _divided(g, g_ind, _denominator(graph, split_every), _mean_scale)
    return g, g_ind


@task
def _backward_loss_chunk(
    x: Any,
    t: Any,
    scale: Any,
    w: Any = None,
    *,
    strategy: int,
    reduction: str,
    facts: _Facts,
) -> Any:
    return ops_losses.cross_entropy_backward(
        x, t, scale, w, **facts.options(), reduction=reduction, reduce=strategy
    )


def _scaled_gradient(
    grad: Any, x: Any, scale: Any, lse: Any, facts: _Facts, row: Callable
) -> Any:
    """The last steps shared by both target kinds: the softcap's slope,
    grad_output, NaN for rows holding +inf or NaN, the output dtype."""
    if facts.cap:
        grad = grad * (1 - (_capped(x, facts.cap) / facts.cap) ** 2)
    grad = grad * (row(scale) if scale.ndim else scale)
    return _nan_where_infinite(lse, grad)


@task
def _index_grad_from_stats(
    x: Any,
    classes: Any,
    t: Any,
    wt: Any,
    total_w: Any,
    scale: Any,
    lse: Any,
    w: Any = None,
    *,
    facts: _Facts,
) -> Any:
    """One (batch, class) chunk of the gradient of class-index targets from
    the rows' log-sum-exp: softmax(x) · a - (1-ε) w_t onehot(t) - ε/C · w,
    a = (1-ε) w_t + ε/C · Σw + 2 z lse, capped and scaled; 0 where
    ignored. `w`: this chunk's class weights."""
    xp, cd = _xp(x), facts.class_dim
    eps, count = facts.smoothing, facts.classes
    row = functools.partial(xp.expand_dims, axis=cd)
    shape = [1] * x.ndim
    shape[cd] = x.shape[cd]
    raw = x.astype(_FLOAT64)
    lse, wt, t = row(lse), row(wt), row(t)
    with np.errstate(invalid="ignore", over="ignore"):
        probs = xp.exp(_capped(raw, facts.cap) - lse)
        zslope = 2 * facts.zscale * lse if facts.zscale else 0.0
        a = (1 - eps) * wt + eps / count * total_w + zslope
        onehot = classes.reshape(shape) == t
        grad = probs * a - (1 - eps) * wt * onehot
        if eps:
            here = 1.0 if w is None else w.astype(_FLOAT64).reshape(shape)
            grad = grad - eps / count * here
        grad = _scaled_gradient(grad, raw, scale, lse, facts, row)
    grad = xp.where(t == facts.ignore_index, 0.0, grad)
    return grad.astype(facts.out_dtype)


@task
def _probs_grad_from_stats(
    x: Any, q: Any, scale: Any, lse: Any, wq: Any, w: Any = None, *, facts: _Facts
) -> Any:
    """One (batch, class) chunk of the gradient of probability targets:
    softmax(x) · (Σ w·q + 2 z lse) - w·q, capped and scaled."""
    xp, cd = _xp(x), facts.class_dim
    eps = facts.smoothing
    row = functools.partial(xp.expand_dims, axis=cd)
    raw = x.astype(_FLOAT64)
    lse = row(lse)
    with np.errstate(invalid="ignore", over="ignore"):
        smoothed = q.astype(_FLOAT64) * (1 - eps) + eps / facts.classes
        if w is not None:
            shape = [1] * x.ndim
            shape[cd] = x.shape[cd]
            smoothed = smoothed * w.astype(_FLOAT64).reshape(shape)
        zslope = 2 * facts.zscale * lse if facts.zscale else 0.0
        probs = xp.exp(_capped(raw, facts.cap) - lse)
        grad = probs * (row(wq) + zslope) - smoothed
        grad = _scaled_gradient(grad, raw, scale, lse, facts, row)
    return grad.astype(facts.out_dtype)


def cross_entropy_backward(
    input, target, grad_output=1.0, weight=None, ignore_index=-100,
    reduction="mean", label_smoothing=0.0, softcap=None, lse_square_scale=0.0,
    out=None, reduce=2, block=None, split_every=None,
):  # fmt: skip
    graph = _loss_graph(
        "softkern.cross_entropy_backward", reduce, out, input, target, weight,
        ignore_index, reduction, label_smoothing, block, softcap, lse_square_scale,
    )  # fmt: skip
    return _gradient(graph, grad_output, reduce, split_every)


def _gradient(
    graph: _LossGraph, grad_output: Any, reduce: int, split_every: Any
) -> da.Array:
    p, x, facts = graph.p, graph.x, graph.facts
    scale, scale_ind = _grad_scale(graph, grad_output, split_every)
    if x.size == 0:
        return da.zeros_like(x, dtype=p.out_dtype)
    meta = graph.meta(x.ndim, p.out_dtype)
    ci, bi = graph.class_ind, graph.batch_ind
    w_args = [] if graph.w is None else [graph.w, (ci,)]
    if not graph.split:
        chunk = functools.partial(
            _backward_loss_chunk,
            strategy=reduce,
            reduction="none" if p.reduction == "none" else "sum",
            facts=facts,
        )
        args = [x, graph.x_ind, graph.t, graph.t_ind, scale, scale_ind, *w_args]
        return da.blockwise(chunk, graph.x_ind, *args, dtype=p.out_dtype, meta=meta)
    stats = _row_stats(graph, reduce, False, split_every)
    if p.kind == "probs":
        args = [x, graph.x_ind, graph.t, graph.x_ind, scale, scale_ind]
        args += [stats[0], bi, stats[2], bi, *w_args]
        task_fn = _probs_grad_from_stats
    else:
        args = [x, graph.x_ind, graph.classes(), (ci,), graph.t, bi]
        args += [graph.target_weights(), bi, graph.weight_total(split_every), ()]
        args += [scale, scale_ind, stats[0], bi, *w_args]
        task_fn = _index_grad_from_stats
    return da.blockwise(
        functools.partial(task_fn, facts=facts),
        graph.x_ind, *args, dtype=p.out_dtype, meta=meta,
    )  # fmt: skip


def cross_entropy_and_grad(
    input, target, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, softcap=None, lse_square_scale=0.0, out=None, reduce=2,
    block=None, split_every=None,
):  # fmt: skip
    """Both lazy, from one graph: computed together (``dask.compute(loss,
    grad)``) they share the class chunks' statistics."""
    graph = _loss_graph(
        "softkern.cross_entropy_and_grad", reduce, out, input, target, weight,
        ignore_index, reduction, label_smoothing, block, softcap, lse_square_scale,
    )  # fmt: skip
    loss = _reduced_loss(graph, reduce, False, split_every)
    return loss, _gradient(graph, 1.0, reduce, split_every)


# --- elementwise and broadcasting ---------------------------------------------


@task
def _expand_chunk(block: Any, *, threads_per_block: int | None) -> Any:
    return ops_broadcast.expand(block, block.shape, block=threads_per_block)


def expand(x: Any, sizes: tuple[Any, ...], block: int | None = None) -> da.Array:
    fn = "softkern.expand"
    x = _dask(x, "x", fn)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    strides = _dispatch._c_strides(x.shape, x.dtype.itemsize)
    call = ops_broadcast.expand_plan(
        x.shape, strides, x.dtype, _dispatch.key(sizes), block, True
    )
    shape = call.out_shape
    lead = len(shape) - x.ndim
    # the source's chunks where a dim keeps its size, Dask's choice elsewhere
    wanted = tuple(
        x.chunks[i - lead] if i >= lead and x.shape[i - lead] == size else "auto"
        for i, size in enumerate(shape)
    )
    if not math.prod(shape):  # nothing for Dask's "auto" to size: one chunk
        wanted = tuple(
            (size,) if w == "auto" else w for w, size in zip(wanted, shape, strict=True)
        )
    chunks = da.core.normalize_chunks(wanted, shape, dtype=x.dtype)
    spread = da.broadcast_to(x, shape, chunks=chunks)
    return spread.map_blocks(
        functools.partial(_expand_chunk, threads_per_block=block),
        dtype=call.dtype,
        meta=_meta(x, len(shape), call.dtype),
    )


@task
def _where_chunk(c: Any, x: Any, y: Any, *, threads_per_block: int | None) -> Any:
    return ops_broadcast.where(c, x, y, block=threads_per_block)


def where(condition: Any, x: Any, y: Any, block: int | None = None) -> da.Array:
    fn = "softkern.where"
    values = [condition, x, y]
    if ops_broadcast._is_scalar(condition):
        raise TypeError(f"{fn}: condition must be a bool array, got a Python scalar")
    arrays = {}
    for i, (value, name) in enumerate(
        zip(values, ("condition", "x", "y"), strict=True)
    ):
        if not ops_broadcast._is_scalar(value):
            arrays[i] = _dask(value, name, fn)

    def key(i: int) -> Any:
        if i not in arrays:
            v = values[i]
            return type(v) if type(v) in ops_broadcast._SCALARS else ((), (), v.dtype)
        a = arrays[i]
        return (a.shape, _dispatch._c_strides(a.shape, a.dtype.itemsize), a.dtype)

    call = ops_broadcast.where_plan(key(0), key(1), key(2), block, True)
    spread = da.broadcast_arrays(*arrays.values())
    for i, a in zip(arrays, spread, strict=True):
        values[i] = a
    like = next(iter(arrays.values()))
    return da.map_blocks(
        functools.partial(_where_chunk, threads_per_block=block),
        *values,
        dtype=call.dtype,
        meta=_meta(like, len(call.out_shape), call.dtype),
    )


@task
def _unary_chunk(block: Any, *, name: str, threads_per_block: int | None) -> Any:
    return getattr(ops_activations, name)(block, block=threads_per_block)


def _unary(name: str, x: Any, block: int | None) -> da.Array:
    x = _dask(x, "x", f"softkern.{name}")
    call = ops_activations.unary_plan(name, x.shape, x.dtype)
    return x.map_blocks(
        functools.partial(_unary_chunk, name=name, threads_per_block=block),
        dtype=call.out_dtype,
        meta=_meta(x, x.ndim, call.out_dtype),
    )


@task
def _gumbel_chunk(
    block: Any, *, tau: float, hard: bool, dim: int, seed: int, block_id: tuple = ()
) -> Any:
    # each chunk its own stream of the call's seed
    state = np.random.SeedSequence([seed, *block_id]).generate_state(2, np.uint32)
    chunk_seed = int(state[0]) << 31 | int(state[1]) >> 1
    return ops_activations.gumbel_softmax(block, tau, hard, dim, chunk_seed)


def gumbel_softmax(
    logits: Any,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    seed: int | None = None,
    block: int | None = None,
) -> da.Array:
    fn = "softkern.gumbel_softmax"
    x = _dask(logits, "logits", fn)
    # the eager call checks everything on an empty array of the same dims
    ops_activations.gumbel_softmax(
        np.empty((0,) * x.ndim, x.dtype), tau, hard, dim, seed, block=block
    )
    d = _layout.normalize_dims(dim, x.ndim)
    if seed is None:
        seed = secrets.randbits(63)
    if d:
        x = x.rechunk({d[0]: -1})  # a sample needs its whole slice
    return x.map_blocks(
        functools.partial(
            _gumbel_chunk, tau=tau, hard=hard, dim=d[0] if d else 0, seed=seed
        ),
        dtype=x.dtype,
        meta=_meta(x, x.ndim, x.dtype),
    )


_REDUCERS: dict[str, Callable] = {
    "sum": ops_reduce.sum,
    "amax": ops_reduce.amax,
    "amin": ops_reduce.amin,
}
_SPLITS = {
    "sum", "amax", "amin", "dot", "logsumexp", "softmax", "log_softmax",
    "softmax_backward", "log_softmax_backward", "cross_entropy", "nll_loss",
    "cross_entropy_backward", "cross_entropy_and_grad",
}  # fmt: skip


def _named(op: str) -> Callable:
    return functools.partial(reduction, op)


_HANDLERS: dict[str, Callable] = {
    "sum": _named("sum"),
    "amax": _named("amax"),
    "amin": _named("amin"),
    "dot": dot,
    "logsumexp": logsumexp,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "softmax_backward": softmax_backward,
    "log_softmax_backward": log_softmax_backward,
    "cross_entropy": cross_entropy,
    "nll_loss": nll_loss,
    "cross_entropy_backward": cross_entropy_backward,
    "cross_entropy_and_grad": cross_entropy_and_grad,
    "expand": expand,
    "where": where,
    "sigmoid": functools.partial(_unary, "sigmoid"),
    "logsigmoid": functools.partial(_unary, "logsigmoid"),
    "gumbel_softmax": gumbel_softmax,
}
