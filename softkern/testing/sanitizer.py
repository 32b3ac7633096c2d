"""A sanitizer for kernels run in Numba's CUDA simulator: what NVIDIA's
compute-sanitizer finds on a GPU (racecheck, initcheck, memcheck,
synccheck), found in the simulator, where those bugs otherwise pass.

The simulator runs a block's threads as Python threads and its arrays are
NumPy arrays, so a kernel that forgets a ``syncthreads`` still reads the
right values (threads interleave at the GIL's pace), a shared element nobody
wrote holds what the previous block left, and an index past the end may read
a neighbour's memory unnoticed. Turned
on (``SOFTKERN_SANITIZE=1`` in the environment, or ``with sanitize():``),
every ``@cuda.jit`` kernel the simulator runs, softkern's or a user's, sees
its array arguments, ``cuda.shared.array`` and ``cuda.local.array`` through
checking views, and its block runs in a loop that watches the barriers:

- **memcheck**: an index that is negative or past the end of its dim, into a
  global, shared or local array. Numba wraps a negative index around on
  both devices, as NumPy does, but a kernel computing ``x[i - 1]`` nearly
  never means the last element at i = 0: it is reported too.
- **initcheck**: a read of a shared element no thread of the block has
  written in this launch.
- **racecheck**: two threads of a block touch one shared element, at least
  one writing, with nothing ordering them; and two threads of a launch write
  one global element unordered (threads of different blocks are never
  ordered). Ordering: a ``syncthreads`` between the accesses, or, for lanes of
  one warp, a ``syncwarp`` that both lanes joined in between (tracked with a
  vector clock per lane over its warp; a barrier orders everything before
  it). Shuffles and votes exchange registers, not memory: CUDA orders memory
  only at ``syncwarp`` and ``syncthreads``, so they order nothing here.
  Atomics never race, and an atomic write counts as a write for initcheck.
- **synccheck**: a ``syncthreads`` released while some threads of the block
  had exited without reaching it, or with threads waiting at different
  ``syncthreads`` calls; and a barrier whose other threads never come
  (``TIMEOUT``) raises instead of hanging.

Each finding raises :class:`SanitizerError` in the launching thread, naming
the check, the kernel, the array and index, and the threads (block, thread)
involved. Array arguments are named after the kernel's parameters, shared
and local arrays after the line that allocates them.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

ENV = "SOFTKERN_SANITIZE"
WARP_SIZE = 32
#: Seconds a barrier may wait with no thread arriving before synccheck fails
#: (generous: a thread of the simulator may run a long serial stretch).
TIMEOUT = 120.0

_lock = threading.Lock()
_active = 0
_STATE = "_softkern_sanitizer"


class SanitizerError(RuntimeError):
    """A kernel did what is undefined on a GPU (see the module's checks)."""


def enabled() -> bool:
    """Whether kernels run in the simulator are checked now."""
    return _active > 0 or os.environ.get(ENV, "") not in ("", "0")


@contextlib.contextmanager
def sanitize() -> Iterator[None]:
    """Check every kernel the simulator runs inside the block."""
    global _active
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


# --- who and where ---------------------------------------------------------------


def _kernel_thread() -> Any:
    """The simulator thread running, or None on the host."""
    thread = threading.current_thread()
    return thread if hasattr(thread, "_manager") else None


def _who(thread: Any) -> str:
    return f"thread {tuple(thread.threadIdx)} of block {tuple(thread.blockIdx)}"


_SKIPPED_FILES = ("numba/cuda/simulator", "numba_cuda/numba/cuda/simulator")


def _site() -> tuple[tuple[str, int], ...]:
    """The kernel's frames calling into the simulator (innermost first): a
    barrier's identity, a shared array's name."""
    frame = sys._getframe(1)
    here = os.path.dirname(__file__)
    sites = []
    while frame is not None and len(sites) < 4:
        name = frame.f_code.co_filename
        if not (
            any(part in name.replace(os.sep, "/") for part in _SKIPPED_FILES)
            or os.path.dirname(name) == here
            or name == threading.__file__
        ):
            sites.append((name, frame.f_lineno))
        frame = frame.f_back
    return tuple(sites)


def _where(site: tuple[tuple[str, int], ...]) -> str:
    if not site:
        return "?"
    name, line = site[0]
    return f"{os.path.basename(name)}:{line}"


# --- the launch and the block ------------------------------------------------------


class _Access(NamedTuple):
    thread: Any  # the BlockThread
    block: tuple[int, ...]
    epoch: int  # the block's barrier count at the access
    clock: int  # the thread's own warp clock at the access
    write: bool


class _Launch:
    """One kernel launch: its name, its parameters' names, the global
    elements written so far (by address)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = getattr(kernel, "__name__", str(kernel))
        try:
            self.names = list(inspect.signature(kernel).parameters)
        except (TypeError, ValueError):
            self.names = []
        self.writes: dict[int, _Access] = {}
        self.lock = threading.Lock()

    def name(self, position: int) -> str:
        if position < len(self.names):
            return self.names[position]
        return f"argument {position}"


class _Block:
    """One block's barrier count, its lanes' warp clocks, and the shared
    elements' accesses since they were last written (by address)."""

    def __init__(self, manager: Any, launch: _Launch) -> None:
        self.launch = launch
        self.epoch = 0
        self.lock = threading.Lock()
        self.clocks: dict[int, list[int]] = {}
        self.written: set[int] = set()
        self.last_write: dict[int, _Access] = {}
        self.reads: dict[int, dict[int, _Access]] = {}
        self.shared: dict[int, _Checked] = {}

    def clock(self, thread_id: int) -> list[int]:
        clock = self.clocks.get(thread_id)
        if clock is None:
            clock = self.clocks[thread_id] = [0] * WARP_SIZE
            clock[thread_id % WARP_SIZE] = 1
        return clock

    def access(self, thread: Any, write: bool) -> _Access:
        own = self.clock(thread.thread_id)[thread.thread_id % WARP_SIZE]
        return _Access(thread, tuple(thread.blockIdx), self.epoch, own, write)

    def ordered(self, before: _Access, thread: Any) -> bool:
        """Whether `before` happens before what `thread` does now."""
        other = before.thread
        if other is thread or before.epoch != self.epoch:
            return True  # the same thread, or a barrier between
        if other.thread_id // WARP_SIZE != thread.thread_id // WARP_SIZE:
            return False
        return self.clock(thread.thread_id)[other.thread_id % WARP_SIZE] >= before.clock

    def warp_round(self, warp: int, lanes: Iterable[int]) -> None:
        """The lanes completed a warp intrinsic together: each learns what
        the others did before it, then moves its own clock on."""
        with self.lock:
            ids = [warp * WARP_SIZE + lane for lane in lanes]
            joined = [max(c) for c in zip(*(self.clock(t) for t in ids), strict=True)]
            for t in ids:
                clock = self.clocks[t] = list(joined)
                clock[t % WARP_SIZE] += 1


def _launch_of(manager: Any) -> _Launch:
    from numba.cuda.simulator.kernel import _get_kernel_context

    module = _get_kernel_context()
    launch = getattr(module, _STATE, None)
    if launch is None:
        launch = _Launch(manager._f)
        setattr(module, _STATE, launch)
    return launch


def _block_of(manager: Any) -> _Block | None:
    return getattr(manager, _STATE, None)


def warp_round(manager: Any, warp: int, lanes: Iterable[int]) -> None:
    """Called by ``softkern.testing.cudasim`` when a ``syncwarp`` completes:
    its lanes are ordered from then on."""
    block = _block_of(manager)
    if block is not None:
        block.warp_round(warp, lanes)


# --- checked arrays --------------------------------------------------------------


def _fail(kind: str, launch: _Launch, what: str) -> None:
    raise SanitizerError(f"{kind}: kernel {launch.kernel}: {what}")


def _as_index(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _stop_if_aborted() -> None:
    """A thread of a block that failed stops at its next access: one spinning
    on memory (waiting for a flag) would otherwise run forever."""
    thread = _kernel_thread()
    if thread is not None and thread.abort:
        raise RuntimeError("aborted: another thread of the block failed")


class _Checked:
    """A kernel's view of one array: indices checked, accesses recorded.
    `space`: "global", "shared" or "local"."""

    __slots__ = ("_array", "_base", "_launch", "_name", "_space")

    def __init__(self, array: np.ndarray, name: str, space: str, launch: _Launch):
        self._array = array
        self._base = array.__array_interface__["data"][0]
        self._name = name
        self._space = space
        self._launch = launch

    # what kernels read of an array besides its elements
    shape = property(lambda self: self._array.shape)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    dtype = property(lambda self: self._array.dtype)
    strides = property(lambda self: self._array.strides)

    def __len__(self) -> int:
        return len(self._array)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self._array)):
            yield self[i]

    def _element(self, index: Any) -> tuple[int, ...] | None:
        """The full integer index of one element, checked (memcheck); None
        for anything else (a slice, fewer indices: a view), whose integer
        parts are checked all the same."""
        parts = index if isinstance(index, tuple) else (index,)
        ints = [_as_index(p) for p in parts]
        shape = self._array.shape
        for dim, (i, size) in enumerate(zip(ints, shape, strict=False)):
            if i is not None and not 0 <= i < size:
                thread = _kernel_thread()
                who = f" by {_who(thread)}" if thread is not None else ""
                shown = tuple(
                    p if i is None else i for p, i in zip(parts, ints, strict=True)
                )
                _fail(
                    "memcheck",
                    self._launch,
                    f"index {shown} of {self._space} array {self._name} "
                    f"(shape {shape}) is out of range in dim {dim}{who}",
                )
        if any(i is None for i in ints) or len(ints) != len(shape):
            return None
        return tuple(ints)

    def _view(self, index: Any) -> Any:
        view = self._array[index]
        if isinstance(view, np.ndarray):
            return _Checked(view, f"{self._name}[{index}]", self._space, self._launch)
        return view

    def __getitem__(self, index: Any) -> Any:
        _stop_if_aborted()
        element = self._element(index)
        if element is None:
            return self._view(index)
        value = self._array[element]
        self._record(element, write=False)
        return value

    def __setitem__(self, index: Any, value: Any) -> None:
        _stop_if_aborted()
        element = self._element(index)
        if element is None:  # a slice assignment: a write of each element
            view = self._view(index)
            for each in np.ndindex(*view.shape):
                view._record(each, write=True)
            self._array[index] = value
            return
        self._record(element, write=True)
        self._array[element] = value

    def _address(self, element: tuple[int, ...]) -> int:
        return self._base + sum(
            i * s for i, s in zip(element, self._array.strides, strict=True)
        )

    def atomic(self, index: Any) -> None:
        """An atomic operation on one element: checked (memcheck) and, in
        shared memory, counted as written (initcheck); atomics never race."""
        element = self._element(index)
        thread = _kernel_thread()
        block = _block_of(thread._manager) if thread is not None else None
        if element is not None and block is not None and self._space == "shared":
            with block.lock:
                block.written.add(self._address(element))

    def _record(self, element: tuple[int, ...], write: bool) -> None:
        if self._space == "local":
            return
        thread = _kernel_thread()
        block = _block_of(thread._manager) if thread is not None else None
        if block is None:
            return
        address = self._address(element)
        what = f"{self._space} array {self._name}, index {element}"
        if self._space == "shared":
            _shared_access(block, thread, address, what, write)
        elif write:
            _global_write(block, thread, address, what)


