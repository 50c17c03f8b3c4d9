"""Seconds per lab, top to bottom, on this machine: a benchmark, not a timed test.

Each lab is executed twice in a fresh kernel, as `make test` runs it (LABLIB_STATIC=1):
* cold: with an empty checkpoint cache (what a first-time user or CI pays), checked against the 120 s budget;
* warm: again with the cache the cold run filled (what a rerun costs), reported as a ratio to cold.

    python bench/labs_runtime.py [--labs 00 01] [--record]

`--record` appends the table, with the machine it ran on, to bench/results/labs_runtime.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 120.0


def run_lab(path: Path, cache_dir: str) -> float:
    """Execute one lab in a fresh kernel; return wall seconds. Raises if a cell fails."""
    nb = jupytext.read(path)
    os.environ.update(LABLIB_CACHE=cache_dir, LABLIB_STATIC="1", LABLIB_PROGRESS="0")
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def machine() -> str:
    return (f"{platform.node() or 'unknown host'}: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labs", nargs="*", help="lab numbers to run (default: all)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/results/labs_runtime.md")
    args = parser.parse_args(argv)
    labs = sorted((ROOT / "labs").glob("[0-9][0-9]_*.py"))
    if args.labs:
        labs = [p for p in labs if p.name[:2] in set(args.labs)]
        if not labs:
            parser.error(f"no lab matches {args.labs}")
    load_before = os.getloadavg()[0]
    rows = []
    for lab in labs:
        with tempfile.TemporaryDirectory(prefix="lablib-bench-cache-") as cache:
            cold = run_lab(lab, cache)
            warm = run_lab(lab, cache)
        rows.append((lab.stem, cold, warm))
        print(f"ran {lab.name}: cold {cold:.1f} s, warm {warm:.1f} s", file=sys.stderr)
    lines = [
        f"### {dt.date.today().isoformat()} on {machine()}",
        "",
        f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(after includes this run; above 1 before means the machine was shared and timings are pessimistic)",
        "",
        "| lab | cold s | cold / 120 s budget | warm s | warm / cold |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {cold:.1f} | {cold / BUDGET_S:.2f} | {warm:.1f} | {warm / cold:.2f} |" for name, cold, warm in rows]
    table = "\n".join(lines)
    print(table)
    if args.record:
        out = ROOT / "bench" / "results" / "labs_runtime.md"
        header = "" if out.exists() else "# Seconds per lab (bench/labs_runtime.py)\n\n"
        with out.open("a") as f:
            f.write(header + table + "\n\n")
    over = [name for name, cold, _ in rows if cold > BUDGET_S]
    if over:
        print(f"over the {BUDGET_S:.0f} s budget: {', '.join(over)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
