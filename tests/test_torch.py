"""softkern called from PyTorch: tensors in and out, autograd through the
``softkern::`` custom ops, opcheck, gradcheck, torch.compile, the modules.

PyTorch is the oracle throughout: values, gradients and errors are compared
with torch's own functions on the same random tensors.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from numpy.exceptions import AxisError

import softkern as sk

torch = pytest.importorskip("torch")
F = torch.nn.functional

from softkern import _torch  # noqa: E402  (needs torch)


def tensor(rng, shape, dtype=torch.float64, grad=False):
    t = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    return t.requires_grad_(grad)


def targets(rng, shape, classes, ignore=None):
    t = torch.from_numpy(rng.integers(0, classes, shape))
    if ignore is not None:
        t[torch.from_numpy(rng.random(shape) < 0.25)] = ignore
    return t


# --- tensors in, tensors out ----------------------------------------------------


def test_cpu_tensors_in_give_tensors_of_the_numpy_results_out(rng):
    x = tensor(rng, (6, 7), torch.float32)
    a = x.numpy()
    t = targets(rng, (6,), 7)
    calls = [
        (lambda v: sk.softmax(v, 1), a, x),
        (lambda v: sk.log_softmax(v, 0), a, x),
        (lambda v: sk.logsumexp(v, (0, 1)), a, x),
        (lambda v: sk.sum(v, 1), a, x),
        (lambda v: sk.amax(v, 0, keepdim=True), a, x),
        (lambda v: sk.amin(v), a, x),
        (lambda v: sk.dot(v[0], v[1]), a, x),
        (lambda v: sk.sigmoid(v), a, x),
        (lambda v: sk.logsigmoid(v), a, x),
        (lambda v: sk.expand(v[:1], 3, 7), a, x),
        (lambda v: sk.where(v > 0, v, 0.0), a, x),
        (lambda v: sk.softmax_backward(v, v, 1), a, x),
        (lambda v: sk.log_softmax_backward(v, v, 1), a, x),
        (lambda v: sk.gumbel_softmax(v, seed=3), a, x),
    ]
    for fn, host, t_in in calls:
        expected = fn(host)
        got = fn(t_in)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), expected)
    for fn in (sk.cross_entropy, sk.nll_loss, sk.cross_entropy_backward):
        got = fn(x, t)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), fn(a, t.numpy()))
    loss, grad = sk.cross_entropy_and_grad(x, t)
    assert isinstance(loss, torch.Tensor) and isinstance(grad, torch.Tensor)


def test_tensors_are_read_in_place_and_out_is_returned_itself(rng):
    x = tensor(rng, (4, 9, 5), torch.float32)
    view = x.transpose(0, 2)  # strided: read through the view, no copy
    assert np.shares_memory(_torch.host_view(view), x.numpy())
    np.testing.assert_array_equal(
        sk.softmax(view, 1).numpy(), sk.softmax(view.numpy(), 1)
    )
    out = torch.full((4, 9, 5), float("nan"))
    assert sk.log_softmax(x, 2, out=out) is out
    torch.testing.assert_close(out, torch.log_softmax(x, 2))
    before = x.clone()
    assert sk.softmax(x, 1, out=x) is x  # in place, as out=x allows
    torch.testing.assert_close(x, torch.softmax(before, 1))
    y = tensor(rng, (5, 3), torch.float64)
    g = torch.full_like(y, float("nan"))
    t = targets(rng, (5,), 3)
    assert sk.cross_entropy_and_grad(y, t, out=g)[1] is g
    assert not g.isnan().any()


def test_mixed_numpy_and_tensor_arguments(rng):
    x = tensor(rng, (5, 4))
    t = targets(rng, (5,), 4)
    loss = sk.cross_entropy(x.numpy(), t)  # NumPy logits, tensor targets
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    w = sk.where(x.numpy() > 0, x, 0.0)
    torch.testing.assert_close(w, torch.where(x > 0, x, 0.0))


def test_results_do_not_track_grad_when_grad_is_off(rng):
    x = tensor(rng, (3, 4), grad=True)
    with torch.no_grad():
        y = sk.softmax(x, 1)
    assert not y.requires_grad
    assert not sk.sum(x).requires_grad  # no autograd formula: a plain result


def test_input_tensors_are_not_modified(rng):
    x = tensor(rng, (6, 5), grad=True)
    t = targets(rng, (6,), 5, ignore=-100)
    before = x.detach().clone()
    sk.cross_entropy(x, t, label_smoothing=0.2).backward()
    sk.log_softmax(x, 0).sum().backward()
    assert torch.equal(x.detach(), before)


def test_errors_in_pytorch_words(rng):
    x = tensor(rng, (3, 4))
    with pytest.raises(AxisError):
        sk.softmax(x, 2)
    with pytest.raises(AxisError):
        sk.softmax(x.requires_grad_(), 2)
    with pytest.raises(RuntimeError, match=r"out=.*automatic differentiation"):
        sk.softmax(x, 1, out=torch.empty(3, 4, dtype=torch.float64))
    probs = torch.softmax(tensor(rng, (3, 4)), 1).requires_grad_()
    with pytest.raises(RuntimeError, match="respect to target"):
        sk.cross_entropy(x, probs)
    with pytest.raises(IndexError):
        sk.cross_entropy(x.detach(), torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError):
        sk.where(x > 0, x, torch.zeros(5))


def test_an_unregistered_function_under_fake_tensors_says_so():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(3, 4)
        with pytest.raises(TypeError, match="not a registered torch operator"):
            sk.sum(fake)
        assert sk.softmax(fake, 1).shape == (3, 4)  # registered: the fake impl


# --- autograd ---------------------------------------------------------------------

GRAD_CASES = {
    # name: (softkern call, torch call, input shape)
    "softmax d1": (lambda x: sk.softmax(x, 1), lambda x: torch.softmax(x, 1), (5, 7)),
    "softmax d0 3-d": (
        lambda x: sk.softmax(x, 0),
        lambda x: torch.softmax(x, 0),
        (4, 3, 5),
    ),
    "log_softmax d-1": (
        lambda x: sk.log_softmax(x, -1),
        lambda x: torch.log_softmax(x, -1),
        (5, 7),
    ),
    "log_softmax d1 3-d": (
        lambda x: sk.log_softmax(x, 1),
        lambda x: torch.log_softmax(x, 1),
        (2, 6, 3),
    ),
    "logsumexp d1": (
        lambda x: sk.logsumexp(x, 1),
        lambda x: torch.logsumexp(x, 1),
        (5, 7),
    ),
    "logsumexp (0, 2) keepdim": (
        lambda x: sk.logsumexp(x, (0, 2), keepdim=True),
        lambda x: torch.logsumexp(x, (0, 2), keepdim=True),
        (3, 4, 5),
    ),
    "sigmoid": (sk.sigmoid, torch.sigmoid, (4, 6)),
    "logsigmoid": (sk.logsigmoid, F.logsigmoid, (4, 6)),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_equal_pytorchs(rng, case):
    ours, theirs, shape = GRAD_CASES[case]
    for dtype in (torch.float32, torch.float64):
        x = tensor(rng, shape, dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2)
        w = tensor(rng, y2.shape, dtype)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(rng, case):
    ours, _, shape = GRAD_CASES[case]
    x = tensor(rng, shape, grad=True)
    assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_second_derivatives(rng, kind):
    fn = getattr(sk, kind)
    x = tensor(rng, (3, 5), grad=True)
    assert torch.autograd.gradgradcheck(lambda v: fn(v, 1), (x,))


LOSS_OPTIONS = [
    # (target kind, options); input (N, C) unless "spatial"
    ("index", {}),
    ("index", {"reduction": "sum"}),
    ("index", {"reduction": "none", "label_smoothing": 0.15}),
    ("index", {"weight": True, "ignore_index": 2}),
    ("index", {"weight": True, "label_smoothing": 0.3, "ignore_index": -100}),
    ("probs", {}),
    ("probs", {"reduction": "none", "weight": True, "label_smoothing": 0.1}),
    ("spatial", {"weight": True, "ignore_index": 1, "reduction": "mean"}),
]


def _loss_args(rng, kind, options, dtype=torch.float64):
    classes = 6
    shape = (4, classes, 3) if kind == "spatial" else (7, classes)
    x = tensor(rng, shape, dtype)
    if kind == "probs":
        t = torch.softmax(tensor(rng, shape, dtype), 1)
    else:
        batch = (shape[0], *shape[2:])
        t = targets(rng, batch, classes, ignore=options.get("ignore_index"))
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.from_numpy(rng.random(classes) + 0.5).to(dtype)
    return x, t, kw


@pytest.mark.parametrize(("kind", "options"), LOSS_OPTIONS)
def test_cross_entropy_gradients_equal_pytorchs(rng, kind, options):
    for dtype in (torch.float32, torch.float64):
        x, t, kw = _loss_args(rng, kind, options, dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        l1, l2 = sk.cross_entropy(x1, t, **kw), F.cross_entropy(x2, t, **kw)
        torch.testing.assert_close(l1, l2)
        g = tensor(rng, l2.shape, dtype)
        l1.backward(g)
        l2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(("kind", "options"), LOSS_OPTIONS)
def test_cross_entropy_gradcheck(rng, kind, options):
    x, t, kw = _loss_args(rng, kind, options)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: sk.cross_entropy(v, t, **kw), (x,))


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum"}, {"reduction": "none", "weight": True},
     {"weight": True, "ignore_index": 3}],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["index", "spatial"])
def test_nll_loss_gradients(rng, kind, options):
    x, t, kw = _loss_args(rng, kind, options)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    l1 = sk.nll_loss(torch.log_softmax(x1, 1), t, **kw)
    l2 = F.nll_loss(torch.log_softmax(x2, 1), t, **kw)
    torch.testing.assert_close(l1, l2)
    g = tensor(rng, l2.shape)
    l1.backward(g)
    l2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    lp = torch.log_softmax(x, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: sk.nll_loss(v, t, **kw), (lp,))


def test_all_ignored_mean_gradient_is_zero_as_in_pytorch(rng):
    x = tensor(rng, (3, 4))
    t = torch.full((3,), -100)
    for ours, theirs in (
        (sk.nll_loss, F.nll_loss),
        (sk.cross_entropy, F.cross_entropy),
    ):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        l1, l2 = ours(x1, t), theirs(x2, t)
        assert l1.isnan() and l2.isnan()
        l1.backward()
        l2.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


def _capped_z_loss(x, t, cap, zscale, **kw):
    """PyTorch's cross_entropy of soft-capped logits plus the z-loss of the
    counted rows (class indices, no weight: the mean over counted rows)."""
    z = cap * torch.tanh(x / cap)
    counted = t != kw.get("ignore_index", -100)
    per = F.cross_entropy(z, t, reduction="none", **kw)
    per = per + zscale * torch.logsumexp(z, 1) ** 2 * counted
    return per.sum() / counted.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_and_z_loss_through_autograd(rng, dtype):
    x = tensor(rng, (6, 9), dtype) * 10
    t = targets(rng, (6,), 9, ignore=-100)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = {"label_smoothing": 0.1}
    l1 = sk.cross_entropy(x1, t, softcap=7.0, lse_square_scale=0.05, **kw)
    l2 = _capped_z_loss(x2, t, 7.0, 0.05, **kw)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    module = sk.nn.CrossEntropyLoss(
        label_smoothing=0.1, softcap=7.0, lse_square_scale=0.05
    )
    torch.testing.assert_close(module(x, t), l2.detach())
    for bad in ({"softcap": True}, {"softcap": 0.0}, {"lse_square_scale": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sk.cross_entropy(x1, t, **bad)
    x64 = x.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: sk.cross_entropy(v, t, softcap=3.0, lse_square_scale=0.1), (x64,)
    )


# --- the registered operators ------------------------------------------------------


def _op_samples(rng):
    x = tensor(rng, (5, 6))
    t = targets(rng, (5,), 6, ignore=-100)
    w = torch.from_numpy(rng.random(6) + 0.5)
    g = tensor(rng, (5, 6))
    # label_smoothing 0.1, softcap 8, lse_square_scale 0.01, reduce, block
    ce = (x, t, w, -100, "mean", 0.1, 8.0, 0.01, 2, None)
    return {
        "softmax": (x, 1, None, 2, None),
        "log_softmax": (x, 0, torch.float32, 2, None),
        "softmax_backward": (g, torch.softmax(x, 1), 1, 2, None),
        "log_softmax_backward": (g, torch.log_softmax(x, 1), 1, 2, None),
        "logsumexp": (x, [0, 1], True, 2, None),
        "sigmoid": (x, None),
        "logsigmoid": (x, 32),
        "cross_entropy": ce,
        "cross_entropy_and_grad": ce,
        "cross_entropy_backward": (x, t, torch.tensor(0.5, dtype=x.dtype), *ce[2:]),
        "nll_loss": (torch.log_softmax(x, 1), t, w, -100, "none", 2, None),
    }


@pytest.mark.parametrize("name", _torch.OPS)
def test_opcheck(rng, name):
    args = list(_op_samples(rng)[name])
    # Differentiable first argument where the op has a formula.
    args[0] = args[0].clone().requires_grad_(name != "cross_entropy_backward")
    if name.endswith("softmax_backward"):
        args[1] = args[1].clone().requires_grad_()
    op = getattr(torch.ops.softkern, name).default
    torch.library.opcheck(op, tuple(args))


def test_compile_fullgraph_trains_like_eager(rng):
    """A small model calling softkern compiles into one graph, and one
    training step gives eager's loss and gradients."""
    # The default backend (inductor) needs a C compiler; without one, the
    # graph still has to trace in full.
    backend = "inductor" if shutil.which("cc") or shutil.which("gcc") else "aot_eager"

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(8, 16)
            self.head = torch.nn.Linear(16, 5)
            self.loss = sk.nn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x, t):
            h = self.hidden(x)
            h = h * sk.sigmoid(h) + sk.logsigmoid(h)
            logits = self.head(h)
            attn = sk.softmax(logits, -1)
            logp = sk.log_softmax(logits + attn, 1)
            return (
                self.loss(logits, t)
                + sk.nll_loss(logp, t)
                + 0.01 * sk.logsumexp(logits, 1).mean()
            )

    torch.manual_seed(0)
    model = Model().double()
    x = tensor(rng, (12, 8))
    t = targets(rng, (12,), 5)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss_c = compiled(x, t)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = model(x, t)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, model.parameters(), strict=True):
        torch.testing.assert_close(gc, p.grad)


