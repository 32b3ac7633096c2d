"""Launch configuration: the one place that decides blocks, grids and groups.

Both devices read the same plan. The GPU launches exactly the grid the plan
names; the CPU reduction kernels replay the GPU's association order from the
same plan.
That is what makes a CPU sum and a GPU sum bit-identical, so nothing here may
depend on the GPU model, only on the problem size and the block size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from softkern import _layout

WARP = 32
DEFAULT_BLOCK = 256
MAX_BLOCK = 1024
# A grid of 1024 blocks of 256 threads keeps every SM of an H100 (132 SMs,
# 2048 threads each) busy in a single wave, and a fixed cap keeps the summation
# order independent of the GPU. Tests lower it to force grid-stride loops on
# small arrays in the simulator.
MAX_GRID = 1024
STRATEGIES = (0, 1, 2)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_block(block: int | None) -> int:
    """Return the block size to use; it must be a power of two, 32 to 1024."""
    if block is None:
        return DEFAULT_BLOCK
    if (
        isinstance(block, bool)
        or not isinstance(block, int)
        or block < WARP
        or block > MAX_BLOCK
        or block & (block - 1)
    ):
        raise ValueError(
            f"block must be a power of two from {WARP} to {MAX_BLOCK}, got {block!r}"
        )
    return block


def check_strategy(reduce: int) -> int:
    if isinstance(reduce, bool) or reduce not in STRATEGIES:
        raise ValueError(
            f"reduce must be 0 (interleaved pairs), 1 (sequential halving) or "
            f"2 (warp shuffle), got {reduce!r}"
        )
    return int(reduce)


# CPU kernels run on the calling thread when their input is smaller than
# this: a parallel region costs microseconds to start (waking the pool's
# threads, handing out work), more than a second core saves on a small
# input, and on a busy machine a woken thread may wait for a core.
# Measured with bench/parallel_threshold.py (2-core EPYC, OpenMP layer,
# float32, best times serial/parallel): softmax rows 13/13 us at 64 KiB,
# 24/20 at 128 KiB; cross_entropy 17/18, 30/27; sigmoid 16/16 at 128 KiB,
# 32/22 at 256 KiB; sum dim=1 23/28 at 256 KiB, 43/31 at 512 KiB. With
# another process keeping a core busy, parallel never won by more than noise
# below 2 MiB (TBB layer), so a limit at the bottom of the idle crossover
# also keeps loaded calls serial.
CPU_PARALLEL_MIN_BYTES = 128 * 1024
# Copies (expand, where) do so little per byte that a parallel region pays
# from later: where 10/13 us at 256 KiB of output, 19/14 at 512 KiB.
CPU_COPY_PARALLEL_MIN_BYTES = 512 * 1024


def cpu_parallel(nbytes: int, copy: bool = False) -> bool:
    """Whether a CPU kernel reading `nbytes` of input (a copy: writing
    `nbytes` of output) runs in parallel."""
    limit = CPU_COPY_PARALLEL_MIN_BYTES if copy else CPU_PARALLEL_MIN_BYTES
    return nbytes >= limit


@dataclass(frozen=True)
class FullReducePlan:
    """Reduce `n` elements to one value in two launches.

    Stage 1: `grid` blocks of `block` threads. Thread `t` of the grid folds
    elements t, t + stride, t + 2*stride, ... (stride = grid * block) in that
    order, then each block folds its threads' values into one partial.
    Stage 2: one block of `block` threads folds the `grid` partials the same
    way (thread t takes partials t, t + block, ...).
    """

    n: int
    block: int
    grid: int

    @property
    def stride(self) -> int:
        return self.grid * self.block


def full_reduce_plan(n: int, block: int = DEFAULT_BLOCK) -> FullReducePlan:
    grid = max(1, min(cdiv(n, block), MAX_GRID))
    return FullReducePlan(n=n, block=block, grid=grid)


# gumbel_softmax's noise kernel keeps one xoroshiro128+ state per thread, and
# Numba seeds the states on the host (a 2**64-step jump each), so the kernel
# runs at most this many blocks: 32768 states at 256 threads, seeded in a
# few milliseconds; each thread then draws many numbers, grid-stride.
GUMBEL_MAX_GRID = 128


def elementwise_grid(n: int, block: int = DEFAULT_BLOCK) -> int:
    """Blocks of a grid-stride launch with one thread per element of `n`
    (at most MAX_GRID: each thread then takes several)."""
    return max(1, min(cdiv(n, block), MAX_GRID))


def gumbel_plan(n: int, block: int = DEFAULT_BLOCK) -> FullReducePlan:
    """Grid-stride launch over `n` elements with at most GUMBEL_MAX_GRID blocks."""
    grid = max(1, min(cdiv(n, block), GUMBEL_MAX_GRID, MAX_GRID))
    return FullReducePlan(n=n, block=block, grid=grid)


@dataclass(frozen=True)
class DimReducePlan:
    """Reduce the middle axis of an (outer, n, inner) view.

    regime "rows" (inner == 1): the block is cut into groups of `group`
    threads (a power of two, at most `block`); each group folds one row, thread
    r of the group taking elements r, r + group, ... of the row. Short rows get
    small groups, so a warp can fold several rows at once.

    regime "split" (inner == 1, few long rows: ``split_row_grid``): each
    row is a ``FullReducePlan`` of `grid` blocks (``row_plan``), launched
    row after row.

    regime "columns" (inner > 1): the block is a tile of 32 columns by
    `lanes` = block / 32 threads along n; thread (c, r) folds elements
    r, r + lanes, ... of column c, so that a warp reads 32 neighbouring
    addresses, and the `lanes` values of each column are then folded.

    Blocks walk their work items (row groups or column tiles) with a
    grid-stride loop over `items`.
    """

    outer: int
    n: int
    inner: int
    block: int
    regime: str
    group: int
    items: int
    grid: int

    @property
    def lanes(self) -> int:
        return self.block // WARP

    @property
    def rows_per_block(self) -> int:
        return self.block // self.group

    @property
    def row_plan(self) -> FullReducePlan:
        """Each row's two launches in the split regime."""
        return FullReducePlan(n=self.n, block=self.block, grid=self.grid)


