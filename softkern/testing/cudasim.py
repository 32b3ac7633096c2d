"""Warp intrinsics and an exact ``fma`` for Numba's CUDA simulator.

Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) runs each CUDA thread of a block
as a Python thread and swaps the kernel module's ``cuda`` global for a
``FakeCUDAModule``. That module has no warp-level primitives, so kernels built on
warp shuffles and votes cannot be tested without a GPU. :func:`install` adds
them, plus a ``fma`` that rounds once, as the hardware does.

A warp intrinsic is a rendezvous: no lane may return before every lane named in
the mask has arrived, and each lane must read the values passed in *that* call.
Each call therefore joins a round object shared by the lanes that name the same
intrinsic and mask. The round is completed by its last lane, which publishes the
values and wakes the others, and a new call always opens a new round, so a fast
lane that races ahead to the next shuffle can never overwrite values that slower
lanes are still reading. Rounds with different masks may be open in the same
warp at once, as in divergent code on Volta and later GPUs where half a warp
shuffles among itself before the whole warp does.

A buggy kernel must fail fast rather than hang the test suite, and every wait
is a poll for that reason. Waiting lanes look for lanes of their mask that will
never arrive: lanes that have exited (returned early or raised), lanes held in
``syncthreads`` (which cannot release while a waiting lane is outside it), and
lanes stuck in another round that can itself never complete (the same mask
called with two different intrinsics, or overlapping masks waiting on each
other). These raise within a fraction of a second, naming the intrinsic, mask,
warp and lanes, and a generous timeout catches anything else. To tell lanes
apart the emulation registers every simulator thread with its block as it is
created and notes when it exits; per-block state lives on the simulator's
``BlockManager``, so nothing leaks from one block or launch into the next.

What is undefined on a GPU is an error here, because there it yields garbage
instead of failing: a mask that leaves out the calling lane or names lanes the
block does not have, and a shuffle that reads a lane outside its mask.

:func:`install` also installs the sanitizer of ``softkern.testing.sanitizer``
(``SOFTKERN_SANITIZE=1`` or ``with sanitize():``): racecheck, initcheck,
memcheck and synccheck for kernels run here, raising :class:`SanitizerError`.

The simulator evaluates ``cuda.fma(a, b, c)`` as ``a * b + c``, which rounds
twice and differs from ``fma.rn`` in exactly the cases where kernels use fma on
purpose (compensated sums, error-free products). The replacement computes the
exact result with :class:`fractions.Fraction` and rounds it once to nearest-even
in the format of the operands, honouring IEEE rules for infinities, NaNs,
overflow and signed zeros.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NoReturn

import numpy as np

from softkern.testing import sanitizer
from softkern.testing.sanitizer import SanitizerError, sanitize

__all__ = [
    "FULL_MASK",
    "TIMEOUT",
    "WARP_SIZE",
    "SanitizerError",
    "WarpSyncError",
    "fma",
    "install",
    "is_installed",
    "sanitize",
]

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF

#: Seconds a lane waits for the rest of its mask before giving up. Stuck lanes
#: that can be diagnosed (exited, in syncthreads, deadlocked) raise long before.
TIMEOUT = 10.0

#: Seconds between checks for lanes that will never arrive.
POLL_INTERVAL = 0.02

#: Seconds a lane that found lanes which will never arrive waits for the others
#: of its mask to exit or arrive, so that the error names all of them.
SETTLE_TIME = 0.2

_STATE_ATTR = "_softkern_warp_state"
_install_lock = threading.Lock()
_state_lock = threading.Lock()
_installed = False


class WarpSyncError(RuntimeError):
    """A warp intrinsic was used in a way that hangs or is undefined on a GPU."""


# --------------------------------------------------------------------------
# Per-block bookkeeping


@dataclass(eq=False)
class _Round:
    """One call of one intrinsic by the lanes of ``mask``."""

    kind: str
    mask: int
    values: dict[int, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None

    def missing(self) -> list[int]:
        return [lane for lane in _lanes(self.mask) if lane not in self.values]


class _Warp:
    """Rendezvous state of one warp; all of it is guarded by ``cond``."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.cond = threading.Condition()
        # At most one open round per (intrinsic, mask): a lane blocked in a round
        # cannot join another, so a second round with the same key never opens
        # while the first one is still waiting.
        self.open: dict[tuple[str, int], _Round] = {}
        # The round each lane is blocked in, until that round completes.
        self.waiting: dict[int, _Round] = {}


