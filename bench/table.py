"""Markdown tables from the pytest-benchmark JSON of bench/bench_reduce.py,
bench/bench_softmax.py, bench/bench_broadcast.py, bench/bench_losses.py and
bench/bench_small.py and bench/bench_torch.py.

    python bench/table.py RESULTS.json [--device cpu] > table.md
    python bench/table.py RESULTS.json [--device cpu] --readme README.md
    python bench/table.py RESULTS.json --summary   # one row per group
    python bench/table.py RESULTS.json --bench softmax   # only these rows

One table per benchmark group; rows are implementations. Which benchmark a
row belongs to is read from the JSON (``--bench`` picks one when a file holds
several). With ``--readme`` each benchmark's tables replace whatever lies
between its markers in that file (``MARKERS``: ``<!-- bench:reduce:start -->``
... ``<!-- bench:reduce:end -->``, and the same with ``softmax``,
``broadcast``, ``losses``, ``small`` and ``torch``); a file without them is left
untouched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

START = "<!-- bench:reduce:start -->"
END = "<!-- bench:reduce:end -->"
SOFTMAX_START = "<!-- bench:softmax:start -->"
SOFTMAX_END = "<!-- bench:softmax:end -->"
BROADCAST_START = "<!-- bench:broadcast:start -->"
BROADCAST_END = "<!-- bench:broadcast:end -->"
LOSSES_START = "<!-- bench:losses:start -->"
LOSSES_END = "<!-- bench:losses:end -->"
SMALL_START = "<!-- bench:small:start -->"
SMALL_END = "<!-- bench:small:end -->"
TORCH_START = "<!-- bench:torch:start -->"
TORCH_END = "<!-- bench:torch:end -->"
MARKERS = {
    "reduce": (START, END),
    "softmax": (SOFTMAX_START, SOFTMAX_END),
    "broadcast": (BROADCAST_START, BROADCAST_END),
    "losses": (LOSSES_START, LOSSES_END),
    "small": (SMALL_START, SMALL_END),
    "torch": (TORCH_START, TORCH_END),
}
BENCHES = tuple(MARKERS)


def bench_kind(bench: dict[str, Any]) -> str:
    """ "reduce", "softmax", "broadcast" or "losses": bench_softmax.py,
    bench_broadcast.py and bench_losses.py name themselves in extra_info;
    older reduce results carry no name."""
    info = bench.get("extra_info", {})
    if info.get("bench"):
        return str(info["bench"])
    return "softmax" if "function" in info else "reduce"


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return json.load(f)


def fmt_ms(seconds: float) -> str:
    """Three significant digits at least, never scientific notation."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.01:
        return f"{ms:.4f}"
    return f"{ms:.5f}"


REDUCE_NOTE = (
    "- Times are per call: min and median over the rounds. GB/s = bytes the "
    "row moves (a reduction reads its inputs; a copy reads and writes) / min "
    "time. `x ref` = min time / min time of the group's reference row "
    "(NumPy on the CPU, the device copy on the GPU); above 1 is slower."
)
SOFTMAX_NOTE = (
    "- Times are per call: min and median over the rounds, float32 and "
    "float64 input (seeded standard normals). GB/s = (x.nbytes + out.nbytes) "
    "/ min time for every row. Two protocols, each compared only with "
    "itself: *allocating* (`softkern`, `torch.softmax`, SciPy, NumPy: a "
    "fresh result per call) and *preallocated* (`softkern out=`, "
    "`torch._softmax(x, dim, False, out=t)`: PyTorch's kernel writing into "
    "`t`). `torch / this` = the same protocol's PyTorch min time / this "
    "row's: above 1 is faster than PyTorch. `this / copy` = this row's min "
    "time / the `np.copyto` floor's (a preallocated copy of the same bytes, "
    "so a preallocated row's peer): 1 is as fast as one thread's copy."
)
BROADCAST_NOTE = (
    "- Times are per call: min and median over the rounds, float32 operands "
    "(seeded standard normals; a condition about half true) and a float32 "
    "result, allocated on every call (the copy writes into a preallocated "
    "one). GB/s = bytes / min time, where a "
    "where or expand row's bytes are its operands' bytes (each read once) + "
    "the result's, and the copy's are the result's bytes read and written. "
    "`numpy / this` = NumPy's min time / this row's (NumPy is the reference "
    "row): above 1 is faster than NumPy; `torch / this` the same against "
    "PyTorch. `this / copy` = this row's min time / the `np.copyto` floor's "
    "(a preallocated array of the result's shape, read and written): 1 is "
    "the speed of copying the result; an expand, which reads almost nothing, "
    "can go below 1."
)


