"""Launch configuration: the one place that decides blocks, grids and groups.

Both devices read the same plan. The GPU launches exactly the grid the plan
names; the CPU kernels replay the GPU's association order from the same plan.
That is what makes a CPU sum and a GPU sum bit-identical, so nothing here may
depend on the GPU model, only on the problem size and the block size.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class DimReducePlan:
    """Reduce the middle axis of an (outer, n, inner) view.

    regime "rows" (inner == 1): the block is cut into groups of `group`
    threads (a power of two, at most `block`); each group folds one row, thread
    r of the group taking elements r, r + group, ... of the row. Short rows get
    small groups, so a warp can fold several rows at once.

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


def dim_reduce_plan(
    outer: int, n: int, inner: int, block: int = DEFAULT_BLOCK
) -> DimReducePlan:
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
