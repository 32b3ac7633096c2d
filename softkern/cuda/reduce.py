"""GPU reductions: the three block strategies and the kernels built on them.

Every kernel here is made by a cached factory, because a kernel's shared
memory size, its element type and its fold operation must be compile-time
constants. The factories take the block size as an argument so that tests can
build 32- and 64-thread kernels for the simulator; the launch configuration
itself is chosen in ``softkern._launch``, never here.

The association order of every fold is part of the contract: ``softkern.cpu.
reduce`` replays it element for element, and a change here must be mirrored
there (the bitwise CPU-vs-GPU tests catch a mismatch).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, int64
from numba.np.numpy_support import from_dtype

from softkern._dtypes import is_float
from softkern._launch import WARP
from softkern.cuda.convert import kernel_dtype, loader, storer

FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True, inline=True)
def add(a, b):
    return a + b


@cuda.jit(device=True, inline=True)
def maximum(a, b):
    # `a != a` is the NaN test: a NaN on either side wins, as in torch.amax.
    return a if (a > b) | (a != a) else b


@cuda.jit(device=True, inline=True)
def minimum(a, b):
    return a if (a < b) | (a != a) else b


COMBINE = {"sum": add, "amax": maximum, "amin": minimum}


def identity(op: str, dtype: np.dtype) -> np.generic:
    """The value a thread with no elements contributes to the fold (of an
    accumulator dtype: ``acc_dtype``)."""
    if op == "sum":
        return dtype.type(0)
    if dtype.kind == "f":
        return dtype.type(-np.inf if op == "amax" else np.inf)
    info = np.iinfo(dtype)
    return dtype.type(info.min if op == "amax" else info.max)


@functools.cache
def group_reducer(op: str, strategy: int, group: int, pitch: int, block: int, dtype):
    """Device function folding `group` values spread over a block's threads.

    Thread `tid` (linear id in a block of `block` threads) belongs to the
    group whose members are tid = base + r * pitch, r = 0 .. group-1; it passes
    its value and gets the group's fold back when r == 0 (other threads get
    an unspecified value). pitch 1 folds runs of neighbouring threads (a row
    per group); pitch 32 folds one column of a 32-wide tile.

    Launch config: 1-D blocks of exactly `block` threads; `group` a power of
    two dividing block / pitch. Every thread of the block must call it the same
    number of times (it holds barriers), and with strategy 2 every warp must be
    complete. Shared memory: `block` values for strategies 0 and 1, `block`
    for 2 with pitch 32, block / 32 for 2 with pitch 1.
    """
    combine = COMBINE[op]
    nbtype = from_dtype(np.dtype(dtype))

    if strategy == 0:

        @cuda.jit(device=True)
        def fold_interleaved(value):
            """Interleaved pairs: at stride s = 1, 2, 4, ... the member with
            r % (2s) == 0 adds the member r + s. Half the lanes of every warp
            idle at each step (divergence) and strides scatter over the banks:
            the slow baseline."""
            tmp = cuda.shared.array(block, nbtype)
            tid = cuda.threadIdx.x
            r = (tid // pitch) % group
            tmp[tid] = value
            cuda.syncthreads()
            stride = 1
            while stride < group:
                if r % (2 * stride) == 0:
                    tmp[tid] = combine(tmp[tid], tmp[tid + stride * pitch])
                cuda.syncthreads()
                stride *= 2
            result = tmp[tid]
            # Hazard: a caller looping over rows writes tmp again next time.
            cuda.syncthreads()
            return result

        return fold_interleaved

    if strategy == 1:

        @cuda.jit(device=True)
        def fold_halving(value):
            """Sequential halving: at stride s = group/2, group/4, ..., 1 the
            members r < s add member r + s. Active threads stay contiguous, so
            whole warps retire together and accesses are conflict-free."""
            tmp = cuda.shared.array(block, nbtype)
            tid = cuda.threadIdx.x
            r = (tid // pitch) % group
            tmp[tid] = value
            cuda.syncthreads()
            stride = group // 2
            while stride > 0:
                if r < stride:
                    tmp[tid] = combine(tmp[tid], tmp[tid + stride * pitch])
                cuda.syncthreads()
                stride //= 2
            result = tmp[tid]
            cuda.syncthreads()  # hazard: as in fold_interleaved
            return result

        return fold_halving

    if pitch == 1 and group <= WARP:

        @cuda.jit(device=True)
        def fold_shuffle_small(value):
            """Warp shuffle inside a warp: shfl_down by group/2, ..., 1. Member
            r < s reads member r + s of the same aligned group, so member 0
            ends with the halving order over the group; no shared memory and
            no barrier."""
            offset = group // 2
            while offset > 0:
                value = combine(value, cuda.shfl_down_sync(FULL_MASK, value, offset))
                offset //= 2
            return value

        return fold_shuffle_small

    if pitch == 1:
        warps_per_group = group // WARP
        warps_per_block = block // WARP  # shared array sizes must be constants

        @cuda.jit(device=True)
        def fold_shuffle(value):
            """Warp shuffle, then across warps: each warp folds its 32 values
            with shfl_down 16, 8, 4, 2, 1; lane 0 writes the warp's value to
            shared memory; the first warp of each group loads those and folds
            them with shfl_down again."""
            warp_values = cuda.shared.array(warps_per_block, nbtype)
            tid = cuda.threadIdx.x
            lane = tid % WARP
            warp = tid // WARP
            offset = WARP // 2
            while offset > 0:
                value = combine(value, cuda.shfl_down_sync(FULL_MASK, value, offset))
                offset //= 2
            if lane == 0:
                warp_values[warp] = value
            cuda.syncthreads()
            if warp % warps_per_group == 0:  # uniform over the warp
                if lane < warps_per_group:
                    value = warp_values[warp + lane]
                # Lanes >= warps_per_group keep stale values, but the
                # offsets never carry them down to lane 0.
                offset = warps_per_group // 2
                while offset > 0:
                    value = combine(
                        value, cuda.shfl_down_sync(FULL_MASK, value, offset)
                    )
                    offset //= 2
            cuda.syncthreads()  # hazard: warp_values is reused next call
            return value

        return fold_shuffle

    columns_per_warp = WARP // group

    @cuda.jit(device=True)
    def fold_shuffle_transposed(value):
        """Warp shuffle for a column tile (pitch 32): the `group` values of a
        column live in different warps, so they go through shared memory
        once, transposed, so that one warp holds 32 // group columns of
        `group` values each in aligned lane groups; shfl_down by group/2, ...,
        1 folds each (halving order) and member 0 writes the value back to its
        column's slot in row 0."""
        tmp = cuda.shared.array(block, nbtype)
        tid = cuda.threadIdx.x
        tmp[tid] = value
        cuda.syncthreads()
        lane = tid % WARP
        column = (tid // WARP) * columns_per_warp + lane // group
        part = lane % group
        carried = tmp[part * WARP + column]
        offset = group // 2
        while offset > 0:
            carried = combine(carried, cuda.shfl_down_sync(FULL_MASK, carried, offset))
            offset //= 2
        cuda.syncthreads()
        if part == 0:
            tmp[column] = carried
        cuda.syncthreads()
        result = tmp[tid % WARP]
        cuda.syncthreads()  # hazard: tmp is reused next call
        return result

    return fold_shuffle_transposed


def acc_dtype(op: str, dtype: np.dtype) -> np.dtype:
    """The accumulator dtype: sums of bool and integers count in int64 (as
    NumPy and PyTorch), float16 and bfloat16 compute in float32 (as PyTorch),
    and the max and min of bool and 8/16-bit integers fold in int32 (exact;
    the warp shuffles move 32-bit values)."""
    if dtype.itemsize == 2 and is_float(dtype):
        return np.dtype(np.float32)
    if dtype.kind in "biu":
        if op == "sum":
            return np.dtype(np.int64)
        if dtype.itemsize < 4:
            return np.dtype(np.int32)
    return dtype


def result_dtype(op: str, dtype: np.dtype) -> np.dtype:
    """The result dtype: int64 for sums of bool and integers, else the
    input's (the 16-bit floats' float32 result rounded to them)."""
    if op == "sum" and dtype.kind in "biu":
        return np.dtype(np.int64)
    return dtype


@functools.cache
def full_kernel(op: str, strategy: int, block: int, dtype, out_dtype=None):
    """Stage kernel of a full reduction (sum, amax, amin) of a 1-D array.

    Thread t of the grid folds x[t], x[t + S], x[t + 2S], ... (S = grid size in
    threads) in that order, starting from the identity; the block folds its
    threads' values with `strategy`; thread 0 writes one partial per block.
    The same kernel with grid = 1 over the partials is the second stage (the
    seed's gridsum/gridmax), so the partials never leave the GPU.

    Launch config: ``FullReducePlan`` (grid blocks of `block` threads), then
    [1, block] over the partials.
    """
    dtype = np.dtype(dtype)
    acc_dt = acc_dtype(op, dtype)
    load = loader(dtype, acc_dt)
    store = storer(acc_dt if out_dtype is None else np.dtype(out_dtype))
    start = identity(op, acc_dt)
    combine = COMBINE[op]
    fold = group_reducer(op, strategy, block, 1, block, acc_dt)

    @cuda.jit
    def reduce_stage(x, partials):
        tid = cuda.threadIdx.x
        stride = int64(cuda.gridDim.x) * block
        i = int64(cuda.blockIdx.x) * block + tid
        n = x.size
        acc = start
        # Four independent loads in flight per thread; the folds stay in
        # element order, so the CPU replays the same order.
        while i + 3 * stride < n:
            a0 = load(x[i])
            a1 = load(x[i + stride])
            a2 = load(x[i + 2 * stride])
            a3 = load(x[i + 3 * stride])
            acc = combine(combine(combine(combine(acc, a0), a1), a2), a3)
            i += 4 * stride
        while i < n:
            acc = combine(acc, load(x[i]))
            i += stride
        acc = fold(acc)
        if tid == 0:
            partials[cuda.blockIdx.x] = store(acc)

    return reduce_stage


@functools.cache
def dot_kernel(strategy: int, block: int, dtype):
    """First stage of ``dot``: like ``full_kernel("sum")`` but thread t folds
    fma(x[i], y[i], acc) over its elements, a single rounding per product.
    The second stage is ``full_kernel("sum")`` over the partials.

    Launch config: ``FullReducePlan``, as ``full_kernel``.
    """
    dtype = np.dtype(dtype)
    start = dtype.type(0)
    fold = group_reducer("sum", strategy, block, 1, block, dtype)

    @cuda.jit
    def dot_stage(x, y, partials):
        tid = cuda.threadIdx.x
        stride = int64(cuda.gridDim.x) * block
        i = int64(cuda.blockIdx.x) * block + tid
        n = x.size
        acc = start
        while i + 3 * stride < n:
            a0 = x[i]
            b0 = y[i]
            a1 = x[i + stride]
            b1 = y[i + stride]
            a2 = x[i + 2 * stride]
            b2 = y[i + 2 * stride]
            a3 = x[i + 3 * stride]
            b3 = y[i + 3 * stride]
            acc = cuda.fma(
                a3, b3, cuda.fma(a2, b2, cuda.fma(a1, b1, cuda.fma(a0, b0, acc)))
            )
            i += 4 * stride
        while i < n:
            acc = cuda.fma(x[i], y[i], acc)
            i += stride
        acc = fold(acc)
        if tid == 0:
            partials[cuda.blockIdx.x] = acc

    return dot_stage


@functools.cache
def rows_kernel(op: str, strategy: int, group: int, block: int, dtype):
    """Fold each row of a 2-D (rows, n) view into out[row].

    A group of `group` neighbouring threads owns a row: member r folds
    x[row, r], x[row, r + group], ... in order (neighbours read neighbours),
    then the group folds with `strategy`. Blocks walk groups of
    block // group rows with a grid-stride loop.

    Launch config: ``DimReducePlan`` regime "rows": [grid, block].
    """
    dtype = np.dtype(dtype)
    acc_dt = acc_dtype(op, dtype)
    load = loader(dtype, acc_dt)
    store = storer(result_dtype(op, dtype))
    start = identity(op, acc_dt)
    combine = COMBINE[op]
    fold = group_reducer(op, strategy, group, 1, block, acc_dt)
    rows_per_block = block // group

    @cuda.jit
    def reduce_rows(x, out):
        tid = cuda.threadIdx.x
        member = tid % group
        rows, n = x.shape
        item = int64(cuda.blockIdx.x)
        items = (rows + rows_per_block - 1) // rows_per_block
        while item < items:  # uniform over the block: fold holds barriers
            row = item * rows_per_block + tid // group
            acc = start
            if row < rows:
                j = member
                while j < n:
                    acc = combine(acc, load(x[row, j]))
                    j += group
            acc = fold(acc)
            if member == 0 and row < rows:
                out[row] = store(acc)
            item += cuda.gridDim.x

    return reduce_rows


@functools.cache
def columns_kernel(op: str, strategy: int, block: int, dtype):
    """Fold the middle axis of a 3-D (outer, n, inner) view into out[o, c].

    The block is a tile of 32 columns by lanes = block // 32: thread
    (c, r) = (tid % 32, tid // 32) folds x[o, r, c], x[o, r + lanes, c], ...
    so each warp reads 32 neighbouring addresses of one row; then the lanes
    values of each column are folded with `strategy`. Blocks walk the
    outer * ceil(inner / 32) tiles with a grid-stride loop.

    Launch config: ``DimReducePlan`` regime "columns": [grid, block].
    """
    dtype = np.dtype(dtype)
    acc_dt = acc_dtype(op, dtype)
    load = loader(dtype, acc_dt)
    store = storer(result_dtype(op, dtype))
    start = identity(op, acc_dt)
    combine = COMBINE[op]
    lanes = block // WARP
    fold = group_reducer(op, strategy, lanes, WARP, block, acc_dt)

    @cuda.jit
    def reduce_columns(x, out):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        part = tid // WARP
        outer, n, inner = x.shape
        tiles = (inner + WARP - 1) // WARP
        item = int64(cuda.blockIdx.x)
        while item < outer * tiles:  # uniform over the block
            o = item // tiles
            c = (item % tiles) * WARP + lane
            acc = start
            if c < inner:
                i = part
                while i < n:
                    acc = combine(acc, load(x[o, i, c]))
                    i += lanes
            acc = fold(acc)
            if part == 0 and c < inner:
                out[o, c] = store(acc)
            item += cuda.gridDim.x

    return reduce_columns


# --- host launchers ----------------------------------------------------------


def launch_full(op, x, out, plan, strategy, stream, empty, dtype):
    """Two launches: per-block partials, then one block folds them into out[0].

    `x` is a 1-D device array (any strides) of `dtype` elements (bfloat16:
    their bits), `out` a 1-element device array of the result dtype,
    `empty(shape, dtype)` allocates device scratch with the caller's allocator.
    """
    dtype = np.dtype(dtype)
    acc_dt = acc_dtype(op, dtype)
    partials = empty((plan.grid,), acc_dt)
    full_kernel(op, strategy, plan.block, dtype)[plan.grid, plan.block, stream](
        x, partials
    )
    full_kernel(op, strategy, plan.block, acc_dt, result_dtype(op, dtype))[
        1, plan.block, stream
    ](partials, out)


def launch_dot(x, y, out, plan, strategy, stream, empty):
    dtype = np.dtype(x.dtype)
    partials = empty((plan.grid,), dtype)
    dot_kernel(strategy, plan.block, dtype)[plan.grid, plan.block, stream](
        x, y, partials
    )
    full_kernel("sum", strategy, plan.block, dtype)[1, plan.block, stream](
        partials, out
    )


def launch_split(op, x, out, plan, strategy, stream, empty, dtype):
    """Reduce each row of a (rows, n) view into out[row] as a full reduction
    of its own (``DimReducePlan`` regime "split": few long rows): two
    launches per row, the row's partials in a scratch of `plan.grid` values.

    Launch config: ``plan.row_plan`` per row, `plan.grid` blocks of
    `plan.block` threads, then one block; at most ``_launch.SPLIT_MAX_ROWS``
    rows, so at most 16 launches.
    """
    for row in range(x.shape[0]):
        launch_full(
            op, x[row], out[row : row + 1], plan.row_plan, strategy, stream, empty,
            dtype,
        )  # fmt: skip


def launch_dim(op, x, out, plan, strategy, stream, dtype):
    """Reduce a (rows, n) view into out[rows], or (outer, n, inner) into
    out[outer, inner], as ``DimReducePlan`` says; x holds `dtype` elements
    (bfloat16: their bits)."""
    dtype = np.dtype(dtype)
    if plan.regime == "rows":
        kernel = rows_kernel(op, strategy, plan.group, plan.block, dtype)
    else:
        kernel = columns_kernel(op, strategy, plan.block, dtype)
    kernel[plan.grid, plan.block, stream](x, out)


# --- catalogue for compile checks -------------------------------------------

# The dtypes the public functions accept (ops/reduce.py reads these).
REDUCE_DTYPES = ("float32", "float64", "int32", "int64")
# ... and these too, compiled for the default strategy only in ``ptx_cases``
# (their folds are the same code as float32's and int32's).
SMALL_DTYPES = ("float16", "bfloat16", "bool", "int8", "uint8", "int16")
FLOAT_DTYPES = ("float32", "float64")  # dot


def ptx_cases(block: int = 256):
    """Every kernel of this module with the argument types it is launched with.

    Yields (name, kernel, argtypes, dtype, strategy) for each supported dtype,
    strategy and regime (the SMALL_DTYPES with reduce=2 only), so tests can
    compile each one for real with ``numba.cuda.compile_ptx`` (no GPU needed)
    and inspect the PTX.
    """
    from softkern._dtypes import dtype_named

    for name in REDUCE_DTYPES + SMALL_DTYPES:
        dtype = dtype_named(name)
        t = from_dtype(kernel_dtype(dtype))
        strategies = (2,) if name in SMALL_DTYPES else (0, 1, 2)
        for strategy in strategies:
            for op in ("sum", "amax", "amin"):
                out = from_dtype(kernel_dtype(result_dtype(op, dtype)))
                yield (
                    f"full/{op}/{name}/r{strategy}",
                    full_kernel(op, strategy, block, dtype),
                    (t[:], from_dtype(acc_dtype(op, dtype))[::1]),
                    name,
                    strategy,
                )
                acc = acc_dtype(op, dtype)
                if acc != dtype:  # the second stage: partials to the result
                    yield (
                        f"full2/{op}/{name}/r{strategy}",
                        full_kernel(op, strategy, block, acc, result_dtype(op, dtype)),
                        (from_dtype(acc)[::1], out[::1]),
                        name,
                        strategy,
                    )
                for group in (8, WARP, block):
                    yield (
                        f"rows{group}/{op}/{name}/r{strategy}",
                        rows_kernel(op, strategy, group, block, dtype),
                        (t[:, :], out[::1]),
                        name,
                        strategy,
                    )
                yield (
                    f"columns/{op}/{name}/r{strategy}",
                    columns_kernel(op, strategy, block, dtype),
                    (t[:, :, :], out[:, :]),
                    name,
                    strategy,
                )
            if name in FLOAT_DTYPES:
                yield (
                    f"dot/{name}/r{strategy}",
                    dot_kernel(strategy, block, dtype),
                    (t[:], t[:], t[::1]),
                    name,
                    strategy,
                )
