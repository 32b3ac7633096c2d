"""PyTorch as a caller: tensors in and out, autograd, ``torch.compile``.

Imported the first time a public function meets a tensor (never by
``import softkern``). Two ways through:

- *Eager, nothing to differentiate* (no argument requires grad, or grad is
  off): CPU tensors are viewed as NumPy arrays (``Tensor.numpy()``, no
  copy), CUDA tensors go to the GPU path as they are, and NumPy results
  come back as tensors over the same memory (``torch.from_numpy``). This
  path adds about 3 us to a call (bench/bench_torch.py).
- *Autograd or the compiler*: a tensor that requires grad, a tensor
  subclass (a compiler's fake or functional tensor), or a call traced by
  ``torch.compile`` goes through the ``softkern::`` custom ops registered
  here with ``torch.library.custom_op``. Each has a fake implementation
  (shapes and dtypes only) so that the compiler can trace it, and an
  autograd formula that runs softkern's backward kernels where there are
  some (softmax, log_softmax, cross_entropy) and PyTorch's elementwise
  formulas where the gradient is one elementwise step (sigmoid,
  logsigmoid, logsumexp, nll_loss).

cross_entropy with an input that requires grad computes the loss and its
gradient in one pass (``softkern::cross_entropy_and_grad``, fused on the
CPU for class indices) and keeps the gradient for backward, which only
scales it by the loss's gradient: the logits are read once per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softkern import _dtypes, _layout
from softkern.ops import activations as _activations
from softkern.ops import losses as _losses
from softkern.ops import softmax as _softmax

_PLAIN = (Tensor, torch.nn.Parameter)


# --- tensors as NumPy arrays and back ----------------------------------------


def host_view(t: Tensor) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array, without a copy."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:  # NumPy's bfloat16 is ml_dtypes'
        return t.view(torch.int16).numpy().view(_dtypes.bfloat16())
    return t.numpy()


def as_tensor(a: np.ndarray) -> Tensor:
    """A tensor over a NumPy array's memory (bfloat16 included)."""
    if _dtypes.is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _as_host(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_cpu:
        return host_view(value)
    return value


def _as_tensor(result: Any, out: Any, out_view: Any) -> Any:
    """A NumPy result as a tensor over its memory; `out` itself when the
    result is the view of the caller's out= tensor."""
    if isinstance(result, tuple):
        return tuple(_as_tensor(r, out, out_view) for r in result)
    if not isinstance(result, np.ndarray):
        return result
    if out_view is not None and result is out_view:
        return out
    return as_tensor(result)


def eager(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict) -> Any:
    """`fn` (a public function, undecorated) on tensors: CPU tensors viewed
    as NumPy arrays, results back as tensors."""
    host_args = [_as_host(a) for a in args]
    if not kwargs:
        return _as_tensor(fn(*host_args), None, None)
    host_kwargs = {k: _as_host(v) for k, v in kwargs.items()}
    out = kwargs.get("out")
    out_view = host_kwargs["out"] if isinstance(out, Tensor) else None
    return _as_tensor(fn(*host_args, **host_kwargs), out, out_view)


def _needs_graph(values: Any) -> bool:
    """Whether a call must go through the ops: under torch.compile, for a
    tensor subclass (a compiler's fake tensor), or for a tensor that
    autograd tracks."""
    if torch.compiler.is_compiling():
        return True
    for value in values:
        if isinstance(value, Tensor) and (
            type(value) not in _PLAIN
            or (value.requires_grad and torch.is_grad_enabled())
        ):
            return True
    return False


def call(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """`fn` (a public function, undecorated) called with a tensor among its
    arguments."""
    values = itertools.chain(args, kwargs.values()) if kwargs else args
    if _needs_graph(values):
        through_op = THROUGH_OPS.get(name)
        if through_op is not None:
            return through_op(*args, **kwargs)
        if _traced((*args, *kwargs.values())):
            raise TypeError(
                f"softkern.{name} is not a registered torch operator, so "
                "torch.compile cannot trace it; the registered ones are "
                f"{', '.join(sorted(THROUGH_OPS))}"
            )
    return eager(fn, args, kwargs)


def _raw(fn: Any) -> Callable[..., Any]:
    return getattr(fn, "__wrapped__", fn)


def _no_out(name: str, out: Any) -> None:
    if out is not None:
        raise RuntimeError(
            f"softkern.{name}(): functions with out=... arguments don't support "
            "automatic differentiation, but one of the arguments requires grad"
        )


def _traced(args: Sequence[Any]) -> bool:
    """Whether these op arguments are being traced (torch.compile, fake
    tensors) rather than computed."""
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(a, Tensor) and type(a) not in _PLAIN for a in args)


class _Eager(torch.autograd.Function):
    """An op's eager autograd node: its implementation and formulas without
    the custom-op dispatcher, which costs ~100 us a forward-backward step."""

    @staticmethod
    def forward(ctx, op: Op, *inputs):
        output = op.impl(*inputs)
        op.setup(ctx, inputs, output)
        ctx.op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.op.gradient(ctx, *grads))