def _race(block: _Block, thread: Any, before: _Access, what: str, write: bool) -> None:
    verbs = {True: "writes", False: "reads"}
    other = before.thread
    same_warp = other.thread_id // WARP_SIZE == thread.thread_id // WARP_SIZE
    between = (
        "no syncthreads, and no syncwarp joined by both lanes, between them"
        if same_warp and tuple(other.blockIdx) == tuple(thread.blockIdx)
        else "no syncthreads between them"
        if tuple(other.blockIdx) == tuple(thread.blockIdx)
        else "nothing between them: threads of different blocks are never ordered"
    )
    _fail(
        "racecheck",
        block.launch,
        f"{what}: {_who(other)} {verbs[before.write]} it and {_who(thread)} "
        f"{verbs[write]} it, with {between}",
    )


def _shared_access(
    block: _Block, thread: Any, address: int, what: str, write: bool
) -> None:
    with block.lock:
        if not write and address not in block.written:
            _fail(
                "initcheck",
                block.launch,
                f"{what}: {_who(thread)} reads it, but no thread of the block "
                "has written it in this launch",
            )
        last = block.last_write.get(address)
        if last is not None and not block.ordered(last, thread):
            _race(block, thread, last, what, write)
        access = block.access(thread, write)
        if write:
            for read in block.reads.pop(address, {}).values():
                if not block.ordered(read, thread):
                    _race(block, thread, read, what, write)
            block.last_write[address] = access
            block.written.add(address)
        else:
            block.reads.setdefault(address, {})[thread.thread_id] = access


