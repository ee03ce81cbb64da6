"""Time against size: one worker process returns a data frame to its parent, by several methods.

The measurement is :mod:`shmalloc.tools.bench.sizes` (its docstring says what
is timed; the frame, seed and sizes are those of
:mod:`shmalloc.tools.bench.workloads`); this script runs it and writes
``bench_sizes.csv`` and ``bench_sizes.png`` (if matplotlib is installed) into
``--out`` (default ``docs/_static``)::

    python benchmarks/plot_sizes.py                    # 1e4 .. 1e7 rows
    python benchmarks/plot_sizes.py --max-rows 1e5     # a quick check
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

import shmalloc
from shmalloc.tools.bench import sizes, workloads

HERE = Path(__file__).resolve().parent


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def write_csv(path: Path, results: dict[int, dict[str, list[float]]], notes: list[str]) -> None:
    with path.open("w", newline="") as file:
        for note in notes:
            file.write(f"# {note}\n")
        writer = csv.writer(file)
        writer.writerow(["rows", "mb", "method", "median_s", "min_s", "max_s", "repeats"])
        for rows, times in results.items():
            for label, t in times.items():
                writer.writerow(
                    [
                        rows,
                        f"{rows * workloads.ROW_BYTES / 1e6:.3f}",
                        label,
                        f"{statistics.median(t):.6f}",
                        f"{min(t):.6f}",
                        f"{max(t):.6f}",
                        len(t),
                    ]
                )


def plot(path: Path, results: dict[int, dict[str, list[float]]], subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(results)
    labels = list(results[counts[0]])
    medians = {label: np.array([statistics.median(results[n][label]) for n in counts]) for label in labels}
    baseline = medians[sizes.PICKLE]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for label in labels:
        style = "-" if label.startswith("shmalloc") else "--"
        left.loglog(counts, medians[label], style, marker="o", label=label)
        right.semilogx(counts, baseline / medians[label], style, marker="o", label=label)
    rows_label = f"rows ({workloads.ROW_BYTES} bytes each)"
    left.set(xlabel=rows_label, ylabel="seconds (median)", title="time to return the frame")
    right.set(xlabel=rows_label, ylabel="times faster than pickle", title="speed-up over pickle through a pipe")
    right.axhline(1, color="grey", linewidth=0.8)
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"One worker returns a DataFrame ({workloads.FRAME_COLUMNS})\n{subtitle}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-rows", type=float, default=1e7, help="largest frame measured (default 1e7)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per size and method (default 7)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "_static", help="where to write the files")
    args = parser.parse_args(argv)
    chosen = [n for n in workloads.PLOT_ROWS if n <= args.max_rows]
    if not chosen or args.repeat < 1:
        parser.error("--max-rows must be at least 1e4 and --repeat at least 1")
    args.out.mkdir(parents=True, exist_ok=True)

    before = load_average()
    results: dict[int, dict[str, list[float]]] = {}
    for rows, times in sizes.run(chosen, args.repeat):
        results[rows] = times
        line = ", ".join(f"{label} {statistics.median(t):.4f}" for label, t in times.items())
        print(f"{rows:>9} rows: {line}", flush=True)
    after = load_average()

    subtitle = f"{os.cpu_count()} cores, median of {args.repeat}, load average before {before}, after {after}"
    notes = [
        f"python benchmarks/plot_sizes.py --max-rows {args.max_rows:.0e} --repeat {args.repeat}",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.platform()}; {os.cpu_count()} cores",
        f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, shmalloc {shmalloc.__version__}",
        f"load average (1, 5, 15 min) before: {before}; after: {after}",
    ]
    csv_path = args.out / "bench_sizes.csv"
    write_csv(csv_path, results, notes)
    print(f"wrote {csv_path}")
    try:
        plot(args.out / "bench_sizes.png", results, subtitle)
    except ImportError:
        print("matplotlib is not installed: no plot written")
    else:
        print(f"wrote {args.out / 'bench_sizes.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