class _BlockState:
    def __init__(self, block_dim: Iterable[int]) -> None:
        self.nthreads = math.prod(block_dim)
        self.threads: dict[int, Any] = {}
        self._warps: dict[int, _Warp] = {}
        self._lock = threading.Lock()

    def warp(self, index: int) -> _Warp:
        with self._lock:
            warp = self._warps.get(index)
            if warp is None:
                warp = self._warps[index] = _Warp(index)
            return warp

    def lanes_present(self, warp_index: int) -> int:
        """Mask of the lanes of a warp that exist for this block size."""
        count = min(WARP_SIZE, self.nthreads - warp_index * WARP_SIZE)
        return (1 << count) - 1


def _block_state(manager: Any) -> _BlockState:
    state = getattr(manager, _STATE_ATTR, None)
    if state is None:
        with _state_lock:
            state = getattr(manager, _STATE_ATTR, None)
            if state is None:
                state = _BlockState(manager._block_dim)
                setattr(manager, _STATE_ATTR, state)
    return state


# --------------------------------------------------------------------------
# Formatting helpers


def _lanes(mask: int) -> list[int]:
    return [lane for lane in range(WARP_SIZE) if mask >> lane & 1]


def _format_lanes(lanes: Iterable[int]) -> str:
    """Format lane numbers compactly, e.g. ``[0, 3, 17..31]``."""
    runs: list[list[int]] = []
    for lane in sorted(lanes):
        if runs and lane == runs[-1][1] + 1:
            runs[-1][1] = lane
        else:
            runs.append([lane, lane])
    parts = []
    for first, last in runs:
        if first == last:
            parts.append(str(first))
        elif last == first + 1:
            parts.append(f"{first}, {last}")
        else:
            parts.append(f"{first}..{last}")
    return "[" + ", ".join(parts) + "]"


def _call(kind: str, mask: int) -> str:
    return f"{kind}(mask={mask:#010x})"


# --------------------------------------------------------------------------
# The rendezvous


@dataclass
class _Caller:
    """The simulator thread calling an intrinsic, and where it sits."""

    thread: Any
    block: _BlockState
    warp: _Warp
    lane: int
    kind: str
    mask: int

    @property
    def where(self) -> str:
        return (
            f"{_call(self.kind, self.mask)} in warp {self.warp.index} "
            f"of block {self.thread.blockIdx}"
        )


def _kernel_thread(kind: str) -> Any:
    thread = threading.current_thread()
    if not hasattr(thread, "_manager") or not hasattr(thread, "thread_id"):
        raise RuntimeError(
            f"cuda.{kind} can only be called inside a kernel running on the "
            "CUDA simulator"
        )
    return thread


def _caller(kind: str, mask: Any) -> _Caller:
    """Identify the calling lane and check that ``mask`` can be satisfied."""
    thread = _kernel_thread(kind)
    block = _block_state(thread._manager)
    warp_index, lane = divmod(thread.thread_id, WARP_SIZE)
    mask = int(mask) & FULL_MASK
    caller = _Caller(thread, block, block.warp(warp_index), lane, kind, mask)
    if not mask >> lane & 1:
        raise WarpSyncError(
            f"{caller.where}: the calling lane {lane} is not in the mask "
            "(a lane must name itself in the mask it passes)"
        )
    absent = mask & ~block.lanes_present(warp_index)
    if absent:
        present = block.lanes_present(warp_index).bit_count()
        raise WarpSyncError(
            f"{caller.where}: the mask names lanes {_format_lanes(_lanes(absent))} "
            f"that do not exist: the block has {block.nthreads} threads, so this "
            f"warp has {present} lanes"
        )
    return caller


def _arrive(caller: _Caller, value: Any) -> _Round:
    """Join the caller's round and return it once every lane has arrived."""
    warp = caller.warp
    key = (caller.kind, caller.mask)
    with warp.cond:
        _check_abort(caller)
        round_ = warp.open.get(key)
        if round_ is None:
            round_ = warp.open[key] = _Round(caller.kind, caller.mask)
        round_.values[caller.lane] = value
        warp.waiting[caller.lane] = round_
        if len(round_.values) == caller.mask.bit_count():
            del warp.open[key]
            for lane in round_.values:
                del warp.waiting[lane]
            if caller.kind == "syncwarp" and sanitizer.enabled():
                # memory is ordered among the lanes from here on (shuffles
                # and votes move registers and order no memory access)
                sanitizer.warp_round(caller.thread._manager, warp.index, round_.values)
            round_.done = True
            warp.cond.notify_all()
        else:
            _wait(caller, round_)
    return round_