def _global_write(block: _Block, thread: Any, address: int, what: str) -> None:
    launch = block.launch
    with launch.lock:
        last = launch.writes.get(address)
        if last is not None:
            if last.block != tuple(thread.blockIdx) or not block.ordered(last, thread):
                _race(block, thread, last, what, True)
        launch.writes[address] = block.access(thread, True)


# --- the simulator's hooks -----------------------------------------------------------


def _wrap_argument(arg: Any, name: str, launch: _Launch) -> Any:
    from numba.cuda.simulator.cudadrv.devicearray import (
        FakeCUDAArray,
        FakeWithinKernelCUDAArray,
    )

    if isinstance(arg, FakeWithinKernelCUDAArray):
        array = arg._item._ary
    elif isinstance(arg, FakeCUDAArray):
        array = arg._ary
    elif isinstance(arg, np.ndarray) and arg.ndim:
        array = arg
    else:
        return arg
    if array.dtype.names:  # records keep the simulator's own view
        return arg
    return _Checked(array, name, "global", launch)


def barrier(thread: Any) -> None:
    """Called by ``softkern.testing.cudasim`` as a thread enters
    ``syncthreads``: where it waits (synccheck compares the block's)."""
    thread._softkern_barrier = _site()


def _synccheck(launch: _Launch, threads: set, blocked: set) -> str | None:
    exited = [t for t in threads if not t.is_alive() and t not in blocked]
    sites: dict[tuple, list] = {}
    for t in blocked:
        sites.setdefault(getattr(t, "_softkern_barrier", ()), []).append(t)
    if len(sites) > 1:
        parts = [
            f"{len(ts)} threads (e.g. {_who(ts[0])}) at {_where(site)}"
            for site, ts in sites.items()
        ]
        return (
            f"synccheck: kernel {launch.kernel}: threads of one block wait at "
            f"different syncthreads calls: {'; '.join(parts)}"
        )
    if exited:
        site = next(iter(sites))
        return (
            f"synccheck: kernel {launch.kernel}: syncthreads at {_where(site)} "
            f"is reached by {len(blocked)} of the block's {len(threads)} threads; "
            f"{len(exited)} had exited (e.g. {_who(exited[0])})"
        )
    return None