# Few long rows: the rows regime folds each row in one group of one block,
# so a sum over dim 1 of a (2, 10**8) array would keep two SMs busy. At most
# SPLIT_MAX_ROWS rows of at least SPLIT_MIN_ROW elements take the "split"
# regime instead: each row is a full reduction of its own (FullReducePlan: a
# grid of blocks writes partials to a small device buffer, then one block
# folds them into the row's result, on the device), the rows sharing the
# MAX_GRID blocks of one full reduction, one wave of an H100 or H200. The
# count is fixed, never read from the device, so that the summation order,
# which the CPU replays, never depends on the GPU. (2 x 132 blocks, two
# waves of bigger blocks, replayed 1.7x slower on the CPU: 10.6 against
# 6.1 ms for a (1, 10**8) float32 sum.) Tests lower the limits.
SPLIT_MIN_ROW = 1 << 16
SPLIT_MAX_ROWS = 8


def split_row_grid(outer: int, n: int, block: int) -> int:
    """Blocks per row of the split regime, or 0 where rows stay whole."""
    if not (0 < outer <= SPLIT_MAX_ROWS and n >= SPLIT_MIN_ROW):
        return 0
    grid = min(cdiv(n, block), cdiv(MAX_GRID, outer))
    return grid if grid > 1 else 0


