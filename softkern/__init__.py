"""softkern: Numba kernels for reductions, broadcasting and fused softmax.

Every operation has an @njit CPU kernel and a @cuda.jit GPU kernel; the public
function picks one from the array it is given (NumPy in, NumPy out; a CUDA
array in, the same kind of array out).
"""

from numba import config as _numba_config

from softkern import _threads, nn
from softkern._dispatch import device_of
from softkern.ops.activations import gumbel_softmax, logsigmoid, sigmoid
from softkern.ops.broadcast import broadcast_shapes, expand, where
from softkern.ops.losses import (
    cross_entropy,
    cross_entropy_and_grad,
    cross_entropy_backward,
    nll_loss,
)
from softkern.ops.reduce import amax, amin, dot, sum
from softkern.ops.softmax import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
    softmax_plan,
)

# Before any parallel kernel runs: Numba picks its threading layer then.
_threads.configure()

if _numba_config.ENABLE_CUDASIM:
    # The simulator lacks warp intrinsics; ours make reduce=2 run there too.
    from softkern.testing import cudasim as _cudasim

    _cudasim.install()

__version__ = "0.1.0"
__all__ = [
    "amax",
    "amin",
    "broadcast_shapes",
    "cross_entropy",
    "cross_entropy_and_grad",
    "cross_entropy_backward",
    "device_of",
    "dot",
    "expand",
    "gumbel_softmax",
    "log_softmax",
    "log_softmax_backward",
    "logsigmoid",
    "logsumexp",
    "nll_loss",
    "nn",
    "sigmoid",
    "softmax",
    "softmax_backward",
    "softmax_plan",
    "sum",
    "where",
]
