"""LLVM float intrinsics for @njit code: ``fma`` and ``maxnum``.

fma: a fused multiply-add, LLVM's ``llvm.fma``.

Python 3.11 has no ``math.fma`` and Numba does not expose one, yet ``dot``
must round each product-sum once, as the GPU's ``fma.rn`` does, for the two
devices to agree bit for bit. On a CPU with FMA units LLVM emits vfmadd, and
it vectorises in loops; elsewhere it calls the C library's correctly rounded
``fma``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def fma(typingctx, a, b, c):
    """fma(a, b, c) = a * b + c with a single rounding (a, b, c one float type)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        llty = context.get_value_type(signature.return_type)
        fnty = ir.FunctionType(llty, [llty, llty, llty])
        fn = builder.module.declare_intrinsic("llvm.fma", [llty], fnty)
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def maxnum(typingctx, a, b):
    """The larger of a and b, LLVM's ``llvm.maxnum``: a NaN operand is
    ignored (IEEE maxNum), which is what lets LLVM vectorise a running max
    over a loop without fast-math flags. Callers that must propagate NaN
    do it some other way."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        llty = context.get_value_type(signature.return_type)
        fnty = ir.FunctionType(llty, [llty, llty])
        fn = builder.module.declare_intrinsic("llvm.maxnum", [llty], fnty)
        return builder.call(fn, args)

    return a(a, b), codegen