def dim_reduce_plan(
    outer: int, n: int, inner: int, block: int = DEFAULT_BLOCK
) -> DimReducePlan:
    split = split_row_grid(outer, n, block) if inner == 1 else 0
    if split:
        return DimReducePlan(outer, n, inner, block, "split", block, outer, split)
    if inner == 1:
        group = min(block, next_pow2(n))
        items = cdiv(outer, block // group)
        regime = "rows"
    else:
        group = block // WARP
        items = outer * cdiv(inner, WARP)
        regime = "columns"
    grid = max(1, min(items, MAX_GRID))
    return DimReducePlan(outer, n, inner, block, regime, group, items, grid)


# --- softmax -----------------------------------------------------------------

# Rows up to this many bytes (of the accumulator type) run a warp per row,
# held in registers: 32 bytes a lane, 8 float32 or 4 float64 values, about 90
# registers a thread once the unrolled exponentials are scheduled. 16 float32
# values took 151-255 registers (one 256-thread block per SM) and 32 spilled;
# longer rows go to shared memory instead.
WARP_ROW_BYTES = 1024
# Softmax kernels take at most this many threads a block: their register use
# (up to ~95 a thread) times 1024 threads would exceed an SM's 65536
# registers, and the shared regime's row cache plus three block-sized scratch
# arrays must stay within 48 KiB. Kernels are compiled with this launch bound.
SOFTMAX_MAX_BLOCK = 512
# A block per row caches its row in shared memory when it fits in this many
# bytes: with the scratch of a 512-thread float64 block (3 x 4 KiB), below the
# 48 KiB a block may use without opting in, and small enough for several
# blocks per SM. Tests lower it to
# reach the streaming regime with short rows in the simulator.
SHARED_ROW_BYTES = 32 * 1024
# The CPU column regime works on strips of columns whose whole height fits in
# this much cache (L2), so its three sweeps over a strip read memory once when
# the dim is short. The strip is never narrower than CPU_STRIP_MIN columns:
# a row of a strip must span pages, not cache lines, or a sweep down a long
# dim misses the TLB on every row (measured: 16-column strips of a (4096,
# 4096) dim-0 softmax ran 2.4x slower than 1024-column strips).
CPU_STRIP_BYTES = 1024 * 1024
CPU_STRIP_MIN = 1024


def softmax_acc_dtype(dtype) -> np.dtype:
    """Arithmetic dtype of a softmax writing `dtype`: float16 computes in
    float32, float32 and float64 in themselves."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


@dataclass(frozen=True)
class SoftmaxPlan:
    """How softmax over `dim` of an array of `shape` runs, on either device.

    The array is viewed as (outer, n, inner) around `dim`. GPU `regime`:

    - "warp": inner == 1, n * itemsize <= WARP_ROW_BYTES. Blocks of `block` threads hold
      block / 32 rows, a warp per row, `values` elements per lane in
      registers; `items` = row groups.
    - "shared": inner == 1, the row fits `cache` elements of shared memory:
      a block per row, the row read once; `items` = rows.
    - "stream": inner == 1, longer rows: a block per row reading it twice
      (online max and sum, then normalise); `items` = rows.
    - "columns": inner > 1: tiles of 32 columns by block / 32 threads along
      n; `items` = outer * ceil(inner / 32) tiles.
    - "split" (asked for with `split_min_row`: softmax's and log_softmax's
      forward passes, logsumexp, the losses): at most SPLIT_MAX_ROWS rows
      of at least `split_min_row` elements. Each row is cut into `segments`
      pieces, a block per piece writing its statistics (max, sum of exp) to
      a small device buffer; one block per row merges them into the row's
      log-sum-exp; softmax then writes exp(x - lse) (or x - lse) in a
      grid-stride pass, a loss computes each row's loss from the merge.
      `items` = outer * segments.

    Blocks walk `items` with a grid-stride loop over `grid` blocks.
    CPU `cpu_regime`: "rows" (inner == 1: one row per task, rows in parallel)
    or "columns" (strips of `cpu_strip` columns, strips in parallel).
    """

    shape: tuple[int, ...]
    dim: int
    outer: int
    n: int
    inner: int
    block: int
    regime: str
    values: int
    cache: int
    items: int
    grid: int
    cpu_regime: str
    cpu_strip: int
    segments: int = 0


# softmax, log_softmax and logsumexp rows of at least this many elements, at
# most SPLIT_MAX_ROWS of them, take the "split" regime (see SoftmaxPlan): a
# block per row would keep a handful of SMs busy. Tests lower it.
SPLIT_MIN_SOFTMAX_ROW = 1 << 20
# cross_entropy (forward and backward) splits rows from the reductions' limit:
# its forward pass reads each logit once, as a reduction does, so a block
# per row costs what a reduction's rows regime costs: (8, 262144) float32
# logits, 1 MiB a row, would stream through 8 of 132 SMs.
SPLIT_MIN_LOSS_ROW = SPLIT_MIN_ROW


def softmax_plan(
    shape: tuple[int, ...],
    dim: int,
    dtype,
    block: int | None = None,
    split_min_row: int = 0,
) -> SoftmaxPlan:
    """The plan for softmax (and log_softmax, and their backward passes) of
    an array of `shape` and output `dtype` over `dim` (may be negative).
    `split_min_row`: at most SPLIT_MAX_ROWS rows of at least this many
    elements take the "split" regime (0: never; only the forward passes,
    logsumexp and the losses have its kernels)."""
    shape = tuple(int(s) for s in shape)
    block = check_block(block)
    if block > SOFTMAX_MAX_BLOCK:
        raise ValueError(
            f"block must be at most {SOFTMAX_MAX_BLOCK} for the softmax kernels "
            f"(registers and shared memory per block), got {block}"
        )
    if isinstance(dim, (tuple, list)) or dim is None:
        raise TypeError(f"softmax dim must be one int, got {dim!r}")
    dims = _layout.normalize_dims(dim, len(shape))
    dim = dims[0] if dims else 0  # a 0-d array is one slice of one element
    outer = math.prod(shape[:dim])
    n = shape[dim] if shape else 1
    inner = math.prod(shape[dim + 1 :])
    itemsize = softmax_acc_dtype(dtype).itemsize
    cache = SHARED_ROW_BYTES // itemsize
    values = 0
    if inner == 1 and n * itemsize <= WARP_ROW_BYTES:
        regime = "warp"
        values = next_pow2(cdiv(max(n, 1), WARP))
        items = cdiv(outer, block // WARP)
    elif inner == 1:
        regime = "shared" if n <= cache else "stream"
        items = outer
        if split_min_row and 0 < outer <= SPLIT_MAX_ROWS and n >= split_min_row:
            segments = min(cdiv(n, block), cdiv(MAX_GRID, outer))
            if segments > 1:
                regime, items = "split", outer * segments
    else:
        regime = "columns"
        items = outer * cdiv(inner, WARP)
    grid = max(1, min(items, MAX_GRID))
    strip = max(CPU_STRIP_MIN, CPU_STRIP_BYTES // (itemsize * max(n, 1)))
    strip = min(strip, max(inner, 1))
    return SoftmaxPlan(
        shape=shape,
        dim=dim,
        outer=outer,
        n=n,
        inner=inner,
        block=block,
        regime=regime,
        values=values,
        cache=cache if regime == "shared" else 0,
        items=items,
        grid=grid,
        cpu_regime="rows" if inner == 1 else "columns",
        cpu_strip=strip,
        segments=items // outer if regime == "split" else 0,
    )


# --- broadcasting (expand, where) ------------------------------------------------

# CPU work items cut rows into pieces of at most this many elements, so one
# long row (a broadcast along the last dim only) still uses every core.
BROADCAST_CHUNK = 1 << 16


@dataclass(frozen=True)
class BroadcastPlan:
    """How an elementwise op writes an output of `out_shape` from operands
    read with broadcast strides.

    `shape` and `strides` (in elements, one tuple per operand, 0 on broadcast
    dims) are the collapsed problem: size-1 dims dropped and dims that every
    operand walks as one merged. `contiguous`: every operand reads output
    element i at its own offset i (same shape, C order): the fast path with no
    index arithmetic. GPU: one thread per output element, `grid` blocks of
    `block` threads in a grid-stride loop, 64-bit indices. CPU: `items` work
    items, each `chunk` elements of one row of the last collapsed dim.
    """

    out_shape: tuple[int, ...]
    shape: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    n: int
    contiguous: bool
    block: int
    grid: int
    last: int
    chunk: int
    items: int


def broadcast_plan(
    out_shape: tuple[int, ...],
    operand_strides: Sequence[tuple[int, ...]],
    block: int | None = None,
) -> BroadcastPlan:
    """The plan for writing `out_shape` from operands whose element strides,
    already broadcast to `out_shape` (see ``_layout.broadcast_strides``), are
    `operand_strides`. Pure arithmetic on Python ints: a shape of more than
    2**31 elements can be planned (and its index arithmetic checked) without
    allocating it."""
    block = check_block(block)
    out_shape = tuple(int(s) for s in out_shape)
    n = math.prod(out_shape)
    shape, strides = _layout.collapse(out_shape, list(operand_strides))
    contiguous = len(shape) == 1 and all(s == (1,) for s in strides)
    last = shape[-1]
    chunk = max(1, min(last, BROADCAST_CHUNK))
    items = (n // last) * cdiv(last, chunk) if n else 0
    grid = max(1, min(cdiv(n, block), MAX_GRID))
    return BroadcastPlan(
        out_shape=out_shape,
        shape=shape,
        strides=tuple(strides),
        n=n,
        contiguous=contiguous,
        block=block,
        grid=grid,
        last=last,
        chunk=chunk,
        items=items,
    )