def _wait(caller: _Caller, round_: _Round) -> None:
    """Block until ``round_`` completes; raise as soon as it provably cannot."""
    cond = caller.warp.cond
    deadline = time.monotonic() + TIMEOUT
    first_problem: float | None = None
    while not round_.done:
        _check_abort(caller)
        if round_.error is not None:
            _fail(caller.warp, round_, round_.error)
        problem, settled = _diagnose(caller, round_)
        if problem:
            # Give lanes still on their way a moment to settle, so that the
            # message names every lane that will not come, not just the first.
            now = time.monotonic()
            first_problem = now if first_problem is None else first_problem
            if settled or now - first_problem >= SETTLE_TIME:
                _fail(caller.warp, round_, problem)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _fail(
                caller.warp,
                round_,
                f"{caller.where}: timed out after {TIMEOUT:g} s waiting for lanes "
                f"{_format_lanes(round_.missing())}",
            )
        cond.wait(min(POLL_INTERVAL, remaining))


def _check_abort(caller: _Caller) -> None:
    # The simulator sets ``abort`` on every thread of a block once one raised.
    if caller.thread.abort:
        raise RuntimeError(
            f"{caller.where}: lane {caller.lane} aborted because another thread "
            "of the block raised"
        )


def _fail(warp: _Warp, round_: _Round, problem: str) -> NoReturn:
    """Fail ``round_`` for every lane in it, and close it to latecomers."""
    if round_.error is None:
        round_.error = problem
        if warp.open.get((round_.kind, round_.mask)) is round_:
            del warp.open[round_.kind, round_.mask]
        warp.cond.notify_all()
    raise WarpSyncError(round_.error)


def _diagnose(caller: _Caller, round_: _Round) -> tuple[str | None, bool]:
    """Explain why some lanes of ``round_`` can never arrive.

    Returns the explanation (None while the round may still complete) and
    whether every missing lane is accounted for.
    """
    warp, block = caller.warp, caller.block
    own_syncs = getattr(caller.thread, "_softkern_syncs", 0)
    exited: list[int] = []
    in_syncthreads: list[int] = []
    undecided: list[int] = []  # not started yet, or still running
    cause = ""  # the first exception among the exited lanes
    elsewhere: dict[_Round, list[int]] = {}
    for lane in round_.missing():
        other = warp.waiting.get(lane)
        thread = block.threads.get(warp.index * WARP_SIZE + lane)
        if other is not None:
            elsewhere.setdefault(other, []).append(lane)
        elif thread is not None and getattr(thread, "_softkern_exited", False):
            exited.append(lane)
            if thread.exception is not None and not cause:
                cause = f"lane {lane} raised {thread.exception[0]!r}"
        # A lane blocked in a barrier this lane has not reached yet waits for
        # this lane forever; one blocked in a barrier this lane already passed
        # is merely being released.
        elif (
            thread is not None
            and thread.syncthreads_blocked
            and getattr(thread, "_softkern_syncs", 0) > own_syncs
        ):
            in_syncthreads.append(lane)
        else:
            undecided.append(lane)
    if exited or in_syncthreads:
        groups = [
            (lanes, why)
            for lanes, why in (
                (exited, "exited"),
                (in_syncthreads, "are waiting in syncthreads"),
                (undecided, "had not arrived yet"),
            )
            if lanes
        ]
        if len(groups) == 1:
            detail = f"they {groups[0][1]}"
        else:
            detail = ", ".join(f"{_format_lanes(ls)} {why}" for ls, why in groups)
        lanes = _format_lanes(exited + in_syncthreads + undecided)
        message = f"{caller.where}: lanes {lanes} never reached it ({detail})"
        return (f"{message}; {cause}" if cause else message), not undecided
    for other, lanes in elsewhere.items():
        if other.error is not None:
            return (
                f"{caller.where}: lanes {_format_lanes(lanes)} are stuck in "
                f"{_call(other.kind, other.mask)}, which failed: {other.error}"
            ), True
        if _stuck(warp, other, {round_}):
            return (
                f"{caller.where}: lanes {_format_lanes(lanes)} are waiting in "
                f"{_call(other.kind, other.mask)} instead; all lanes named in a "
                "mask must call the same intrinsic with the same mask"
            ), True
    return None, False


def _stuck(warp: _Warp, round_: _Round, assumed: set[_Round]) -> bool:
    """Whether ``round_`` can never complete if the rounds in ``assumed`` don't.

    Lanes leave a round only when it completes, so a round waiting on lanes held
    in a cycle of rounds, or in a round that already failed, is deadlocked.
    """
    if round_ in assumed or round_.error is not None:
        return True
    for lane in round_.missing():
        other = warp.waiting.get(lane)
        if other is not None and _stuck(warp, other, assumed | {round_}):
            return True
    return False


