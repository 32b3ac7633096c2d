"""Modules in the style of ``torch.nn``: ``Softmax``, ``LogSoftmax``,
``CrossEntropyLoss`` and ``NLLLoss``, with PyTorch's constructor arguments.

Where torch is installed they are ``torch.nn.Module`` subclasses (a loss's
`weight` a buffer, as in PyTorch: it moves with ``.to()`` and sits in the
state dict), so they drop into a model and train through autograd and
``torch.compile``; without torch they are plain callables over NumPy and
CUDA arrays. Which one is decided when a class is first looked up, so
``import softkern`` never imports torch.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

_NAMES = ("CrossEntropyLoss", "LogSoftmax", "NLLLoss", "Softmax")
_REDUCTIONS = ("none", "mean", "sum")


def _legacy_reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    """PyTorch's deprecated size_average/reduce pair as a `reduction`."""
    if size_average is None and reduce is None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        return reduction
    warnings.warn(
        "size_average and reduce args will be deprecated, please use "
        "reduction='mean' (or 'sum', 'none') instead.",
        UserWarning,
        stacklevel=4,
    )
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _build(base: type, register_weight: bool) -> dict[str, type]:
    """The four classes over `base` (torch.nn.Module or object)."""
    from softkern.ops import losses, softmax

    class _Dim(base):
        _function: Any = None

        def __init__(self, dim: int | None = None) -> None:
            super().__init__()
            self.dim = dim

        def forward(self, input: Any) -> Any:
            return type(self)._function(input, self.dim)

        def extra_repr(self) -> str:
            return f"dim={self.dim}"

        if not register_weight:
            __call__ = forward

            def __repr__(self) -> str:
                return f"{type(self).__name__}({self.extra_repr()})"

            def __eq__(self, other: object) -> bool:
                return type(other) is type(self) and other.dim == self.dim

            def __hash__(self) -> int:
                return hash((type(self).__name__, self.dim))

    class Softmax(_Dim):
        """``softkern.softmax`` over `dim`, like ``torch.nn.Softmax(dim)``."""

        _function = staticmethod(softmax.softmax)

    class LogSoftmax(_Dim):
        """``softkern.log_softmax`` over `dim`, like ``torch.nn.LogSoftmax``."""

        _function = staticmethod(softmax.log_softmax)

    class _Loss(base):
        def __init__(
            self,
            weight: Any = None,
            size_average: Any = None,
            ignore_index: int = -100,
            reduce: Any = None,
            reduction: str = "mean",
        ) -> None:
            super().__init__()
            self.reduction = _legacy_reduction(size_average, reduce, reduction)
            self.ignore_index = ignore_index
            if register_weight:
                self.register_buffer("weight", weight)
            else:
                self.weight = weight

        if not register_weight:

            def __call__(self, input: Any, target: Any) -> Any:
                return self.forward(input, target)

            def __repr__(self) -> str:
                return f"{type(self).__name__}()"

    class CrossEntropyLoss(_Loss):
        """``softkern.cross_entropy`` with its options fixed, like
        ``torch.nn.CrossEntropyLoss``; `softcap` and `lse_square_scale`
        (keyword only) as in ``softkern.cross_entropy``."""

        def __init__(
            self,
            weight: Any = None,
            size_average: Any = None,
            ignore_index: int = -100,
            reduce: Any = None,
            reduction: str = "mean",
            label_smoothing: float = 0.0,
            *,
            softcap: float | None = None,
            lse_square_scale: float = 0.0,
        ) -> None:
            super().__init__(weight, size_average, ignore_index, reduce, reduction)
            self.label_smoothing = label_smoothing
            self.softcap = softcap
            self.lse_square_scale = lse_square_scale

        def forward(self, input: Any, target: Any) -> Any:
            return losses.cross_entropy(
                input,
                target,
                self.weight,
                self.ignore_index,
                self.reduction,
                self.label_smoothing,
                softcap=self.softcap,
                lse_square_scale=self.lse_square_scale,
            )

    class NLLLoss(_Loss):
        """``softkern.nll_loss`` with its options fixed, like
        ``torch.nn.NLLLoss``."""

        def forward(self, input: Any, target: Any) -> Any:
            return losses.nll_loss(
                input, target, self.weight, self.ignore_index, self.reduction
            )

    classes = {
        "Softmax": Softmax,
        "LogSoftmax": LogSoftmax,
        "CrossEntropyLoss": CrossEntropyLoss,
        "NLLLoss": NLLLoss,
    }
    for name, cls in classes.items():
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


def __getattr__(name: str) -> type:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if importlib.util.find_spec("torch") is not None:
        import torch

        classes = _build(torch.nn.Module, True)
    else:
        classes = _build(object, False)
    globals().update(classes)
    return classes[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


__all__ = list(_NAMES)
