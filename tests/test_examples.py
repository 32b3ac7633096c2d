"""examples/train_digits.py at a few steps: softkern's loss module trains the
same model as PyTorch's, step for step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits


def test_train_digits_matches_pytorch_step_for_step(capsys):
    result = train_digits.main(steps=30, batch=32)
    runs = result["runs"]
    ours = runs["softkern.nn.CrossEntropyLoss"]
    theirs = runs["torch.nn.CrossEntropyLoss"]
    assert len(ours.losses) == len(theirs.losses) == 30
    # Same seed, same batches: only float32 rounding apart.
    assert abs(ours.losses[0] - theirs.losses[0]) <= 2e-7 * theirs.losses[0]
    assert result["difference"] < 1e-5
    assert ours.losses[-1] < 0.5 * ours.losses[0]  # it learns
    assert abs(ours.test_accuracy - theirs.test_accuracy) <= 0.02
    assert "test accuracy" in capsys.readouterr().out
