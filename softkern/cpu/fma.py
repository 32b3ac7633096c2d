"""A fused multiply-add for @njit code: LLVM's ``llvm.fma`` intrinsic.

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
