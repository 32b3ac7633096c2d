"""softkern called from PyTorch: what the tensor path costs, and a training step.

``pytest bench/bench_torch.py --benchmark-only`` times two groups:

- ``overhead``: each function on a (64, 10) float32 CPU tensor against the
  same call on the NumPy array over the same memory (``tensor.numpy()``):
  the difference is what the tensor path adds (viewing the tensor, wrapping
  the result). Target: at most 5 us.
- ``train step``: the loss's forward and backward through autograd on
  (8192, 4096) float32 and bfloat16 logits that require grad and int64
  targets:
  ``sk.cross_entropy(x, t).backward()`` (the fused loss-and-gradient op)
  against ``F.cross_entropy(x, t).backward()``, ``x.grad`` reset before
  each. Target: PyTorch's time / softkern's >= 2. A second row adds
  softcap and the z-loss: ``sk.cross_entropy(x, t, softcap=30,
  lse_square_scale=1e-4)`` against the same written in PyTorch (tanh,
  cross_entropy, logsumexp squared, through autograd).

A plain ``pytest`` runs each row once at small sizes and checks its answer.
``python bench/table.py RESULTS.json --bench torch`` makes the table.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _timing import time_row

import softkern as sk

torch = pytest.importorskip("torch")
F = torch.nn.functional

SEED = 20261130
OVERHEAD_SHAPE = (64, 10)
TRAIN_SHAPE = (8192, 4096)
SMOKE_TRAIN_SHAPE = (64, 1000)

CALLS = {
    "softmax": lambda x, t: sk.softmax(x, 1),
    "log_softmax": lambda x, t: sk.log_softmax(x, 1),
    "logsumexp": lambda x, t: sk.logsumexp(x, 1),
    "sigmoid": lambda x, t: sk.sigmoid(x),
    "sum": lambda x, t: sk.sum(x, 1),
    "cross_entropy": lambda x, t: sk.cross_entropy(x, t),
}


def _operands(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, *shape])
    x = rng.standard_normal(shape, dtype=np.float32)
    return x, rng.integers(0, shape[1], shape[0])


@pytest.mark.parametrize("impl", ["numpy", "tensor"])
@pytest.mark.parametrize("function", CALLS)
def test_overhead(benchmark, function, impl):
    x, t = _operands(OVERHEAD_SHAPE)
    call = CALLS[function]
    expected = call(x, t)
    if impl == "tensor":
        x, t = torch.from_numpy(x), torch.from_numpy(t)
        got = call(x, t)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), expected)
    benchmark.group = f"overhead {function}"
    benchmark.extra_info.update(
        bench="torch", group="overhead", function=function, impl=impl,
        shape=list(OVERHEAD_SHAPE), device="cpu",
    )  # fmt: skip
    time_row(benchmark, lambda: call(x, t), x.nbytes)


# Gemma 2's final-logit cap and PaLM's z-loss scale
SOFTCAP, Z_SCALE = 30.0, 1e-4


def _capped_z_loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softcap and the z-loss written in PyTorch, as a training loop without
    a fused kernel would: capped logits, their cross entropy, plus the
    scaled squared logsumexp, averaged."""
    z = SOFTCAP * torch.tanh(x / SOFTCAP)
    per = F.cross_entropy(z, t, reduction="none")
    return (per + Z_SCALE * torch.logsumexp(z, 1) ** 2).mean()


LOSSES = {
    "cross_entropy + backward": (sk.cross_entropy, F.cross_entropy),
    "cross_entropy (softcap, z-loss) + backward": (
        functools.partial(sk.cross_entropy, softcap=SOFTCAP, lse_square_scale=Z_SCALE),
        _capped_z_loss,
    ),
}


@pytest.mark.parametrize("impl", ["softkern", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("function", list(LOSSES))
def test_train_step(benchmark, function, dtype, impl):
    shape = SMOKE_TRAIN_SHAPE if benchmark.disabled else TRAIN_SHAPE
    x_host, t_host = _operands(shape)
    x = torch.from_numpy(x_host).to(getattr(torch, dtype)).requires_grad_()
    t = torch.from_numpy(t_host)
    ours_fn, theirs_fn = LOSSES[function]
    loss_fn = ours_fn if impl == "softkern" else theirs_fn

    def step() -> None:
        x.grad = None
        loss_fn(x, t).backward()

    step()
    ours = x.grad
    assert ours.dtype == x.dtype
    # Both against float64: PyTorch's bfloat16 gradient goes through
    # bfloat16 log-probabilities, softkern's is float32 rounded once.
    exact = x.detach().double().requires_grad_()
    theirs_fn(exact, t).backward()
    if impl == "softkern":
        tolerance = 2e-6 if dtype == "float32" else 2**-8
        scale = exact.grad.abs().max().item()
        assert (ours.double() - exact.grad).abs().max().item() <= tolerance * scale
    benchmark.group = f"train step {function} {shape[0]}x{shape[1]} {dtype}"
    benchmark.extra_info.update(
        bench="torch", group="train step", function=function,
        impl=impl, shape=list(shape), dtype=dtype, device="cpu",
    )  # fmt: skip
    # The least a step moves: the logits read, the gradient written.
    time_row(benchmark, step, 2 * x.nbytes + t_host.nbytes)