# --- modules ------------------------------------------------------------------------


def test_modules_are_torch_modules_with_pytorchs_arguments(rng):
    w = torch.from_numpy(rng.random(5) + 0.5).float()
    ours = sk.nn.CrossEntropyLoss(
        w, ignore_index=1, reduction="sum", label_smoothing=0.2
    )
    theirs = torch.nn.CrossEntropyLoss(
        w, ignore_index=1, reduction="sum", label_smoothing=0.2
    )
    assert isinstance(ours, torch.nn.Module)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    x = tensor(rng, (6, 5), torch.float32, grad=True)
    t = targets(rng, (6,), 5, ignore=1)
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert ours.double().weight.dtype == torch.float64  # a buffer, as in torch
    nll = sk.nn.NLLLoss(reduction="none")
    torch.testing.assert_close(nll(x, t), torch.nn.NLLLoss(reduction="none")(x, t))
    for cls in (sk.nn.Softmax, sk.nn.LogSoftmax):
        m = cls(dim=0)
        assert repr(m) == repr(getattr(torch.nn, cls.__name__)(dim=0))
        torch.testing.assert_close(m(x), getattr(torch.nn, cls.__name__)(0)(x))
    with pytest.warns(UserWarning, match="size_average"):
        legacy = sk.nn.NLLLoss(size_average=False)
    assert legacy.reduction == "sum"
    with pytest.raises(ValueError, match="reduction"):
        sk.nn.CrossEntropyLoss(reduction="average")