LOSSES_NOTE = (
    "- Times are per call: min and median over the rounds; float32 and "
    "float64 logits (seeded standard normals) of shape (N, C), int64 targets "
    "(seeded, uniform over the C classes), reduction `mean`. GB/s = bytes / "
    "min time, where a row's bytes are the least its job moves: the forward "
    "reads the logits and the targets, the backward and forward+backward "
    "read them once and write the gradient; the copy's are the logits read "
    "and written. `torch / this` = PyTorch's min time / this row's, both "
    "allocating their results: above 1 is faster than PyTorch (PyTorch has "
    "no preallocated form of these, so `out=` rows show n/a there). `this / "
    "copy` = this row's min time / the `np.copyto` floor's (the logits copied "
    "into a preallocated array): about 0.5 is as fast as memory allows for "
    "the forward, 1 for the backward and forward+backward; a fresh result "
    "adds its page faults (the kernel zeroes each new page), so compare "
    "`out=` rows with the copy. The backward's `torch` row runs only what "
    "autograd runs for the backward of `F.cross_entropy` (`nll_loss_backward`, "
    "`_log_softmax_backward_data`) on the log-probabilities its forward "
    "saved; softkern's backward recomputes the softmax from the logits."
)


def header(
    data: dict[str, Any],
    devices: set[str],
    note: str = REDUCE_NOTE,
    extra_versions: dict[str, str] | None = None,
) -> list[str]:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    sk = mi.get("softkern", {})
    versions = {**sk.get("versions", {}), **(extra_versions or {})}
    brand = cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    machine = f"{brand}, {cpu.get('count', '?')} logical cores"
    if "numba_threads" in sk:
        machine += (
            f" (numba: {sk['numba_threads']} threads, "
            f"{sk.get('numba_threading_layer', '?')} layer)"
        )
    if "gpu" in devices:
        machine += f"; GPU: {sk.get('gpu') or 'unknown'}"
    libs = ", ".join(
        f"{name} {versions[key]}"
        for key, name in (
            ("numba", "numba"),
            ("numba-cuda", "numba-cuda"),
            ("numpy", "NumPy"),
            ("torch", "PyTorch"),
            ("scipy", "SciPy"),
            ("cupy", "CuPy"),
        )
        if key in versions
    )
    python = mi.get("python_implementation", "Python")
    return [
        f"- Machine: {machine}",
        f"- Date: {data.get('datetime', 'unknown')}",
        f"- {python} {mi.get('python_version', '?')}; {libs or 'versions unknown'}",
        f"- Command: `{data.get('command', 'unknown')}`",
        note,
    ]


def _group_key(bench: dict[str, Any]) -> tuple:
    info = bench.get("extra_info", {})
    return (
        info.get("device", ""),
        info.get("op", ""),
        info.get("n", 0),
        bench.get("group") or "",
    )


