"""softkern in any process layout: forked children, many threads, a busy core.

The CPU kernels run their parallel loops on Numba's threading layer, which
softkern asks to be GNU OpenMP (``softkern._threads``, where the measurements
are): a child forked after the parent started its pool must never start a
parallel region (OpenMP would kill it), so there every kernel runs on its
calling thread. Small inputs run on the calling thread anyway, so the tests
that need parallel regions lower the size limits to 0. How long a call takes
while another process keeps a core busy is measured by the ``busy``
benchmarks (bench/bench_small.py), not here.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import softkern as sk
from softkern import _dispatch, _launch, _threads, warmup

HAVE_TBB = _threads.tbb_installed()
try:
    from numba.np.ufunc import omppool  # noqa: F401

    HAVE_OMP = True
except ImportError:
    HAVE_OMP = False


@pytest.fixture
def always_parallel(monkeypatch):
    """Every CPU kernel takes its parallel branch, whatever the size."""
    monkeypatch.setattr(_launch, "CPU_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(_launch, "CPU_COPY_PARALLEL_MIN_BYTES", 0)
    _dispatch.clear_plan_caches()


def same(a, b) -> bool:
    if isinstance(a, tuple):  # cross_entropy_and_grad's (loss, grad)
        return isinstance(b, tuple) and all(map(same, a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def medium(seed: int = 0) -> np.ndarray:
    """A (512, 512) float32 input: 1 MiB, above the parallel size limit."""
    return np.random.default_rng(seed).standard_normal((512, 512)).astype(np.float32)


def test_threading_layer_is_the_measured_choice():
    sk.softmax(medium(), 1)  # a parallel kernel starts the layer
    if not os.environ.get("NUMBA_THREADING_LAYER"):
        assert _threads.threading_layer() == ("omp" if HAVE_OMP else "tbb")


@pytest.mark.skipif(not HAVE_TBB, reason="the tbb wheel is not installed")
def test_a_tbb_layer_asked_for_loads_from_the_wheel():
    # The wheel's libtbb.so.12 is not on the loader's path in a virtual
    # environment; softkern loads it when the user asks for TBB.
    code = (
        "import numpy as np, softkern as sk, numba; "
        "sk.softmax(np.ones((512, 512), np.float32), 1); "
        "print(numba.threading_layer())"
    )
    env = dict(os.environ, NUMBA_THREADING_LAYER="tbb")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "tbb"


def _child_softmax(queue) -> None:
    queue.put(sk.softmax(medium(), 1))


def test_forked_child_computes_and_exits_cleanly():
    # The parent has run a parallel kernel (under GNU OpenMP, its pool is
    # started): each child computes the same, bit for bit, and exits 0.
    expected = sk.softmax(medium(), 1)
    assert _threads.threading_layer() != "not started"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_child_softmax, args=(queue,)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    for got in results:
        assert same(got, expected)


def test_torch_dataloader_workers_call_softkern():
    torch = pytest.importorskip("torch")
    data = torch.utils.data

    class Softmaxed(data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return torch.from_numpy(sk.softmax(medium(i), 1))

    sk.softmax(medium(), 1)  # the parent has run a parallel kernel first
    loader = data.DataLoader(
        Softmaxed(), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    batches = list(loader)
    got = torch.cat(batches).numpy()
    for i in range(6):
        assert same(got[i], sk.softmax(medium(i), 1))


def test_parallel_and_serial_kernels_agree(monkeypatch):
    # Every kernel's parallel branch computes what its serial branch does,
    # bit for bit (the work is split, never the order of a fold or a sum).
    calls = warmup.catalogue()
    serial = [call.run() for call in calls]
    monkeypatch.setattr(_launch, "CPU_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(_launch, "CPU_COPY_PARALLEL_MIN_BYTES", 0)
    _dispatch.clear_plan_caches()
    differ = [
        c.label for c, s in zip(calls, serial, strict=True) if not same(c.run(), s)
    ]
    assert not differ


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_eight_threads_calling_every_operation(mode, request):
    if mode == "parallel":
        request.getfixturevalue("always_parallel")
    calls = warmup.catalogue()
    expected = [call.run() for call in calls]
    failures: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(offset: int) -> None:
        try:
            start.wait()
            # each thread walks the calls from its own place, so different
            # kernels and the same kernel overlap
            for k in range(len(calls)):
                i = (k + offset * 29) % len(calls)
                if not same(calls[i].run(), expected[i]):
                    failures.append(calls[i].label)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[0]
    assert not failures, sorted(set(failures))


def test_correct_while_another_process_keeps_a_core_busy():
    x = np.random.default_rng(1).standard_normal((1000, 1000)).astype(np.float32)
    expected = sk.softmax(x, 1), sk.sum(x, 0), sk.cross_entropy(x, np.arange(1000))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(20):
            assert same(sk.softmax(x, 1), expected[0])
            assert same(sk.sum(x, 0), expected[1])
            assert same(sk.cross_entropy(x, np.arange(1000)), expected[2])
    finally:
        spinner.kill()
        spinner.wait()