def test_modules_without_torch_are_plain_callables(rng):
    from softkern import nn

    classes = nn._build(object, False)
    x = rng.standard_normal((4, 3))
    t = rng.integers(0, 3, 4)
    loss = classes["CrossEntropyLoss"](ignore_index=0)
    assert not isinstance(loss, torch.nn.Module)
    np.testing.assert_array_equal(loss(x, t), sk.cross_entropy(x, t, ignore_index=0))
    sm = classes["Softmax"](1)
    assert repr(sm) == "Softmax(dim=1)" and sm == classes["Softmax"](1)
    np.testing.assert_array_equal(sm(x), sk.softmax(x, 1))


def test_no_warning_on_the_tensor_path(rng):
    x = tensor(rng, (3, 4), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.softmax(x, 1)
        sk.softmax(x.requires_grad_(), 1).sum().backward()


def test_fused_gradient_survives_a_second_backward(rng):
    """The first backward hands the fused gradient to autograd; a second one
    through the same graph recomputes it from the saved logits."""
    x, t, kw = _loss_args(rng, "index", {"weight": True, "ignore_index": 2})
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    l1, l2 = sk.cross_entropy(x1, t, **kw), F.cross_entropy(x2, t, **kw)
    for g in (1.0, 0.25):
        l1.backward(torch.tensor(g, dtype=x.dtype), retain_graph=True)
        l2.backward(torch.tensor(g, dtype=x.dtype), retain_graph=True)
        torch.testing.assert_close(x1.grad, x2.grad)
