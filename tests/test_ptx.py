"""Every GPU kernel compiles for real, and its PTX says what we meant.

The session runs the GPU kernels in Numba's CUDA simulator when there is no
GPU, and the simulator never compiles anything. These tests compile every
kernel of ``softkern.cuda.reduce`` for every supported dtype with
``numba.cuda.compile_ptx`` (NVVM, no GPU needed) for compute capabilities
8.0 and 9.0, and check from the PTX that

- float32 and int32 kernels hold no float64 instruction (a stray Python float
  literal or an int64 → float promotion makes a kernel quietly 2-64x slower
  on consumer GPUs);
- reduce=2 kernels really use ``shfl.sync`` (the strategy's whole point);
- no kernel touches local memory (stack arrays, Numba's exception state or
  register spills would all land there, at global-memory latency).

The compiling runs in ``python -m softkern.testing.ptx`` subprocesses with
the simulator off, one per compute capability (numba-cuda caches device
functions per process with the first cc it compiled them for), started when
collection ends so that they compile while the rest of the suite runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softkern.testing.ptx import kernel_facts

# Where conftest keeps the compiles it started early.
PTX_JOBS = pytest.StashKey[dict]()

ROOT = Path(__file__).resolve().parents[1]
CCS = ("8.0", "9.0")
# Every kernel for cc 9.0; for cc 8.0 the default strategy's (and those
# without a strategy): reduce=0/1 differ from 2 only in the block's fold,
# which the 9.0 records check, and compiling all of them twice made the
# wait for NVVM the longest part of the suite (184 s after the last test).
CC_ARGS = {"8.0": ["--strategies", "2"], "9.0": []}
TIMEOUT_S = 480
# int32 sums accumulate in int64 and no int32 kernel has a reason to touch
# floats at all (nor bool's and the small integers'), and float16 and
# bfloat16 compute in float32, so they get the float32 check too.
NO_F64_DTYPES = (
    "float16",
    "bfloat16",
    "float32",
    "int32",
    "bool",
    "int8",
    "uint8",
    "int16",
)


# --- kernel_facts on hand-written PTX (independent of NVVM) -----------------


def test_f64_arithmetic_is_found():
    facts = kernel_facts("\tadd.f64 \t%fd3, %fd1, %fd2;\n\tadd.f32 \t%f3, %f1, %f2;")
    assert facts["f64_ops"] == ["add.f64 \t%fd3, %fd1, %fd2;"]
    assert facts["f64_count"] == 1


def test_f64_conversions_both_ways_are_found():
    ptx = "\tcvt.f64.f32 \t%fd1, %f1;\n\tcvt.rn.f32.f64 \t%f2, %fd1;\n"
    assert kernel_facts(ptx)["f64_count"] == 2


def test_f64_behind_a_guard_and_by_register_is_found():
    ptx = "\t@%p1 fma.rn.f64 \t%fd4, %fd1, %fd2, %fd3;\n\tmov.b64 \t%rd1, %fd4;\n"
    facts = kernel_facts(ptx)
    assert facts["f64_count"] == 2
    assert facts["f64_ops"][0].startswith("fma.rn.f64")


def test_f64_declarations_and_names_are_not_ops():
    ptx = (
        "\t.reg .f64 \t%fd<3>;\n"
        "\tld.param.u64 \t%rd1, [_ZN5f64_kernel_param_0];\n"
        "\tadd.s64 \t%rd2, %rd1, 8;  // f64 in a comment\n"
    )
    assert kernel_facts(ptx)["f64_count"] == 0


def test_shfl_sync_is_found():
    ptx = "\tshfl.sync.down.b32 \t%r5|%p2, %r4, 16, 31, -1;\n"
    assert kernel_facts(ptx)["uses_shfl_sync"] is True
    assert kernel_facts("\tadd.s32 \t%r1, %r2, %r3;\n")["uses_shfl_sync"] is False


def test_local_load_is_found():
    facts = kernel_facts("\tld.local.u32 \t%r1, [%rd1+4];\n")
    assert facts["local_memory"] is True
    assert facts["local_lines"] == ["ld.local.u32 \t%r1, [%rd1+4];"]


def test_local_declaration_is_found():
    ptx = "{\n\t.local .align 8 .b8 \t__local_depot0[8];\n\t.reg .b64 \t%SP;\n"
    facts = kernel_facts(ptx)
    assert facts["local_memory"] is True
    assert facts["local_lines"] == [".local .align 8 .b8 \t__local_depot0[8];"]


def test_mangled_locals_in_names_are_not_local_memory():
    # How Numba names a kernel made inside a factory (`<locals>` → 3clocals_3e).
    name = "_ZN8softkern4cuda6reduce11full_kernel12_3clocals_3e12reduce_stageB3v1"
    ptx = (
        f"\t// .globl\t{name}\n"
        f".common .global .align 8 .u64 _ZN08NumbaEnv{name};\n"
        f".visible .entry {name}(\n"
        f"\t.param .u64 {name}_param_0\n)\n{{\n"
        f"\tld.param.u64 \t%rd1, [{name}_param_0];\n"
        "\tmov.u64 \t%rd2, __local_depot_not_declared_here;\n"
        "}\n"
    )
    assert kernel_facts(ptx)["local_memory"] is False


# --- every kernel, compiled by NVVM ------------------------------------------


def start_compiles() -> dict[str, subprocess.Popen]:
    """Start one ``softkern.testing.ptx`` process per cc. conftest calls this
    as soon as collection ends, so that NVVM works while the other tests run
    (they use a core each at most in the simulator); the fixture collects."""
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "0"  # the simulator has no compile_ptx
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return {
        cc: subprocess.Popen(
            [sys.executable, "-m", "softkern.testing.ptx", "--cc", cc, *CC_ARGS[cc]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cc in CCS
    }


def _compile_all(procs: dict[str, subprocess.Popen]) -> dict[str, list[dict]]:
    """Wait for the `procs` of ``start_compiles``; return each cc's kernel
    records, or skip if this machine has no NVVM."""
    deadline = time.monotonic() + TIMEOUT_S
    outputs = {}
    try:
        for cc, proc in procs.items():
            remaining = max(1.0, deadline - time.monotonic())
            outputs[cc] = proc.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling the kernels took over {TIMEOUT_S} s")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    records = {}
    for cc, (stdout, stderr) in outputs.items():
        lines = [json.loads(s) for s in stdout.splitlines() if s.startswith("{")]
        for line in lines:
            if "unavailable" in line:
                pytest.skip(f"cannot compile PTX here: {line['unavailable']}")
        if procs[cc].returncode != 0:
            pytest.fail(
                f"softkern.testing.ptx --cc {cc} exited with "
                f"{procs[cc].returncode}:\n{stderr[-4000:]}"
            )
        records[cc] = lines
    return records


@pytest.fixture(scope="module")
def compiled(request) -> dict[str, list[dict]]:
    procs = request.config.stash.get(PTX_JOBS, None) or start_compiles()
    request.config.stash[PTX_JOBS] = None
    return _compile_all(procs)


def _offenders(records, keep) -> str:
    return "\n".join(f"  {r['name']}: {keep(r)}" for r in records if keep(r))


@pytest.mark.parametrize("cc", CCS)
def test_every_kernel_compiles(compiled, cc):
    records = compiled[cc]
    assert records, f"no kernels reported for cc {cc}"
    failed = _offenders(records, lambda r: r.get("error"))
    assert not failed, f"kernels that do not compile for cc {cc}:\n{failed}"
    names = [r["name"] for r in records]
    assert len(set(names)) == len(names), "kernel names repeat"
    # cc 8.0 compiled exactly 9.0's kernels of the default strategy
    every = [r["name"] for r in compiled["9.0"]]
    default = [r["name"] for r in compiled["9.0"] if r["strategy"] in (None, 2)]
    assert names == (every if cc == "9.0" else default), "unexpected kernel set"


@pytest.mark.parametrize("cc", CCS)
def test_narrow_kernels_hold_no_f64(compiled, cc):
    records = [r for r in compiled[cc] if r["dtype"] in NO_F64_DTYPES]
    assert records
    bad = _offenders(records, lambda r: r.get("f64_ops"))
    assert not bad, f"float64 instructions in {NO_F64_DTYPES} kernels (cc {cc}):\n{bad}"


@pytest.mark.parametrize("cc", CCS)
def test_f64_check_sees_nvvm_spelling(compiled, cc):
    """The no-f64 test passing means something only if the same reading
    finds float64 in the float64 kernels."""
    records = [r for r in compiled[cc] if r["dtype"] == "float64"]
    assert records
    blind = [r["name"] for r in records if not r.get("f64_count")]
    assert not blind, f"no f64 instruction found in float64 kernels: {blind}"


@pytest.mark.parametrize("cc", CCS)
def test_reduce2_kernels_use_shfl_sync(compiled, cc):
    records = [r for r in compiled[cc] if r["strategy"] == 2]
    assert records
    missing = [r["name"] for r in records if not r.get("uses_shfl_sync")]
    assert not missing, f"reduce=2 kernels without shfl.sync (cc {cc}): {missing}"


@pytest.mark.parametrize("cc", CCS)
def test_no_kernel_uses_local_memory(compiled, cc):
    records = compiled[cc]
    bad = _offenders(records, lambda r: r.get("local_lines"))
    assert not bad, f"local memory in PTX (cc {cc}):\n{bad}"
    # ptxas's own report, where nvJitLink could give it (None otherwise).
    spilled = _offenders(
        records,
        lambda r: (
            (r.get("stack_frame"), r.get("spill_stores"), r.get("spill_loads"))
            if any((r.get("stack_frame"), r.get("spill_stores"), r.get("spill_loads")))
            else None
        ),
    )
    assert not spilled, f"(stack frame, spill stores, spill loads) bytes:\n{spilled}"
