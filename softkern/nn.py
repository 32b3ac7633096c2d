"""Callable modules in the style of ``torch.nn``: ``Softmax`` and
``LogSoftmax`` hold a `dim` and apply the function to any supported array."""

from __future__ import annotations

from typing import Any

from softkern.ops import softmax as _ops


class _SoftmaxModule:
    _function: Any = None

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def __call__(self, x: Any) -> Any:
        return type(self)._function(x, self.dim)

    forward = __call__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.dim == self.dim

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.dim))


class Softmax(_SoftmaxModule):
    """``softkern.softmax`` over `dim`, like ``torch.nn.Softmax(dim)``."""

    _function = staticmethod(_ops.softmax)


class LogSoftmax(_SoftmaxModule):
    """``softkern.log_softmax`` over `dim`, like ``torch.nn.LogSoftmax(dim)``."""

    _function = staticmethod(_ops.log_softmax)


__all__ = ["LogSoftmax", "Softmax"]