# --------------------------------------------------------------------------
# The intrinsics, installed as methods of FakeCUDAModule


def _shuffle(kind: str, mask: Any, value: Any, source: Callable[[int], int]) -> Any:
    caller = _caller(kind, mask)
    src = source(caller.lane)
    if not 0 <= src < WARP_SIZE:
        src = caller.lane  # out of the warp: CUDA returns the caller's own value
    elif not caller.mask >> src & 1:
        raise WarpSyncError(
            f"{caller.where}: lane {caller.lane} reads lane {src}, which is not "
            "in the mask (the value of an inactive lane is undefined on a GPU)"
        )
    return _arrive(caller, value).values[src]


def _shfl_sync(self: Any, mask: int, value: Any, src_lane: int) -> Any:
    return _shuffle("shfl_sync", mask, value, lambda lane: int(src_lane) % WARP_SIZE)


def _shfl_up_sync(self: Any, mask: int, value: Any, delta: int) -> Any:
    return _shuffle("shfl_up_sync", mask, value, lambda lane: lane - int(delta))


def _shfl_down_sync(self: Any, mask: int, value: Any, delta: int) -> Any:
    return _shuffle("shfl_down_sync", mask, value, lambda lane: lane + int(delta))


def _shfl_xor_sync(self: Any, mask: int, value: Any, lane_mask: int) -> Any:
    return _shuffle("shfl_xor_sync", mask, value, lambda lane: lane ^ int(lane_mask))


def _vote(kind: str, mask: Any, predicate: Any) -> list[bool]:
    caller = _caller(kind, mask)
    values = _arrive(caller, bool(predicate)).values
    return [values[lane] for lane in _lanes(caller.mask)]


def _syncwarp(self: Any, mask: int = FULL_MASK) -> None:
    _arrive(_caller("syncwarp", mask), None)


def _all_sync(self: Any, mask: int, predicate: Any) -> bool:
    return all(_vote("all_sync", mask, predicate))


def _any_sync(self: Any, mask: int, predicate: Any) -> bool:
    return any(_vote("any_sync", mask, predicate))


def _eq_sync(self: Any, mask: int, predicate: Any) -> bool:
    return len(set(_vote("eq_sync", mask, predicate))) == 1


def _ballot_sync(self: Any, mask: int, predicate: Any) -> np.uint32:
    # Unsigned, as in CUDA C; compiled Numba kernels type the result as int32.
    caller = _caller("ballot_sync", mask)
    values = _arrive(caller, bool(predicate)).values
    return np.uint32(sum(1 << lane for lane, bit in values.items() if bit))