class Op:
    """A ``softkern::`` custom op and how to call it: through the dispatcher
    when traced (the compiler sees the op, its fake and its formula), else
    straight to its implementation, through ``_Eager`` when autograd
    tracks an input."""

    def __init__(
        self, name, impl, fake, setup=None, gradient=None, eager_formula=None
    ) -> None:
        self.op = torch.library.custom_op(f"softkern::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        if gradient is not None:
            self.op.register_autograd(gradient, setup_context=setup)
        self.name, self.impl = name, impl
        # Eager autograd may take other (setup, gradient) than the traced op's.
        self.setup, self.gradient = eager_formula or (setup, gradient)

    def __call__(self, *args: Any) -> Any:
        if _traced(args):
            return self.op(*args)
        if self.gradient is not None and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, Tensor) and a.requires_grad:
                    return _Eager.apply(self, *args)
        return self.impl(*args)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    if _dtypes.is_bfloat16(dtype):
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype)).dtype


# --- softmax and log_softmax --------------------------------------------------


def _softmax_ops(kind: str) -> tuple[Op, Op]:
    """The forward and backward ops of softmax or log_softmax (`kind`)."""
    forward = _raw(getattr(_softmax, kind))
    backward = _raw(getattr(_softmax, f"{kind}_backward"))

    def impl(
        x: Tensor, dim: int, dtype: torch.dtype | None, reduce: int, block: int | None
    ) -> Tensor:
        return eager(
            forward, (x, dim), {"dtype": dtype, "reduce": reduce, "block": block}
        )

    def fake(x, dim, dtype, reduce, block):
        _layout.normalize_dims(dim, x.dim())
        return x.new_empty(x.shape, dtype=x.dtype if dtype is None else dtype)

    def backward_impl(
        grad_output: Tensor, output: Tensor, dim: int, reduce: int, block: int | None
    ) -> Tensor:
        return eager(
            backward, (grad_output, output, dim), {"reduce": reduce, "block": block}
        )

    def backward_fake(grad_output, output, dim, reduce, block):
        return torch.empty_like(grad_output, memory_format=torch.contiguous_format)

    def backward_setup(ctx, inputs, output):
        grad_output, output, dim, _, _ = inputs
        ctx.save_for_backward(grad_output, output)
        ctx.dim = dim

    def second_gradient(ctx, grad_grad):
        """Double backward, in PyTorch's ops: the backward is linear in
        grad_output g; for softmax, r = y * (g - s), s = sum(g * y), so
        dr/dg is itself (the backward with grad_grad h), and dr/dy gives
        h * (g - s) - g * sum(h * y); for log_softmax, r = g - exp(y) *
        sum(g): dr/dg = h - sum(h * exp(y)), dr/dy = -h * exp(y) * sum(g)."""
        g, y = ctx.saved_tensors
        dim = ctx.dim
        if kind == "softmax":
            s = (g * y).sum(dim, keepdim=True)
            hy = (grad_grad * y).sum(dim, keepdim=True)
            grad_g = y * (grad_grad - hy)
            grad_y = grad_grad * (g - s) - g * hy
        else:
            p = y.exp()
            grad_g = grad_grad - (grad_grad * p).sum(dim, keepdim=True)
            grad_y = -grad_grad * p * g.sum(dim, keepdim=True)
        return grad_g, grad_y, None, None, None

    backward_op = Op(
        f"{kind}_backward", backward_impl, backward_fake, backward_setup,
        second_gradient,
    )  # fmt: skip

    def setup(ctx, inputs, output):
        x, dim, _, reduce, block = inputs
        ctx.save_for_backward(output)
        ctx.options = (dim, reduce, block)
        ctx.x_dtype = x.dtype

    def gradient(ctx, grad):
        (output,) = ctx.saved_tensors
        grad_x = backward_op(grad, output, *ctx.options)
        return grad_x.to(ctx.x_dtype), None, None, None, None

    return Op(kind, impl, fake, setup, gradient), backward_op


