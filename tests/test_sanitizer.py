"""The simulator's sanitizer (softkern.testing.sanitizer): each check
catches a small deliberately buggy kernel, and correct kernels (barriers,
warp-synchronous code through shuffles and syncwarp, atomics) pass.

Every kernel here runs one or two blocks of 32-64 threads in the CUDA
simulator (conftest turns it on without a GPU); on a real GPU the file is
skipped, since compute-sanitizer does this job there.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import config, cuda

from softkern.testing import cudasim
from softkern.testing.cudasim import SanitizerError, sanitize

pytestmark = pytest.mark.skipif(
    not config.ENABLE_CUDASIM,
    reason="the sanitizer checks kernels in the CUDA simulator",
)

FULL = 0xFFFFFFFF


def launch(kernel, blocks, threads, *args):
    with sanitize():
        kernel[blocks, threads](*args)


# --- racecheck ------------------------------------------------------------------


@cuda.jit
def shared_write_write(out):
    sh = cuda.shared.array(1, np.float32)
    sh[0] = cuda.threadIdx.x  # every thread writes one element, unordered
    cuda.syncthreads()
    out[cuda.threadIdx.x] = sh[0]


@cuda.jit
def neighbour_read_without_barrier(out):
    sh = cuda.shared.array(64, np.float32)
    i = cuda.threadIdx.x
    sh[i] = 0
    cuda.syncthreads()
    sh[i] = i
    out[i] = sh[(i + 1) % 64]  # before or after the neighbour's write?


@cuda.jit
def neighbour_read_after_barrier(out):
    sh = cuda.shared.array(64, np.float32)
    i = cuda.threadIdx.x
    sh[i] = i
    cuda.syncthreads()
    out[i] = sh[(i + 1) % 64]


@cuda.jit
def warp_neighbour(out, synced):
    sh = cuda.shared.array(32, np.float32)
    lane = cuda.threadIdx.x
    sh[lane] = 0
    cuda.syncthreads()
    sh[lane] = lane
    if synced:
        cuda.syncwarp(FULL)
    out[lane] = sh[lane ^ 1]


@cuda.jit
def shuffle_orders_no_memory(out):
    sh = cuda.shared.array(32, np.float32)
    lane = cuda.threadIdx.x
    sh[lane] = lane
    total = cuda.shfl_xor_sync(FULL, lane, 1)  # a rendezvous of the warp
    out[lane] = sh[lane ^ 1] + total


@cuda.jit
def every_thread_writes_one_output(out):
    out[0] = cuda.threadIdx.x + cuda.blockIdx.x


@cuda.jit
def atomic_total(out):
    cuda.atomic.add(out, 0, 1.0)


def test_write_write_race_on_shared_memory():
    with pytest.raises(SanitizerError, match=r"racecheck: kernel shared_write_write"):
        launch(shared_write_write, 1, 32, np.zeros(32, np.float32))


def test_read_of_a_neighbour_without_barrier():
    with pytest.raises(SanitizerError, match=r"racecheck.*shared array.*writes it"):
        launch(neighbour_read_without_barrier, 1, 64, np.zeros(64, np.float32))


def test_barrier_separates():
    out = np.zeros(64, np.float32)
    launch(neighbour_read_after_barrier, 1, 64, out)
    np.testing.assert_array_equal(out, (np.arange(64) + 1) % 64)


def test_warp_needs_syncwarp():
    with pytest.raises(SanitizerError, match=r"no syncwarp joined by both"):
        launch(warp_neighbour, 1, 32, np.zeros(32, np.float32), False)
    out = np.zeros(32, np.float32)
    launch(warp_neighbour, 1, 32, out, True)
    np.testing.assert_array_equal(out, np.arange(32) ^ 1)
    # a shuffle moves registers: CUDA orders no memory access at one
    with pytest.raises(SanitizerError, match=r"racecheck"):
        launch(shuffle_orders_no_memory, 1, 32, np.zeros(32, np.float32))


def test_global_write_write_across_blocks():
    with pytest.raises(
        SanitizerError, match=r"racecheck.*global array out.*index \(0,\)"
    ):
        launch(every_thread_writes_one_output, 2, 32, np.zeros(1, np.float32))


def test_atomics_do_not_race():
    out = np.zeros(1, np.float32)
    launch(atomic_total, 2, 32, out)
    assert out[0] == 64


@cuda.jit
def slice_writes(out, racy):
    sh = cuda.shared.array(64, np.float32)
    t = cuda.threadIdx.x
    if racy:
        sh[0:64] = t  # every thread writes every element
    else:
        sh[t : t + 1] = t  # each its own element, through a slice
    cuda.syncthreads()
    out[t] = sh[63 - t]


@cuda.jit
def atomics_write_shared(out):
    sh = cuda.shared.array(2, np.int32)
    t = cuda.threadIdx.x
    if t == 0:
        cuda.atomic.exch(sh, 0, 5)
        cuda.atomic.compare_and_swap(sh[1:], 7, 9)  # no index: element 0
    cuda.syncthreads()
    out[t] = sh[0]


RECORD = np.dtype([("a", np.float32), ("b", np.int32)])


@cuda.jit
def record_fields(out):
    sh = cuda.shared.array(32, RECORD)
    t = cuda.threadIdx.x
    sh[t]["a"] = t  # a field store: the simulator's own record view
    cuda.syncthreads()
    out[t] = sh[31 - t]["a"]


def test_shared_records_run_unchecked_and_unchanged():
    out = np.zeros(32, np.float32)
    launch(record_fields, 1, 32, out)
    np.testing.assert_array_equal(out, 31 - np.arange(32))


def test_slice_assignment_writes_each_element():
    out = np.zeros(64, np.float32)
    launch(slice_writes, 1, 64, out, False)
    np.testing.assert_array_equal(out, 63 - np.arange(64))
    with pytest.raises(SanitizerError, match=r"racecheck.*writes it and.*writes it"):
        launch(slice_writes, 1, 64, out, True)


def test_atomic_writes_count_for_initcheck():
    out = np.zeros(32, np.int32)
    launch(atomics_write_shared, 1, 32, out)
    assert (out == 5).all()


# --- initcheck -------------------------------------------------------------------


@cuda.jit
def reads_unwritten_shared(out):
    sh = cuda.shared.array(64, np.float32)
    i = cuda.threadIdx.x
    if i < 32:
        sh[i] = i
    cuda.syncthreads()
    out[i] = sh[i]  # threads 32..63 read what nobody wrote


def test_read_of_unwritten_shared_memory():
    with pytest.raises(SanitizerError, match=r"initcheck.*no thread of the block"):
        launch(reads_unwritten_shared, 1, 64, np.zeros(64, np.float32))


def test_a_second_block_does_not_inherit_the_first_blocks_writes():
    # the simulator reuses one shared array for every block: the values of
    # block 0 are there when block 1 starts, as garbage is on a GPU
    with pytest.raises(SanitizerError, match=r"initcheck"):
        launch(reads_unwritten_shared, 2, 64, np.zeros(64, np.float32))


# --- memcheck -------------------------------------------------------------------


@cuda.jit
def reads_left_neighbour(out, x):
    i = cuda.threadIdx.x
    out[i] = x[i - 1]  # x[-1] for thread 0: NumPy wraps, a GPU reads before x


@cuda.jit
def writes_past_the_end(out):
    out[cuda.threadIdx.x + 1] = 1.0


@cuda.jit
def local_out_of_range(out):
    scratch = cuda.local.array(4, np.float32)
    for j in range(5):
        scratch[j] = j
    out[cuda.threadIdx.x] = scratch[0]


@cuda.jit
def row_before(out, x):
    i = cuda.threadIdx.x
    row = x[i - 1, :]  # a slice beside a negative index: still checked
    out[i] = row[0]


@cuda.jit
def iterates(out, x):
    total = 0.0
    for v in x:
        total += v
    out[cuda.threadIdx.x] = total


def test_negative_index_beside_a_slice():
    with pytest.raises(SanitizerError, match=r"memcheck.*\(-1, slice"):
        launch(row_before, 1, 32, np.zeros(32), np.ones((32, 2)))


def test_iterating_over_an_array_is_in_range():
    out = np.zeros(32)
    launch(iterates, 1, 32, out, np.arange(4.0))
    assert (out == 6).all()


def test_negative_index_into_a_global_array():
    with pytest.raises(
        SanitizerError, match=r"memcheck.*index \(-1,\) of global array x"
    ):
        launch(reads_left_neighbour, 1, 32, np.zeros(32), np.ones(32))


def test_index_past_the_end():
    with pytest.raises(SanitizerError, match=r"memcheck.*out of range in dim 0"):
        launch(writes_past_the_end, 1, 32, np.zeros(32))


def test_local_array_out_of_range():
    with pytest.raises(SanitizerError, match=r"memcheck.*local array"):
        launch(local_out_of_range, 1, 32, np.zeros(32, np.float32))


# --- synccheck ------------------------------------------------------------------


@cuda.jit
def early_return_before_barrier(out):
    i = cuda.threadIdx.x
    if i >= 16:
        return
    cuda.syncthreads()
    out[i] = 1.0


@cuda.jit
def divergent_barriers(out):
    i = cuda.threadIdx.x
    if i % 2:
        cuda.syncthreads()
    else:
        cuda.syncthreads()
    out[i] = 1.0


def test_barrier_some_threads_never_reach():
    with pytest.raises(
        SanitizerError, match=r"synccheck.*reached by 16 of the block's 32"
    ):
        launch(early_return_before_barrier, 1, 32, np.zeros(32))


def test_threads_at_different_barriers():
    with pytest.raises(SanitizerError, match=r"synccheck.*different syncthreads"):
        launch(divergent_barriers, 1, 32, np.zeros(32))


@cuda.jit
def spins_while_others_wait(flag):
    if cuda.threadIdx.x == 0:
        while flag[0] == 0:  # set only after the barrier it keeps waiting
            pass
    cuda.syncthreads()
    flag[0] = 1


def test_barrier_that_would_hang_raises(monkeypatch):
    from softkern.testing import sanitizer

    monkeypatch.setattr(sanitizer, "TIMEOUT", 0.5)
    with pytest.raises(SanitizerError, match=r"synccheck.*no thread arriving"):
        launch(spins_while_others_wait, 1, 32, np.zeros(1, np.int32))


def test_off_without_the_switch(monkeypatch):
    # the same buggy kernel runs unchecked (as it always did) when off
    monkeypatch.delenv("SOFTKERN_SANITIZE", raising=False)
    neighbour_read_without_barrier[1, 64](np.zeros(64, np.float32))
    assert cudasim.is_installed()