def _run_block(self: Any, grid_point: tuple, *args: Any) -> None:
    """``BlockManager.run`` under the sanitizer: the simulator's loop, with
    the arguments checked and every barrier release inspected first."""
    from numba.cuda.simulator.kernel import BlockThread

    launch = _launch_of(self)
    block = _Block(self, launch)
    setattr(self, _STATE, block)
    args = tuple(_wrap_argument(a, launch.name(i), launch) for i, a in enumerate(args))
    threads, live, blocked = set(), set(), set()
    for block_point in np.ndindex(*self._block_dim):

        def target() -> None:
            self._f(*args)

        t = BlockThread(target, self, grid_point, block_point, self._debug)
        t.start()
        threads.add(t)
        live.add(t)

    def abort(error: BaseException) -> None:
        for other in threads:
            other.abort = True
            other.syncthreads_blocked = False
            other.syncthreads_event.set()
        raise error

    # when the number of threads at the barrier last grew
    waiting_since: float | None = None
    waiting_count = 0
    while live:
        for t in live:
            if t.syncthreads_blocked:
                blocked.add(t)
            elif t.exception:
                abort(t.exception[0].with_traceback(t.exception[1]))
        if blocked and live == blocked:
            problem = _synccheck(launch, threads, blocked)
            if problem:
                abort(SanitizerError(problem))
            block.epoch += 1
            for t in blocked:
                t.syncthreads_blocked = False
                t.syncthreads_event.set()
            blocked = set()
            waiting_since = None
        elif blocked:
            now = time.monotonic()
            if waiting_since is None or len(blocked) != waiting_count:
                waiting_since, waiting_count = now, len(blocked)
            if now - waiting_since > TIMEOUT:
                missing = [t for t in live if t not in blocked]
                site = _where(getattr(next(iter(blocked)), "_softkern_barrier", ()))
                abort(
                    SanitizerError(
                        f"synccheck: kernel {launch.kernel}: syncthreads at {site} "
                        f"has waited {TIMEOUT:g} s, with no thread arriving, for "
                        f"{len(missing)} threads (e.g. {_who(missing[0])})"
                    )
                )
        else:
            time.sleep(0)
        live = {t for t in live if t.is_alive()}
    for t in threads:
        if t.exception:
            raise t.exception[0].with_traceback(t.exception[1])