def group_table(benches: Sequence[dict[str, Any]]) -> list[str]:
    ref = next((b for b in benches if b["extra_info"].get("reference")), None)
    ref_min = ref["stats"]["min"] if ref else None
    info0 = benches[0]["extra_info"]
    lines = [
        f"**{benches[0].get('group')}** ({info0.get('n', 0):,} elements)",
        "",
        "| implementation | min ms | median ms | GB/s | x ref | rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in benches:
        info, st = b["extra_info"], b["stats"]
        name = info.get("impl") or b["name"]
        gbps = info["bytes"] / st["min"] / 1e9 if info.get("bytes") else None
        if b is ref:
            ratio = "1.00 (ref)"
        elif ref_min:
            ratio = f"{st['min'] / ref_min:.2f}"
        else:
            ratio = "n/a"
        lines.append(
            f"| {name} | {fmt_ms(st['min'])} | {fmt_ms(st['median'])} | "
            f"{'n/a' if gbps is None else f'{gbps:.1f}'} | {ratio} | "
            f"{st['rounds']} |"
        )
    return lines


def _column(bench: dict[str, Any]) -> str:
    # torch.sum, torch.amax and torch.dot share one column of the summary.
    name = bench["extra_info"].get("impl") or bench["name"]
    return name.split(".")[0] if name.startswith("torch.") else name


def summary_table(groups: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """One row per group: each implementation's min time / the reference's."""
    impls: list[str] = []
    for benches in groups.values():
        for b in benches:
            name = _column(b)
            if not b["extra_info"].get("reference") and name not in impls:
                impls.append(name)
    lines = [
        "| group | reference | ref ms | " + " | ".join(impls) + " |",
        "|---|---|---:|" + "---:|" * len(impls),
    ]
    for key in sorted(groups):
        benches = groups[key]
        ref = next((b for b in benches if b["extra_info"].get("reference")), None)
        if ref is None:
            continue
        by_name = {_column(b): b for b in benches}
        ratios = [
            f"{by_name[i]['stats']['min'] / ref['stats']['min']:.2f}"
            if i in by_name
            else "-"
            for i in impls
        ]
        ref_name = ref["extra_info"].get("impl") or ref["name"]
        lines.append(
            f"| {benches[0].get('group')} | {ref_name} | "
            f"{fmt_ms(ref['stats']['min'])} | " + " | ".join(ratios) + " |"
        )
    return lines


# Softmax: rows are found by their impl key (bench_softmax.IMPLS).
SOFTKERN_IMPLS = ("softkern", "softkern-out")


def _label(bench: dict[str, Any]) -> str:
    info = bench["extra_info"]
    return info.get("label") or info.get("impl") or bench["name"]


def _softmax_key(bench: dict[str, Any]) -> tuple:
    info = bench.get("extra_info", {})
    return (
        info.get("device", ""),
        info.get("function", ""),
        info.get("dtype", ""),
        tuple(info.get("shape", ())),
        info.get("dim", 0),
    )


def _shape(info: dict[str, Any]) -> str:
    return "x".join(str(s) for s in info.get("shape", ())) or "?"


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    if num is None or den is None or not den["stats"]["min"]:
        return "n/a"
    return f"{num['stats']['min'] / den['stats']['min']:.2f}"


def softmax_group_table(benches: Sequence[dict[str, Any]]) -> list[str]:
    """One group's rows; `torch / this` against the row's own protocol
    (extra_info["peer"]: torch-out for a preallocated row, else torch)."""
    by_impl = {b["extra_info"].get("impl"): b for b in benches}
    copy = by_impl.get("copy")
    info0 = benches[0]["extra_info"]
    lines = [
        f"**{benches[0].get('group')}** ({info0.get('n', 0):,} elements)",
        "",
        "| implementation | min ms | median ms | GB/s | torch / this | "
        "this / copy | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in benches:
        info, st = b["extra_info"], b["stats"]
        gbps = info["bytes"] / st["min"] / 1e9 if info.get("bytes") else None
        name = _label(b) + (" (ref)" if info.get("reference") else "")
        lines.append(
            f"| {name} | {fmt_ms(st['min'])} | {fmt_ms(st['median'])} | "
            f"{'n/a' if gbps is None else f'{gbps:.1f}'} | "
            f"{_ratio(by_impl.get(info.get('peer', 'torch')), b)} | "
            f"{_ratio(b, copy)} | {st['rounds']} |"
        )
    return lines


def softmax_summary_table(groups: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """One row per (function, dtype, shape, dim): softkern against PyTorch in
    each protocol, and the preallocated rows against the copy floor."""
    lines = [
        "| function | dtype | shape | dim | softkern ms | torch ms | "
        "softkern out= ms | torch out= ms | copy ms | **allocating:** torch / "
        "softkern | **out=:** torch / softkern | softkern out= / copy | "
        "torch out= / copy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for benches in groups.values():
        by_impl = {b["extra_info"].get("impl"): b for b in benches}
        sk, sko = by_impl.get("softkern"), by_impl.get("softkern-out")
        torch, torch_out = by_impl.get("torch"), by_impl.get("torch-out")
        copy = by_impl.get("copy")
        info = benches[0]["extra_info"]
        times = [
            "n/a" if b is None else fmt_ms(b["stats"]["min"])
            for b in (sk, torch, sko, torch_out, copy)
        ]
        lines.append(
            f"| {info.get('function', '?')} | {info.get('dtype', '?')} | "
            f"{_shape(info)} | {info.get('dim', '?')} | " + " | ".join(times) + " | "
            f"{_ratio(torch, sk)} | {_ratio(torch_out, sko)} | "
            f"{_ratio(sko, copy)} | {_ratio(torch_out, copy)} |"
        )
    return lines


def _softmax_groups(
    benches: Sequence[dict[str, Any]],
) -> dict[tuple, list[dict[str, Any]]]:
    """Groups in the order they ran, softmax before log_softmax."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for b in benches:
        groups.setdefault(_softmax_key(b), []).append(b)
    order = {"softmax": 0, "log_softmax": 1}
    keys = sorted(
        enumerate(groups),
        key=lambda ik: (ik[1][0], ik[1][2], order.get(ik[1][1], 2), ik[1][1], ik[0]),
    )
    return {k: groups[k] for _, k in keys}


def _row_versions(benches: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Library versions the rows recorded themselves (SciPy is not in the
    machine_info that bench/conftest.py writes)."""
    versions = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("version") and info.get("impl") in ("scipy", "torch"):
            versions[info["impl"]] = str(info["version"])
    return versions


def _render_groups(
    data: dict[str, Any],
    benches: Sequence[dict[str, Any]],
    summary: bool,
    groups: dict[Any, list[dict[str, Any]]],
    note: str,
    summary_table: Callable[..., list[str]],
    group_table: Callable[..., list[str]],
) -> str:
    """The header, the summary table and (unless `summary`) one table per
    group: the layout of the softmax and broadcast results."""
    devices = {b.get("extra_info", {}).get("device", "") for b in benches}
    out = [
        *header(data, devices, note, _row_versions(benches)),
        "",
        *summary_table(groups),
        "",
    ]
    if not summary:
        for benches_ in groups.values():
            out += [*group_table(benches_), ""]
    return "\n".join(out).rstrip() + "\n"


def render_softmax(
    data: dict[str, Any], benches: Sequence[dict[str, Any]], summary: bool
) -> str:
    return _render_groups(
        data,
        benches,
        summary,
        _softmax_groups(benches),
        SOFTMAX_NOTE,
        softmax_summary_table,
        softmax_group_table,
    )


# Losses: rows are found by their impl key (bench_losses.IMPLS); the
# per-group tables are the softmax ones (torch / this, this / copy).
LOSS_FUNCTIONS = ("cross_entropy", "cross_entropy_backward", "forward+backward")


def _losses_key(bench: dict[str, Any]) -> tuple:
    info = bench.get("extra_info", {})
    return (
        info.get("device", ""),
        info.get("function", ""),
        info.get("dtype", ""),
        tuple(info["shape"]),
    )


def _losses_groups(
    benches: Sequence[dict[str, Any]],
) -> dict[tuple, list[dict[str, Any]]]:
    """Groups per device and function (forward, backward, both), shapes in the
    order they ran."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for b in benches:
        groups.setdefault(_losses_key(b), []).append(b)
    order = {f: i for i, f in enumerate(LOSS_FUNCTIONS)}
    keys = sorted(
        enumerate(groups),
        key=lambda ik: (
            ik[1][0],
            ik[1][2],
            order.get(ik[1][1], len(order)),
            ik[1][1],
            ik[0],
        ),
    )
    return {k: groups[k] for _, k in keys}


def _impl_summary_table(
    groups: dict[tuple, list[dict[str, Any]]],
    columns: tuple[str, str],
    label: Any,
    impls: dict[str, str],
    ratios: Sequence[tuple[str, str, str]],
) -> list[str]:
    """One row per group: `columns` (the label's and the shape's headers),
    then each of `impls` (extra_info impl -> header)'s min time, then each
    ratio (header, numerator impl, denominator impl)."""
    heads = [*columns, *(f"{h} ms" for h in impls.values()), *(r[0] for r in ratios)]
    lines = [
        "| " + " | ".join(heads) + " |",
        "|---|---|" + "---:|" * (len(heads) - 2),
    ]
    for benches in groups.values():
        by_impl = {b["extra_info"].get("impl"): b for b in benches}
        info = benches[0]["extra_info"]
        cells = [label(benches), _shape(info)]
        cells += [
            "n/a" if by_impl.get(k) is None else fmt_ms(by_impl[k]["stats"]["min"])
            for k in impls
        ]
        cells += [_ratio(by_impl.get(num), by_impl.get(den)) for _, num, den in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def losses_summary_table(groups: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """One row per (function, dtype, shape): softkern against PyTorch (both
    allocating; for the forward also log_softmax + nll_loss) and its
    preallocated form against the copy floor."""

    def label(benches: Sequence[dict[str, Any]]) -> str:
        info = benches[0]["extra_info"]
        return f"{info.get('function', '?')} {info.get('dtype', '')}".rstrip()

    return _impl_summary_table(
        groups,
        ("function", "shape"),
        label,
        {
            "softkern": "softkern",
            "softkern-out": "softkern out=",
            "softkern-unfused": "softkern unfused",
            "torch": "torch",
            "torch-unfused": "torch unfused",
            "copy": "copy",
        },
        [
            ("**allocating:** torch / softkern", "torch", "softkern"),
            ("torch unfused / softkern", "torch-unfused", "softkern"),
            ("softkern / copy", "softkern", "copy"),
            ("softkern out= / copy", "softkern-out", "copy"),
        ],
    )


def render_losses(
    data: dict[str, Any], benches: Sequence[dict[str, Any]], summary: bool
) -> str:
    return _render_groups(
        data,
        benches,
        summary,
        _losses_groups(benches),
        LOSSES_NOTE,
        losses_summary_table,
        softmax_group_table,
    )


# Broadcast: rows are found by their impl key (bench_broadcast.IMPLS).


def _broadcast_key(bench: dict[str, Any]) -> tuple:
    info = bench.get("extra_info", {})
    return (info.get("device", ""), bench.get("group") or "")


def _broadcast_groups(
    benches: Sequence[dict[str, Any]],
) -> dict[tuple, list[dict[str, Any]]]:
    """Groups in the order they ran, per device."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for b in benches:
        groups.setdefault(_broadcast_key(b), []).append(b)
    keys = sorted(enumerate(groups), key=lambda ik: (ik[1][0], ik[0]))
    return {k: groups[k] for _, k in keys}


def broadcast_group_table(benches: Sequence[dict[str, Any]]) -> list[str]:
    by_impl = {b["extra_info"].get("impl"): b for b in benches}
    numpy, torch, copy = (by_impl.get(k) for k in ("numpy", "torch", "copy"))
    info0 = benches[0]["extra_info"]
    lines = [
        f"**{benches[0].get('group')}** ({info0.get('n', 0):,} elements)",
        "",
        "| implementation | min ms | median ms | GB/s | numpy / this | "
        "torch / this | this / copy | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in benches:
        info, st = b["extra_info"], b["stats"]
        gbps = info["bytes"] / st["min"] / 1e9 if info.get("bytes") else None
        name = _label(b) + (" (ref)" if info.get("reference") else "")
        lines.append(
            f"| {name} | {fmt_ms(st['min'])} | {fmt_ms(st['median'])} | "
            f"{'n/a' if gbps is None else f'{gbps:.1f}'} | "
            f"{_ratio(numpy, b)} | {_ratio(torch, b)} | {_ratio(b, copy)} | "
            f"{st['rounds']} |"
        )
    return lines


def broadcast_summary_table(groups: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """One row per call pattern: softkern against NumPy, PyTorch and the copy
    floor."""
    return _impl_summary_table(
        groups,
        ("call", "result"),
        lambda benches: benches[0]["extra_info"].get("call", benches[0].get("group")),
        {"softkern": "softkern", "numpy": "numpy", "torch": "torch", "copy": "copy"},
        [
            ("numpy / softkern", "numpy", "softkern"),
            ("torch / softkern", "torch", "softkern"),
            ("softkern / copy", "softkern", "copy"),
        ],
    )


def render_broadcast(
    data: dict[str, Any], benches: Sequence[dict[str, Any]], summary: bool
) -> str:
    return _render_groups(
        data,
        benches,
        summary,
        _broadcast_groups(benches),
        BROADCAST_NOTE,
        broadcast_summary_table,
        broadcast_group_table,
    )


# Small calls (bench_small.py): softkern against the faster of NumPy and
# PyTorch, per function and size; and the busy group.
SMALL_NOTE = (
    "- Times are per call, in microseconds: the min over the rounds, float32 "
    "input, every implementation allocating its result. `x peer` = "
    "softkern's time / the faster of NumPy's and PyTorch's (named): below 1 "
    "is faster than both. Targets: 3x at 32x10, 1x from 1e5 elements up "
    "(256x1000); a cell over its target is marked with `!`."
)
SMALL_TARGETS = {320: 3.0, 10_000: None, 256_000: 1.0}


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _small_cell(by_impl: dict[str, dict[str, Any]], n: int) -> tuple[str, str]:
    """(softkern's time, its ratio to the faster peer, named) of one group."""
    sk = by_impl.get("softkern")
    peers = [(b["stats"]["min"], k) for k, b in by_impl.items() if k != "softkern"]
    if sk is None or not peers:
        return "n/a", "n/a"
    best, name = min(peers)
    ratio = sk["stats"]["min"] / best
    target = SMALL_TARGETS.get(n)
    mark = "!" if target is not None and ratio > target else ""
    return fmt_us(sk["stats"]["min"]), f"{ratio:.2f}{mark} ({name})"


def small_summary_table(benches: Sequence[dict[str, Any]]) -> list[str]:
    groups: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    sizes: list[tuple[int, str]] = []
    for b in benches:
        info = b["extra_info"]
        if info.get("load"):
            continue
        n = info.get("n", 0)
        if (n, _shape(info)) not in sizes:
            sizes.append((n, _shape(info)))
        groups.setdefault(info["function"], {}).setdefault(n, {})[info["impl"]] = b
    sizes.sort()
    head = ["function"]
    for _, label in sizes:
        head += [f"{label} us", f"{label} x peer"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for function, by_size in groups.items():
        cells = [function]
        for n, _ in sizes:
            cells += _small_cell(by_size.get(n, {}), n)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def busy_table(benches: Sequence[dict[str, Any]]) -> list[str]:
    """softkern and PyTorch on an idle machine and with one core busy."""
    rows = [b for b in benches if b["extra_info"].get("load")]
    if not rows:
        return []
    by = {(b["extra_info"]["impl"], b["extra_info"]["load"]): b for b in rows}
    lines = [
        "| softmax 1000x1000 float32 | softkern min ms | softkern median ms | "
        "torch min ms | torch median ms | softkern / torch (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for load in ("idle", "busy"):
        sk, torch = by.get(("softkern", load)), by.get(("torch", load))
        if sk is None or torch is None:
            continue
        ratio = sk["stats"]["median"] / torch["stats"]["median"]
        lines.append(
            f"| {load} | {fmt_ms(sk['stats']['min'])} | "
            f"{fmt_ms(sk['stats']['median'])} | {fmt_ms(torch['stats']['min'])} | "
            f"{fmt_ms(torch['stats']['median'])} | {ratio:.2f} |"
        )
    return lines


def render_small(
    data: dict[str, Any], benches: Sequence[dict[str, Any]], summary: bool
) -> str:
    out = [*header(data, {"cpu"}, SMALL_NOTE, _row_versions(benches)), ""]
    out += [*small_summary_table(benches), ""]
    busy = busy_table(benches)
    if busy:
        out += [
            "With another process keeping one core busy (`python -c 'while "
            "True: pass'`), medians, since a stall shows in the typical call:",
            "",
            *busy,
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


TORCH_NOTE = (
    "- `overhead`: one call on a (64, 10) float32 CPU tensor and on the "
    "NumPy array over the same memory, in microseconds (min over the rounds); "
    "`+ us` = what the tensor path adds (target: at most 5). `train step`: "
    "`loss(x, t).backward()` on float32 and bfloat16 logits that require "
    "grad (bfloat16: computed in float32, gradient rounded once), `x.grad` "
    "reset first, softkern's fused loss-and-gradient op through autograd "
    "against `F.cross_entropy`; with softcap 30 and z-loss 1e-4, against "
    "the same written in PyTorch (tanh, cross_entropy, logsumexp squared); "
    "`torch / softkern` = PyTorch's min time / softkern's (target: at least 2)."
)


def render_torch(
    data: dict[str, Any], benches: Sequence[dict[str, Any]], summary: bool
) -> str:
    by: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for b in benches:
        info = b["extra_info"]
        key = (info["group"], info["function"], info.get("dtype", "float32"))
        by.setdefault(key, {})[info["impl"]] = b
    out = [*header(data, {"cpu"}, TORCH_NOTE, _row_versions(benches)), ""]
    out += [
        "| overhead (64x10 float32) | NumPy us | tensor us | + us |",
        "|---|---:|---:|---:|",
    ]
    for (group, function, _), rows in by.items():
        if group != "overhead" or len(rows) < 2:
            continue
        host, tensor = rows["numpy"]["stats"]["min"], rows["tensor"]["stats"]["min"]
        out.append(
            f"| {function} | {fmt_us(host)} | {fmt_us(tensor)} | "
            f"{fmt_us(tensor - host)} |"
        )
    out += [
        "",
        "| train step | shape | torch ms | softkern ms | torch / softkern |",
        "|---|---|---:|---:|---:|",
    ]
    for (group, function, _), rows in by.items():
        if group != "train step" or len(rows) < 2:
            continue
        ours, theirs = rows["softkern"]["stats"]["min"], rows["torch"]["stats"]["min"]
        info = rows["softkern"]["extra_info"]
        out.append(
            f"| {function} | {_shape(info)} {info.get('dtype', '')} | "
            f"{fmt_ms(theirs)} | {fmt_ms(ours)} | {theirs / ours:.2f} |"
        )
    return "\n".join(out).rstrip() + "\n"


def select(
    data: dict[str, Any], device: str | None, bench: str | None = None
) -> list[dict[str, Any]]:
    return [
        b
        for b in data.get("benchmarks", [])
        if (device is None or b.get("extra_info", {}).get("device") == device)
        and (bench is None or bench_kind(b) == bench)
    ]


def kinds(data: dict[str, Any], device: str | None = None) -> list[str]:
    """The benchmarks present in `data`, in BENCHES order."""
    found = {bench_kind(b) for b in select(data, device)}
    return [k for k in BENCHES if k in found]


def render(
    data: dict[str, Any],
    device: str | None,
    summary: bool = False,
    bench: str | None = None,
) -> str:
    if bench is None:
        present = kinds(data, device)
        bench = present[0] if len(present) == 1 else None
    benches = select(data, device, bench)
    if not benches:
        which = f"{bench} " if bench else ""
        where = f" for device {device}" if device else ""
        raise SystemExit(f"no {which}benchmarks{where}")
    if bench is None:  # several benchmarks in one file: one section each
        return "\n".join(
            render(data, device, summary, kind) for kind in kinds(data, device)
        )
    if bench == "softmax":
        return render_softmax(data, benches, summary)
    if bench == "broadcast":
        return render_broadcast(data, benches, summary)
    if bench == "losses":
        return render_losses(data, benches, summary)
    if bench == "small":
        return render_small(data, benches, summary)
    if bench == "torch":
        return render_torch(data, benches, summary)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for b in benches:
        groups.setdefault(_group_key(b), []).append(b)
    devices = {b.get("extra_info", {}).get("device", "") for b in benches}
    out = [*header(data, devices), ""]
    if summary:
        out += [
            "Each cell: min time / min time of the group's reference row, "
            "measured side by side in one run; below 1 is faster than the "
            "reference.",
            "",
            *summary_table(groups),
            "",
        ]
        return "\n".join(out).rstrip() + "\n"
    for key in sorted(groups):
        out += [*group_table(groups[key]), ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, text: str, start: str = START, end: str = END) -> bool:
    """Replace the text between the markers; touch nothing if they are absent."""
    if not readme.exists():
        print(f"warning: {readme} does not exist; nothing written", file=sys.stderr)
        return False
    old = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(old):
        print(
            f"warning: {readme} has no {start} ... {end} markers; nothing written",
            file=sys.stderr,
        )
        return False
    # A function replacement: the table's backslashes are not regex escapes.
    new = pattern.sub(lambda _: f"{start}\n{text}{end}", old, count=1)
    readme.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json")
    p.add_argument("--device", choices=("cpu", "gpu"), help="only this device")
    p.add_argument(
        "--bench",
        choices=BENCHES,
        help="only this benchmark's rows (default: every benchmark in the file)",
    )
    p.add_argument(
        "--readme",
        type=Path,
        help="write between this benchmark's markers in this file (e.g. "
        f"{SOFTMAX_START} ... {SOFTMAX_END}) instead of stdout",
    )
    p.add_argument(
        "--summary", action="store_true", help="one row per group, ratios only"
    )
    args = p.parse_args(argv)
    data = load(args.results)
    if args.readme is None:
        sys.stdout.write(render(data, args.device, args.summary, args.bench))
        return 0
    for kind in [args.bench] if args.bench else kinds(data, args.device):
        text = render(data, args.device, args.summary, kind)
        start, end = MARKERS[kind]
        if update_readme(args.readme, text, start, end):
            print(f"{args.readme}: wrote the {kind} tables", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
