"""Train a small MLP on scikit-learn's digits twice: PyTorch's loss, then softkern's.

    python examples/train_digits.py [--steps 400] [--batch 64]

The 8x8 handwritten digits (1797 images, 10 classes) ship with scikit-learn,
so nothing is downloaded. Both runs start from the same seed, draw the same
minibatches and differ only in the loss module: ``torch.nn.CrossEntropyLoss``
or ``softkern.nn.CrossEntropyLoss`` (softkern's fused loss and gradient,
through autograd). The script prints both loss curves' largest difference
(float32 rounding: the two losses sum a row's exponentials in a different
order), the test accuracy of each model and the median time per training
step (forward, backward and the optimizer step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

import softkern as sk

SEED = 0
HIDDEN = 128
TEST_FRACTION = 0.2


@dataclass
class Run:
    losses: list[float]
    step_seconds: list[float]
    test_accuracy: float

    @property
    def median_step_us(self) -> float:
        return statistics.median(self.step_seconds) * 1e6


def digits() -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels), float32
    images scaled to [0, 1], split once by a fixed permutation."""
    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32))
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    test = int(len(y) * TEST_FRACTION)
    return x[order[test:]], y[order[test:]], x[order[:test]], y[order[:test]]


def train(loss_fn: torch.nn.Module, steps: int, batch: int) -> Run:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = torch.Generator().manual_seed(SEED)
    losses, seconds = [], []
    for _ in range(steps):
        idx = torch.randint(len(y_train), (batch,), generator=batches)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return Run(losses, seconds, accuracy)


def main(steps: int = 400, batch: int = 64, quiet: bool = False) -> dict:
    """Both runs; returns their numbers (the tests call this)."""
    sk.cross_entropy(np.zeros((1, 10), np.float32), np.zeros(1, np.int64))  # load
    runs = {
        "torch.nn.CrossEntropyLoss": train(torch.nn.CrossEntropyLoss(), steps, batch),
        "softkern.nn.CrossEntropyLoss": train(sk.nn.CrossEntropyLoss(), steps, batch),
    }
    ours, theirs = (
        runs["softkern.nn.CrossEntropyLoss"],
        runs["torch.nn.CrossEntropyLoss"],
    )
    difference = max(
        abs(a - b) / abs(b) for a, b in zip(ours.losses, theirs.losses, strict=True)
    )
    if not quiet:
        print(f"{steps} steps of SGD, batch {batch}, MLP 64-{HIDDEN}-10, digits")
        for name, run in runs.items():
            print(
                f"  {name:30s} loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}  "
                f"test accuracy {run.test_accuracy:.3f}  "
                f"{run.median_step_us:.0f} us/step (median)"
            )
        print(f"  largest relative difference of the loss curves: {difference:.2e}")
    return {"runs": runs, "difference": difference}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    main(args.steps, args.batch)