SOFTMAX, SOFTMAX_BACKWARD = _softmax_ops("softmax")
LOG_SOFTMAX, LOG_SOFTMAX_BACKWARD = _softmax_ops("log_softmax")


def _softmax_through(op: Op) -> Callable[..., Any]:
    def through(x, dim=None, *, dtype=None, out=None, reduce=2, block=None):
        _no_out(op.name, out)
        if dim is None:
            dim = _softmax.legacy_softmax_dim(x.dim(), f"softkern.{op.name}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            dtype = _torch_dtype(np.dtype(dtype))
        return op(x, dim, dtype, reduce, block)

    return through


# --- logsumexp ----------------------------------------------------------------


def _logsumexp_impl(
    x: Tensor, dim: list[int], keepdim: bool, reduce: int, block: int | None
) -> Tensor:
    fn = _raw(_softmax.logsumexp)
    return eager(fn, (x, tuple(dim), keepdim), {"reduce": reduce, "block": block})


def _logsumexp_fake(x, dim, keepdim, reduce, block):
    dims = _layout.normalize_dims(tuple(dim), x.dim())
    shape = _layout.reduced_shape(tuple(x.shape), dims, keepdim)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return x.new_empty(shape, dtype=dtype)


def _logsumexp_setup(ctx, inputs, output):
    x, dim, keepdim, _, _ = inputs
    ctx.save_for_backward(x, output)
    ctx.dims = _layout.normalize_dims(tuple(dim), x.dim())
    ctx.keepdim = keepdim


def _logsumexp_gradient(ctx, grad):
    x, lse = ctx.saved_tensors
    if not ctx.keepdim:
        for d in ctx.dims:
            grad, lse = grad.unsqueeze(d), lse.unsqueeze(d)
    # PyTorch's logsumexp_backward: NaN for slices of -inf, as there.
    return grad * (x - lse).exp(), None, None, None, None


LOGSUMEXP = Op(
    "logsumexp", _logsumexp_impl, _logsumexp_fake, _logsumexp_setup,
    _logsumexp_gradient,
)  # fmt: skip


def _logsumexp_through(x, dim, keepdim=False, *, reduce=2, block=None):
    dims = [dim] if isinstance(dim, int) else list(dim)
    return LOGSUMEXP(x, dims, bool(keepdim), reduce, block)


# --- sigmoid and logsigmoid ---------------------------------------------------


def _sigmoid_impl(x: Tensor, block: int | None) -> Tensor:
    return eager(_raw(_activations.sigmoid), (x,), {"block": block})


def _logsigmoid_impl(x: Tensor, block: int | None) -> Tensor:
    return eager(_raw(_activations.logsigmoid), (x,), {"block": block})


def _same_fake(x, block):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sigmoid_gradient(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.ops.aten.sigmoid_backward(grad, y), None


def _logsigmoid_gradient(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.sigmoid(-x), None


SIGMOID = Op("sigmoid", _sigmoid_impl, _same_fake, _save_output, _sigmoid_gradient)
LOGSIGMOID = Op(
    "logsigmoid", _logsigmoid_impl, _same_fake, _save_input, _logsigmoid_gradient
)


# --- cross_entropy and nll_loss -----------------------------------------------


def _class_dim(x: Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _loss_fake(input, target, weight, ignore_index, reduction, *rest):
    if reduction != "none":
        return input.new_empty(())
    shape = list(input.shape)
    del shape[_class_dim(input)]
    return input.new_empty(shape)


def _cross_entropy_impl(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    lse_square_scale: float,
    reduce: int,
    block: int | None,
) -> Tensor:
    fn = _raw(_losses.cross_entropy)
    args = (input, target, weight, ignore_index, reduction, label_smoothing)
    options = _loss_options(softcap, lse_square_scale, reduce, block)
    return eager(fn, args, options)


def _loss_options(
    softcap: float | None, lse_square_scale: float, reduce: int, block: int | None
) -> dict[str, Any]:
    return {
        "softcap": softcap,
        "lse_square_scale": lse_square_scale,
        "reduce": reduce,
        "block": block,
    }


def _cross_entropy_backward_impl(
    input: Tensor,
    target: Tensor,
    grad_output: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    lse_square_scale: float,
    reduce: int,
    block: int | None,
) -> Tensor:
    fn = _raw(_losses.cross_entropy_backward)
    args = (input, target, grad_output, weight, ignore_index, reduction)
    options = _loss_options(softcap, lse_square_scale, reduce, block)
    options["label_smoothing"] = label_smoothing
    return eager(fn, args, options)


def _like_input_fake(input, *rest):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


CROSS_ENTROPY_BACKWARD = Op(
    "cross_entropy_backward", _cross_entropy_backward_impl, _like_input_fake
)


# The gradients of the cross-entropy ops' arguments after input: none.
_NO_GRADS = (None,) * 9


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.options = inputs[3:]


def _cross_entropy_gradient(ctx, grad_loss):
    input, target, weight = ctx.saved_tensors
    grad = CROSS_ENTROPY_BACKWARD(input, target, grad_loss, weight, *ctx.options)
    return (grad, *_NO_GRADS)


# The op by itself differentiates through the backward kernel;
# softkern.cross_entropy takes the fused op below when the input requires grad.
CROSS_ENTROPY = Op(
    "cross_entropy", _cross_entropy_impl, _loss_fake, _cross_entropy_setup,
    _cross_entropy_gradient,
)  # fmt: skip


def _cross_entropy_and_grad_impl(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    lse_square_scale: float,
    reduce: int,
    block: int | None,
) -> tuple[Tensor, Tensor]:
    fn = _raw(_losses.cross_entropy_and_grad)
    args = (input, target, weight, ignore_index, reduction, label_smoothing)
    options = _loss_options(softcap, lse_square_scale, reduce, block)
    return eager(fn, args, options)


def _cross_entropy_and_grad_fake(input, target, weight, ignore_index, reduction, *rest):
    loss = _loss_fake(input, target, weight, ignore_index, reduction)
    return loss, _like_input_fake(input)


def _fused_setup(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.reduction = inputs[4]
    ctx.class_dim = _class_dim(inputs[0])


def _fused_gradient(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if ctx.reduction == "none":
        grad_loss = grad_loss.unsqueeze(ctx.class_dim)
    return (grad * grad_loss, *_NO_GRADS)


def _fused_eager_setup(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # No zeros for the gradient's own (unused) gradient: a full-size fill.
    ctx.set_materialize_grads(False)
    # Held outside save_for_backward, so that backward can hand autograd the
    # only reference: AccumulateGrad then keeps it as x.grad without a copy.
    ctx.grad = grad
    # For a second backward (retain_graph=True, gradcheck): the inputs.
    ctx.save_for_backward(*inputs[:3])
    ctx.options = inputs[3:]
    ctx.reduction = inputs[4]
    ctx.class_dim = _class_dim(inputs[0])


def _fused_eager_gradient(ctx, grad_loss, _grad_of_grad):
    """The fused gradient, handed over and scaled in place (it is ours
    alone), not at all for the usual ``loss.backward()`` (grad_loss 1 on
    the CPU: a 0-d check; on the GPU it would cost a synchronization, so
    the GPU always scales). A second backward through the same loss runs
    the backward kernel on the saved inputs."""
    if grad_loss is None:
        return (None, *_NO_GRADS)
    grad = ctx.__dict__.pop("grad", None)
    if grad is None:
        input, target, weight = ctx.saved_tensors
        grad = CROSS_ENTROPY_BACKWARD(input, target, grad_loss, weight, *ctx.options)
    elif ctx.reduction == "none":
        grad.mul_(grad_loss.unsqueeze(ctx.class_dim))
    elif grad_loss.is_cuda or grad_loss.item() != 1.0:
        grad.mul_(grad_loss)
    return (grad, *_NO_GRADS)


CROSS_ENTROPY_AND_GRAD = Op(
    "cross_entropy_and_grad", _cross_entropy_and_grad_impl,
    _cross_entropy_and_grad_fake, _fused_setup, _fused_gradient,
    eager_formula=(_fused_eager_setup, _fused_eager_gradient),
)  # fmt: skip


def _no_target_grad(name: str, target: Any, weight: Any) -> None:
    for arg, value in (("target", target), ("weight", weight)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise RuntimeError(
                f"softkern.{name}: the gradient with respect to {arg} is not "
                "implemented; detach it"
            )


def _as_tensor_arg(value: Any) -> Any:
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


def _cross_entropy_through(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    softcap=None,
    lse_square_scale=0.0,
    reduce=2,
    block=None,
):
    _no_target_grad("cross_entropy", target, weight)
    # Checked here, as the NumPy path does, before the schema's floats
    # would take a bool or fail in other words.
    fn = "softkern.cross_entropy"
    cap = _losses._check_softcap(softcap, fn)
    args = (
        _as_tensor_arg(input),
        _as_tensor_arg(target),
        None if weight is None else _as_tensor_arg(weight),
        int(ignore_index),
        reduction,
        _losses._check_smoothing(label_smoothing, fn),
        cap or None,
        _losses._check_lse_square_scale(lse_square_scale, fn),
        reduce,
        block,
    )
    if args[0].requires_grad and torch.is_grad_enabled():
        return CROSS_ENTROPY_AND_GRAD(*args)[0]
    return CROSS_ENTROPY(*args)


def _nll_loss_impl(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    reduce: int,
    block: int | None,
) -> Tensor:
    fn = _raw(_losses.nll_loss)
    args = (input, target, weight, ignore_index, reduction)
    return eager(fn, args, {"reduce": reduce, "block": block})


def _nll_setup(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, _, _ = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _nll_gradient(ctx, grad_loss):
    """-weight[t] * grad at each counted target's class, 0 elsewhere, the
    mean's divisor the counted targets' summed weight (as PyTorch)."""
    input, target, weight = ctx.saved_tensors
    class_dim = _class_dim(input)
    counted = target != ctx.ignore_index
    safe = torch.where(counted, target, 0)
    w = weight[safe] if weight is not None else torch.ones_like(safe, dtype=input.dtype)
    w = torch.where(counted, w.to(input.dtype), 0)
    coefficient = -w * grad_loss
    if ctx.reduction == "mean":
        coefficient = torch.where(counted, coefficient / w.sum(), 0)
    grad = torch.zeros_like(input, memory_format=torch.contiguous_format)
    grad.scatter_(
        class_dim, safe.unsqueeze(class_dim), coefficient.unsqueeze(class_dim)
    )
    return grad, None, None, None, None, None, None


NLL_LOSS = Op("nll_loss", _nll_loss_impl, _loss_fake, _nll_setup, _nll_gradient)


def _nll_loss_through(
    input, target, weight=None, ignore_index=-100, reduction="mean", *, reduce=2,
    block=None,
):  # fmt: skip
    _no_target_grad("nll_loss", target, weight)
    args = (
        _as_tensor_arg(input),
        _as_tensor_arg(target),
        None if weight is None else _as_tensor_arg(weight),
    )
    return NLL_LOSS(*args, int(ignore_index), reduction, reduce, block)


# The public functions that go through an op when autograd or the compiler
# needs them, by name.
THROUGH_OPS: dict[str, Callable[..., Any]] = {
    "softmax": _softmax_through(SOFTMAX),
    "log_softmax": _softmax_through(LOG_SOFTMAX),
    "logsumexp": _logsumexp_through,
    "sigmoid": lambda x, *, block=None: SIGMOID(x, block),
    "logsigmoid": lambda x, *, block=None: LOGSIGMOID(x, block),
    "cross_entropy": _cross_entropy_through,
    "nll_loss": _nll_loss_through,
}

# Every registered operator (torch.ops.softkern.<name>), for opcheck.
OPS = (
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "logsumexp",
    "sigmoid",
    "logsigmoid",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_and_grad",
    "nll_loss",
)
