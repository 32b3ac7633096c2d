"""The threading layer of softkern's parallel CPU kernels, chosen by
measurement, and what happens to it across ``fork``.

Numba runs ``prange`` loops on one of three layers, chosen in a process the
first time a parallel kernel runs. Measured on the 2-core CI machine (Linux
6.18, 2 vCPUs; a (1000, 1000) float32 softmax, medians;
``bench/bench_small.py``'s busy group and ``tests/test_threads.py``):

- ``omp`` (GNU OpenMP): 0.34 ms idle and 0.34 ms while another process
  keeps a core busy (PyTorch, on its own OpenMP: 0.29 and 0.29). Its pool
  threads spin for a while after each parallel region before they sleep, as
  PyTorch's do, so they still hold a core when the next call comes.
  Thread-safe. Not fork-safe: a child forked after the parent ran a parallel
  region is killed when it starts one ("fork() called from a process already
  using GNU OpenMP").
- ``tbb``: fork- and thread-safe, 0.36 ms idle but 0.66 ms under the same
  load: its threads sleep as soon as a region ends, and a woken thread waits
  for the busy core longer than the whole call takes, so the calling thread
  does all the work (the serial time, 2.3x PyTorch's).
- ``workqueue``: 0.80 ms idle, and it aborts the process when two Python
  threads run kernels at once.

So softkern asks Numba for ``omp`` first (then ``tbb``, then
``workqueue``), and makes it fork-safe itself: a child forked after the
parent started the OpenMP pool runs every kernel on its calling thread
(``_in_forked_child`` raises the parallel size limits to infinity and drops
the cached plans), so it never enters a parallel region and cannot be
killed. Forked workers (multiprocessing, PyTorch ``DataLoader``) run one
thread each, as PyTorch's own workers do.

A choice of the user's is kept: ``NUMBA_THREADING_LAYER`` in the
environment, ``numba.config.THREADING_LAYER`` set before importing softkern,
or a layer another library already started. For ``tbb`` (the ``tbb`` wheel)
the runtime is loaded here first: the wheel puts ``libtbb.so.12`` in the
environment's ``lib`` folder, where the dynamic loader does not look.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from importlib import metadata
from pathlib import Path

import numba
from numba.np.ufunc import parallel as _numba_parallel

PRIORITY = ["omp", "tbb", "workqueue"]
_LIBRARY = {
    "linux": "libtbb.so.12",
    "darwin": "libtbb.12.dylib",
    "win32": "tbb12.dll",
}.get(sys.platform, "libtbb.so.12")


def _tbb_candidates() -> list[Path]:
    """Where the TBB runtime may be: the ``tbb`` wheel's own files, then the
    environment's library folders."""
    found: list[Path] = []
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _LIBRARY:
            found.append(Path(f.locate()).resolve())
    for prefix in {sys.prefix, sys.base_prefix}:
        found.append(Path(prefix, "lib", _LIBRARY))
        found.append(Path(prefix, "Library", "bin", _LIBRARY))
    return found


def tbb_installed() -> bool:
    """Whether a TBB runtime softkern can load (the ``tbb`` wheel) is here."""
    return any(path.is_file() for path in _tbb_candidates())


def load_tbb() -> bool:
    """Load the TBB runtime so that Numba's TBB pool can link to it."""
    try:
        ctypes.CDLL(_LIBRARY, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        pass
    for path in _tbb_candidates():
        if path.is_file():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False


def _user_choice() -> str | None:
    """The layer the user asked for, if any."""
    chosen = os.environ.get("NUMBA_THREADING_LAYER") or str(
        numba.config.THREADING_LAYER
    )
    return None if chosen in ("", "default") else chosen.lower()


def configure() -> None:
    """Ask Numba for softkern's layers (unless the user chose one or a
    layer already runs), and guard forked children. Call before any
    parallel kernel runs."""
    os.register_at_fork(after_in_child=_in_forked_child)
    choice = _user_choice()
    if choice is not None:
        if choice != "omp" and choice != "workqueue":
            load_tbb()  # tbb, or a safety level that may pick it
        return
    if _numba_parallel._is_initialized:
        return
    numba.config.THREADING_LAYER_PRIORITY = PRIORITY
    load_tbb()  # the fallback where Numba has no OpenMP


def _in_forked_child() -> None:
    """In a child of fork: if the parent had started GNU OpenMP's pool, no
    kernel may start a parallel region here, so every kernel from now on
    runs on its calling thread (the cached plans said otherwise)."""
    if threading_layer() != "omp":
        return
    from softkern import _dispatch, _launch

    _launch.CPU_PARALLEL_MIN_BYTES = math.inf
    _launch.CPU_COPY_PARALLEL_MIN_BYTES = math.inf
    _dispatch.clear_plan_caches()


def threading_layer() -> str:
    """The layer in use, or "not started" before the first parallel kernel."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "not started"


def describe() -> str:
    """The layer in use, or the one Numba will pick for softkern's kernels."""
    layer = threading_layer()
    if layer != "not started":
        return layer
    choice = _user_choice()
    if choice is not None:
        return f"{choice} (asked for; not started yet)"
    order = ", ".join(numba.config.THREADING_LAYER_PRIORITY)
    return f"the first available of {order} (not started yet)"
