"""Compile every GPU kernel to PTX for a real target and report facts about it.

The CUDA simulator runs kernels as Python, so a test suite on a machine
without a GPU would never see a kernel that NVVM rejects, a float32 kernel
that silently computes in float64, a reduce=2 kernel whose shuffles were lost,
or a kernel that spills to local memory. ``numba.cuda.compile_ptx`` needs no
GPU, only NVVM (the ``numba-cuda[cu13]`` wheels), so this module compiles
each kernel of the ``ptx_cases`` of ``softkern.cuda.reduce``, ``copy``,
``softmax`` and ``broadcast``
for one compute capability and prints one JSON line per kernel::

    NUMBA_ENABLE_CUDASIM=0 python -m softkern.testing.ptx --cc 9.0

It runs as its own process because the test session has the simulator
switched on (which has no ``compile_ptx``), and one process per compute
capability because numba-cuda caches each device function's code with the
compute capability it was first compiled for.

``kernel_facts`` does the PTX reading and imports nothing, so it is unit
tested on hand-written PTX in the simulator session too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import types

# How many offending PTX lines a report keeps: enough to see the cause.
SHOWN = 5

_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
# NVVM's name for 64-bit float registers (declared `.reg .f64 %fd<N>;`): an
# instruction with a typeless opcode (mov.b64, a bit cast) on one still
# handles a float64.
_F64_REGISTER = re.compile(r"%fd\d+\b")


def _instruction(line: str) -> str | None:
    """The instruction of one PTX line without its predicate guard, or None
    for directives, labels, braces and blank lines."""
    line = line.split("//", 1)[0].strip().strip("{}").strip()
    if not line or line.startswith(".") or line.endswith(":"):
        return None
    if line.startswith("@"):  # guard: "@%p1 bra ..." or "@!%p1 bra ..."
        line = line.partition(" ")[2].strip()
    return line or None


def kernel_facts(ptx: str) -> dict:
    """What the tests assert about one kernel, read from its PTX.

    Matching is on whole opcode components and directive tokens, never on
    substrings: Numba's mangled names contain words such as ``locals`` (the
    ``<locals>`` of a factory-made function) and ``f64``-like fragments.

    - ``f64_ops``: the first few instructions that handle a float64, i.e. whose
      opcode has an ``f64`` type component (``add.f64``, ``cvt.f64.f32``,
      ``cvt.rn.f32.f64``, ``ld.global.f64``, ``setp.lt.f64``, ...) or that
      name an ``%fd`` register (a bit cast such as ``mov.b64 %rd1, %fd1``).
      ``.reg .f64`` declarations are directives, not counted: an unused one
      costs nothing, and a used one shows up through its instructions.
      ``f64_count`` is the full count.
    - ``uses_shfl_sync``: any ``shfl.sync.*`` instruction.
    - ``local_memory``: any ``.local`` state-space declaration (Numba's stack
      frame, ``__local_depot``) or instruction in the local state space
      (``ld.local``, ``st.local``, ``cvta.local``, ``cvta.to.local``);
      ``local_lines`` shows the first few.
    """
    f64_ops: list[str] = []
    f64_count = 0
    shfl_sync = False
    local_lines: list[str] = []
    for raw in ptx.splitlines():
        code = raw.split("//", 1)[0].strip().strip("{}").strip()
        if code.startswith("."):
            if ".local" in code.replace(";", " ").split():
                local_lines.append(code)
            continue
        instruction = _instruction(code)
        if instruction is None:
            continue
        opcode = instruction.split(None, 1)[0].rstrip(";")
        parts = opcode.split(".")
        if "f64" in parts[1:] or _F64_REGISTER.search(instruction):
            f64_count += 1
            if len(f64_ops) < SHOWN:
                f64_ops.append(instruction)
        if parts[0] == "shfl" and "sync" in parts[1:]:
            shfl_sync = True
        if "local" in parts[1:]:
            local_lines.append(instruction)
    return {
        "f64_ops": f64_ops,
        "f64_count": f64_count,
        "uses_shfl_sync": shfl_sync,
        "local_memory": bool(local_lines),
        "local_lines": local_lines[:SHOWN],
    }


def ptxas_facts(ptx: str, cc: tuple[int, int]) -> dict:
    """Registers, stack frame and spills as ptxas reports them.

    These are not in the PTX: register allocation happens in ptxas. nvJitLink
    (in the cu13 wheels) runs ptxas without a GPU; its verbose log has one
    "Used N registers" and one stack/spill line per function. registers is
    the largest count, the byte counts are summed over functions (an
    uninlined device function spills on its own line). All None where
    nvJitLink is missing: these facts are extra, not what the tests rest on.
    """
    empty = dict.fromkeys(("registers", "stack_frame", "spill_stores", "spill_loads"))
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return empty
    data = ptx.encode()
    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "k")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")
    registers = [int(n) for n in _REGISTERS.findall(text)]
    frames = [tuple(map(int, m)) for m in _FRAME.findall(text)]
    if not registers or not frames:
        return empty
    return {
        "registers": max(registers),
        "stack_frame": sum(f[0] for f in frames),
        "spill_stores": sum(f[1] for f in frames),
        "spill_loads": sum(f[2] for f in frames),
    }


def _unavailable(cc: tuple[int, int]) -> str | None:
    """Why kernels cannot be compiled here, or None if they can.

    A trivial kernel is compiled first, so that a missing NVVM (numba-cuda
    without its cu13 wheels) is told apart from a kernel NVVM rejects: the
    first is a reason to skip, the second a failure.
    """
    try:
        from numba import cuda, float32

        def probe(x):
            x[0] = x[0] + float32(1)

        cuda.compile_ptx(probe, (float32[::1],), cc=cc)
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        if "nvvm" in message.lower() or isinstance(e, ImportError):
            return message
        raise
    return None


def _use_target_cc(cc: tuple[int, int]) -> None:
    """Let kernels that call device functions compile without a GPU.

    numba-cuda compiles a ``@cuda.jit(device=True)`` function for
    ``get_current_device().compute_capability``, which needs a CUDA driver;
    without a GPU that raises even under ``compile_ptx``. Device functions are
    compiled for the target cc instead, which is what compile_ptx does for the
    kernel itself; on a GPU machine too, where the real device would otherwise
    impose its own cc on the device functions of a cc 8.0 check.
    """
    from numba.cuda import dispatcher

    target = types.SimpleNamespace(compute_capability=cc)
    dispatcher.get_current_device = lambda: target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 8.0")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument(
        "--no-ptxas", action="store_true", help="skip the registers/spills facts"
    )
    parser.add_argument(
        "--strategies",
        default="0,1,2",
        help="compile only the kernels of these reduce= strategies (and those "
        "without one), e.g. 2",
    )
    args = parser.parse_args(argv)
    cc = tuple(int(p) for p in args.cc.split("."))

    from numba import config

    if config.ENABLE_CUDASIM:
        print(json.dumps({"unavailable": "NUMBA_ENABLE_CUDASIM is on: no compile_ptx"}))
        return 0
    reason = _unavailable(cc)
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return 0
    _use_target_cc(cc)

    from numba import cuda

    from softkern.cuda import (
        activations,
        broadcast,
        convert,
        copy,
        losses,
        reduce,
        softmax,
    )

    cases = itertools.chain(
        reduce.ptx_cases(args.block),
        copy.ptx_cases(),
        convert.ptx_cases(),
        softmax.ptx_cases(args.block),
        broadcast.ptx_cases(),
        losses.ptx_cases(args.block),
        activations.ptx_cases(args.block),
    )
    strategies = {int(k) for k in args.strategies.split(",")}
    for name, kernel, argtypes, dtype, strategy in cases:
        if strategy is not None and strategy not in strategies:
            continue
        record = {"name": name, "dtype": dtype, "strategy": strategy, "cc": args.cc}
        try:
            # the kernel's own launch bound, so ptxas budgets registers as
            # it will for the real launch
            bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
            ptx, _ = cuda.compile_ptx(
                kernel.py_func, argtypes, cc=cc, launch_bounds=bounds
            )
            record.update(kernel_facts(ptx))
        except Exception as e:  # reported, so one failure hides no other
            record["error"] = f"{type(e).__name__}: {e}"[:2000]
        else:
            if not args.no_ptxas:
                try:
                    record.update(ptxas_facts(ptx, cc))
                except Exception as e:  # ptxas rejecting NVVM's PTX
                    record["error"] = f"ptxas: {type(e).__name__}: {e}"[:2000]
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
