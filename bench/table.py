"""Markdown tables from the pytest-benchmark JSON of bench/bench_reduce.py.

    python bench/table.py RESULTS.json [--device cpu] > table.md
    python bench/table.py RESULTS.json [--device cpu] --readme README.md
    python bench/table.py RESULTS.json --summary   # one row per group

One table per benchmark group; rows are implementations. With ``--readme``
the tables replace whatever lies between the markers below in that file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START = "<!-- bench:reduce:start -->"
END = "<!-- bench:reduce:end -->"


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


def header(data: dict[str, Any], devices: set[str]) -> list[str]:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    sk = mi.get("softkern", {})
    versions = sk.get("versions", {})
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
        "- Times are per call: min and median over the rounds. GB/s = bytes the "
        "row moves (a reduction reads its inputs; a copy reads and writes) / min "
        "time. `x ref` = min time / min time of the group's reference row "
        "(NumPy on the CPU, the device copy on the GPU); above 1 is slower.",
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


def render(data: dict[str, Any], device: str | None, summary: bool = False) -> str:
    benches = [
        b
        for b in data.get("benchmarks", [])
        if device is None or b.get("extra_info", {}).get("device") == device
    ]
    if not benches:
        raise SystemExit(f"no benchmarks{f' for device {device}' if device else ''}")
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


def update_readme(readme: Path, text: str) -> bool:
    """Replace the text between the markers; touch nothing if they are absent."""
    if not readme.exists():
        print(f"warning: {readme} does not exist; nothing written", file=sys.stderr)
        return False
    old = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(old):
        print(
            f"warning: {readme} has no {START} ... {END} markers; nothing written",
            file=sys.stderr,
        )
        return False
    # A function replacement: the table's backslashes are not regex escapes.
    new = pattern.sub(lambda _: f"{START}\n{text}{END}", old, count=1)
    readme.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json")
    p.add_argument("--device", choices=("cpu", "gpu"), help="only this device")
    p.add_argument(
        "--readme",
        type=Path,
        help=f"write between {START} and {END} in this file instead of stdout",
    )
    p.add_argument(
        "--summary", action="store_true", help="one row per group, ratios only"
    )
    args = p.parse_args(argv)
    text = render(load(args.results), args.device, args.summary)
    if args.readme is None:
        sys.stdout.write(text)
        return 0
    update_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
