"""What the first call of each public function costs in a fresh process.

    python bench/first_call.py [--dtype float32] > first-call.md

For each function, two fresh processes in turn share a new, empty Numba
cache folder (``NUMBA_CACHE_DIR``): the first meets a cold cache and
compiles the function's kernels (what a user meets before ``python -m
softkern warmup``), the second loads them (every later process). Each
process imports softkern, then times one call on a small float32 input and
counts Numba's compilations during it. Numba's own start-up (its CPU
target's registries, loaded once per process by whatever runs first) is
timed apart. The table is markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One representative call per function: (name, setup, call) on x of (64, 40).
CALLS = (
    ("sum", "", "sk.sum(x)"),
    ("sum dim=1", "", "sk.sum(x, 1)"),
    ("amax dim=0", "", "sk.amax(x, 0)"),
    ("dot", "", "sk.dot(x[0], x[1])"),
    ("softmax", "", "sk.softmax(x, 1)"),
    ("log_softmax", "", "sk.log_softmax(x, 1)"),
    ("logsumexp", "", "sk.logsumexp(x, 1)"),
    ("softmax_backward", "", "sk.softmax_backward(x, x, 1)"),
    ("expand", "col = x[:, :1].copy()", "sk.expand(col, 64, 40)"),
    ("where", "c = x > 0", "sk.where(c, x, 0.0)"),
    ("cross_entropy", "t = np.arange(64) % 40", "sk.cross_entropy(x, t)"),
    (
        "cross_entropy_backward",
        "t = np.arange(64) % 40",
        "sk.cross_entropy_backward(x, t)",
    ),
    (
        "cross_entropy_and_grad",
        "t = np.arange(64) % 40",
        "sk.cross_entropy_and_grad(x, t)",
    ),
    ("nll_loss", "t = np.arange(64) % 40", "sk.nll_loss(x, t)"),
    ("sigmoid", "", "sk.sigmoid(x)"),
    ("logsigmoid", "", "sk.logsigmoid(x)"),
    ("gumbel_softmax", "", "sk.gumbel_softmax(x, seed=0)"),
)

SCRIPT = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import softkern as sk
imported = time.perf_counter() - start
from numba.core import event

class CompileCounter(event.Listener):  # as softkern.warmup's, for old versions
    count = 0
    def on_start(self, ev): self.count += 1
    def on_end(self, ev): pass
    def __enter__(self):
        event.register("numba:compile", self)
        return self
    def __exit__(self, *exc): event.unregister("numba:compile", self)

# Numba's own start-up, paid once per process by whatever runs first: its
# CPU target loads its registries (and imports SciPy to find BLAS).
from numba.core.registry import cpu_target
start = time.perf_counter()
cpu_target.target_context.refresh()
cpu_target.typing_context.refresh()
numba_start = time.perf_counter() - start
x = np.random.default_rng(0).standard_normal((64, 40)).astype(sys.argv[1])
{setup}
with CompileCounter() as counter:
    start = time.perf_counter()
    {call}
    first = time.perf_counter() - start
print(json.dumps({{"import": imported, "numba": numba_start, "first": first,
                  "compiled": counter.count}}))
"""


def run(setup: str, call: str, dtype: str, cache: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_DISABLE_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(setup=setup, call=call), dtype],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    rows = []
    imports, starts = [], []
    for name, setup, call in CALLS:
        with tempfile.TemporaryDirectory() as cache:
            cold = run(setup, call, args.dtype, cache)
            warm = run(setup, call, args.dtype, cache)
        imports.append(warm["import"])
        starts.append(warm["numba"])
        rows.append((name, call, cold, warm))
        print(
            f"{name}: cold {cold['first']:.2f} s, warm {warm['first']:.4f} s",
            file=sys.stderr,
        )
    print(
        f"- Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; Python {platform.python_version()}"
    )
    print(f"- Date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}")
    print(f"- Command: `python bench/first_call.py --dtype {args.dtype}`")
    print(
        f"- `import softkern`: {min(imports) * 1e3:.0f} ms; then Numba's own "
        f"start-up, paid by the first kernel call of a process: "
        f"{min(starts) * 1e3:.0f} ms (best of {len(imports)} processes; not "
        "in the times below)"
    )
    print()
    print(
        "| function | call | cold cache: first call s | kernels compiled "
        "| warm cache: first call ms | compiled |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, call, cold, warm in rows:
        print(
            f"| {name} | `{call}` | {cold['first']:.2f} | {cold['compiled']} | "
            f"{warm['first'] * 1e3:.1f} | {warm['compiled']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