def _activemask(self: Any) -> np.uint32:
    # Every existing lane is treated as converged: the simulator has no notion
    # of divergence, and this is what a converged warp reports on a GPU.
    thread = _kernel_thread("activemask")
    block = _block_state(thread._manager)
    return np.uint32(block.lanes_present(thread.thread_id // WARP_SIZE))


# --------------------------------------------------------------------------
# Fused multiply-add


def _float_format(dtype: np.dtype) -> tuple[int, int, float]:
    """Precision (with the implicit bit), emin and largest finite value."""
    info = np.finfo(dtype)
    return info.nmant + 1, info.minexp, float(info.max)


def _round_to_format(x: Fraction, dtype: np.dtype) -> float:
    """Round a nonzero exact value to nearest-even in ``dtype``'s format.

    Returns a Python float holding the rounded value exactly (every float16 and
    float32 value is a float64 value), or an infinity on overflow; a value that
    underflows to zero keeps its sign.
    """
    precision, emin, largest = _float_format(dtype)
    sign = -1.0 if x < 0 else 1.0
    num, den = abs(x.numerator), x.denominator
    # floor(log2(|x|)) is one of two candidates given by the bit lengths.
    exponent = num.bit_length() - den.bit_length()
    if num << max(-exponent, 0) < den << max(exponent, 0):
        exponent -= 1
    # Below the normal range the spacing of representable values stops shrinking.
    quantum = max(exponent, emin) - (precision - 1)
    scaled_num = num << max(-quantum, 0)
    scaled_den = den << max(quantum, 0)
    mantissa, remainder = divmod(scaled_num, scaled_den)
    if 2 * remainder > scaled_den or (
        2 * remainder == scaled_den and mantissa % 2 == 1
    ):
        mantissa += 1
    # ``mantissa`` has at most precision + 1 <= 54 bits (a carry out of the top
    # bit), so the float conversion is exact; only the exponent can overflow.
    try:
        magnitude = math.ldexp(float(mantissa), quantum)
    except OverflowError:
        magnitude = math.inf
    if magnitude > largest:
        magnitude = math.inf
    return math.copysign(magnitude, sign)


def _exact_fma(a: float, b: float, c: float, dtype: np.dtype) -> float:
    """``a * b + c`` rounded once to ``dtype``, with IEEE special cases."""
    if not (math.isfinite(a) and math.isfinite(b)):
        # An infinite or NaN product is exact in float arithmetic, and adding c
        # then follows the IEEE rules (inf - inf and 0 * inf give NaN).
        return a * b + c
    if not math.isfinite(c):
        return c  # a finite product never changes an infinite or NaN addend
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:
        # An exact zero sum is +0 under round-to-nearest, unless both terms are
        # zeros of negative sign.
        product_negative = math.copysign(1.0, a) * math.copysign(1.0, b) < 0
        both_negative_zero = (
            (a == 0 or b == 0) and product_negative and math.copysign(1.0, c) < 0
        )
        return -0.0 if both_negative_zero else 0.0
    return _round_to_format(exact, dtype)


_FMA_DTYPES = frozenset(np.dtype(name) for name in ("float16", "float32", "float64"))


def fma(a: Any, b: Any, c: Any) -> Any:
    """Correctly rounded fused multiply-add, as ``fma.rn`` computes it.

    NumPy float16/32/64 scalars give a scalar of the type NumPy promotion picks
    (float32 for three float32 operands); Python numbers give a Python float,
    computed in float64.
    """
    if not any(isinstance(x, np.generic) for x in (a, b, c)):
        return _exact_fma(float(a), float(b), float(c), np.dtype(np.float64))
    dtype = np.result_type(a, b, c)
    if dtype.kind in "iub":
        dtype = np.dtype(np.float64)
    if dtype not in _FMA_DTYPES:
        raise TypeError(f"fma supports float16, float32 and float64, not {dtype}")
    # Casting to the result type first mirrors how a kernel would convert
    # mixed operands before the fma instruction.
    ops = (float(dtype.type(x)) for x in (a, b, c))
    return dtype.type(_exact_fma(*ops, dtype))


def _fma(self: Any, a: Any, b: Any, c: Any) -> Any:
    return fma(a, b, c)


# --------------------------------------------------------------------------
# Installation


_METHODS: dict[str, Callable[..., Any]] = {
    "shfl_sync": _shfl_sync,
    "shfl_up_sync": _shfl_up_sync,
    "shfl_down_sync": _shfl_down_sync,
    "shfl_xor_sync": _shfl_xor_sync,
    "syncwarp": _syncwarp,
    "all_sync": _all_sync,
    "any_sync": _any_sync,
    "eq_sync": _eq_sync,
    "ballot_sync": _ballot_sync,
    "activemask": _activemask,
    "fma": _fma,
}


def _patch_block_thread(block_thread: type) -> None:
    """Make simulator threads visible to the rendezvous.

    Threads register with their block when created, count the ``syncthreads``
    barriers they enter (to tell a stuck barrier from one being released), and
    wake their warp when they exit so waiting lanes notice at once.
    """
    original_init = block_thread.__init__
    original_run = block_thread.run
    original_syncthreads = block_thread.syncthreads

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._softkern_syncs = 0
        self._softkern_exited = False
        _block_state(self._manager).threads[self.thread_id] = self

    def run(self: Any) -> None:
        try:
            original_run(self)
        finally:
            warp = _block_state(self._manager).warp(self.thread_id // WARP_SIZE)
            with warp.cond:
                self._softkern_exited = True
                warp.cond.notify_all()

    def syncthreads(self: Any) -> None:
        self._softkern_syncs += 1
        if sanitizer.enabled():
            sanitizer.barrier(self)
        original_syncthreads(self)

    block_thread.__init__ = __init__
    block_thread.run = run
    block_thread.syncthreads = syncthreads


def install() -> None:
    """Add warp intrinsics and an exact ``fma`` to Numba's CUDA simulator.

    Safe to call more than once. Works whether or not the simulator is enabled,
    but only has an effect on kernels run by the simulator.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        from numba.cuda.simulator import kernel, kernelapi

        _patch_block_thread(kernel.BlockThread)
        for name, method in _METHODS.items():
            setattr(kernelapi.FakeCUDAModule, name, method)
        sanitizer.install()
        _installed = True


def is_installed() -> bool:
    """Whether :func:`install` has patched the simulator in this process."""
    return _installed