def _shared_allocation(self: Any, shape: Any, dtype: Any, caller: Any) -> Any:
    """``FakeCUDAShared.array`` keyed by `caller`, the kernel's frame: the
    simulator keys a block's shared arrays by the line that allocates them,
    read from the stack, which a wrapper would otherwise stand on."""
    from numba.core import types
    from numba.np import numpy_support

    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    if shape == 0:  # dynamic shared memory: one buffer for every request
        count = self._dynshared_size // dtype.itemsize
        return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
    key = (caller.f_code.co_filename, caller.f_lineno)
    result = self._allocations.get(key)
    if result is None:
        result = self._allocations[key] = np.empty(shape, dtype)
    return result


def _checked_allocation(original: Any, space: str) -> Any:
    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if space == "shared":
            if alignment is not None:
                raise RuntimeError("Array alignment is not supported in cudasim")
            result = _shared_allocation(self, shape, dtype, sys._getframe(1))
        else:
            result = original(self, shape, dtype, alignment)
        thread = _kernel_thread()
        block = _block_of(thread._manager) if thread is not None else None
        if block is None or not enabled() or result.dtype.names:
            return result  # records: a field store bypasses any view
        name = f"allocated at {_where(_site())}"
        if space == "local":
            return _Checked(result, name, space, block.launch)
        with block.lock:  # one view per block: its own initcheck
            view = block.shared.get(id(result))
            if view is None:
                view = block.shared[id(result)] = _Checked(
                    result, name, space, block.launch
                )
        return view

    return array


def _unwrapped_atomic(original: Any, indexed: bool) -> Any:
    def method(self: Any, array: Any, *rest: Any) -> Any:
        if isinstance(array, _Checked):
            if indexed:
                array.atomic(rest[0])
            array = array._array
        return original(self, array, *rest)

    return method


def install() -> None:
    """Patch the simulator (once; inactive until :func:`enabled`)."""
    from numba.cuda.simulator import kernel, kernelapi

    manager = kernel.BlockManager
    if getattr(manager, "_softkern_sanitizer_installed", False):
        return
    original_run = manager.run

    def run(self: Any, grid_point: tuple, *args: Any) -> None:
        if not enabled():
            return original_run(self, grid_point, *args)
        return _run_block(self, grid_point, *args)

    manager.run = run
    manager._softkern_sanitizer_installed = True
    kernelapi.FakeCUDAShared.array = _checked_allocation(
        kernelapi.FakeCUDAShared.array, "shared"
    )
    kernelapi.FakeCUDALocal.array = _checked_allocation(
        kernelapi.FakeCUDALocal.array, "local"
    )
    atomic = kernelapi.FakeCUDAAtomic
    for name, value in list(vars(atomic).items()):
        if callable(value) and not name.startswith("_"):
            # compare_and_swap(array, old, value) takes no index: element 0
            indexed = name != "compare_and_swap"
            setattr(atomic, name, _unwrapped_atomic(value, indexed))
