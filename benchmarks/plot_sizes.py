"""Time against size: one worker process returns a data frame to its parent, by several methods.

The frame is bettermc's benchmark frame (x float64, y bool, z int32: 13
bytes a row). One forked worker process lives for the whole run and builds
the frame for each size before it is timed, so what is measured is only the
return: from the parent's request to a usable DataFrame in the parent.

Methods:

- shmalloc, copy=True / copy=False: the worker calls ``copy2shm``, the parent
  ``allocate_from_shm``;
- pickle protocol 5 through a pipe: the worker pickles the frame into the
  stream, the parent unpickles it;
- stdlib ``multiprocessing.shared_memory``, copied out: the worker copies the
  columns into one block, the parent copies them out, closes and unlinks it;
- SharedArray (if importable), zero-copy: the worker creates and fills one
  array per column, the parent attaches them and removes their names.

Methods run interleaved, repetition by repetition; medians are reported.
Freeing the previous result (garbage collection, shmalloc's background
release of consumed objects) happens between measurements, untimed.

Writes ``bench_sizes.csv`` and ``bench_sizes.png`` (if matplotlib is
installed) into ``--out`` (default ``docs/_static``)::

    python benchmarks/plot_sizes.py                    # 1e4 .. 1e7 rows
    python benchmarks/plot_sizes.py --max-rows 1e5     # a quick check
"""
from __future__ import annotations

import argparse
import csv
import gc
import multiprocessing
import os
import pickle
import platform
import secrets
import statistics
import time
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

import shmalloc
from shmalloc import _releaser

try:
    import SharedArray
except ImportError:
    SharedArray = None

HERE = Path(__file__).resolve().parent
SIZES = (10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7)
ROW_BYTES = 13
# Peers' segment names: a prefix of their own, so that shmalloc's tools (and the test
# suite's leak check in a concurrent run) never take them for shmalloc's.
PEER_PREFIX = "shmbench_"


def make_frame(rows: int) -> pd.DataFrame:
    """The benchmark frame: x float64, y bool, z int32 (the same for the same ``rows``)."""
    rng = np.random.default_rng(rows)
    return pd.DataFrame(
        {"x": rng.random(rows), "y": rng.random(rows) < 0.5, "z": rng.integers(0, 2**31 - 1, rows, dtype=np.int32)}
    )


def _peer_name() -> str:
    return f"{PEER_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


# ------------------------------------------------------------------ the worker


def _serve(conn: Connection) -> None:
    """The worker: build frames on request, return them by the method asked for."""
    frame = None
    senders: dict[str, Callable[[pd.DataFrame], Any]] = {
        "shmalloc": shmalloc.copy2shm,
        "stdlib": _to_stdlib,
        "sharedarray": _to_shared_array,
    }
    while True:
        command, argument = conn.recv()
        if command == "stop":
            return
        if command == "make":
            frame = make_frame(argument)
            conn.send("ready")
        elif argument == "pickle":
            conn.send_bytes(pickle.dumps(frame, protocol=5))
        else:
            conn.send(senders[argument](frame))


def _to_stdlib(frame: pd.DataFrame) -> tuple[str, list[tuple[str, str, int, int]]]:
    """Copy each column into one stdlib SharedMemory block; return its name and the column layout."""
    columns, offset = [], 0
    for column in frame.columns:
        values = frame[column].to_numpy()
        columns.append((column, values.dtype.str, offset, len(values)))
        offset += -(-values.nbytes // 64) * 64  # 64-byte aligned columns
    block = shared_memory.SharedMemory(_peer_name(), create=True, size=max(offset, 1))
    for column, dtype, start, length in columns:
        np.ndarray(length, dtype, block.buf, start)[:] = frame[column].to_numpy()
    block.close()
    return block.name, columns


def _to_shared_array(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Create and fill one SharedArray per column; return their names."""
    names = []
    for column in frame.columns:
        values = frame[column].to_numpy()
        name = "shm://" + _peer_name()
        SharedArray.create(name, values.shape, values.dtype)[:] = values
        names.append((column, name))
    return names


# ------------------------------------------------------------------ the parent's side of each method


def _via_shmalloc(conn: Connection, copy: bool) -> pd.DataFrame:
    conn.send(("send", "shmalloc"))
    return shmalloc.allocate_from_shm(conn.recv(), copy=copy)


def _via_pickle(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "pickle"))
    return pickle.loads(conn.recv_bytes())


def _via_stdlib(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "stdlib"))
    name, columns = conn.recv()
    block = shared_memory.SharedMemory(name)
    try:
        data = {column: np.ndarray(length, dtype, block.buf, start).copy() for column, dtype, start, length in columns}
    finally:
        block.close()  # no view may outlive this: the copies above are the result
        block.unlink()
    return pd.DataFrame(data, copy=False)


def _via_shared_array(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "sharedarray"))
    data = {}
    for column, name in conn.recv():
        data[column] = SharedArray.attach(name)
        SharedArray.delete(name)  # the name goes; the mapping lives with the array
    return pd.DataFrame(data, copy=False)


def methods() -> dict[str, Callable[[Connection], pd.DataFrame]]:
    """The methods measured, by label."""
    found = {
        "shmalloc, copy=False": lambda conn: _via_shmalloc(conn, False),
        "shmalloc, copy=True": lambda conn: _via_shmalloc(conn, True),
        "pickle protocol 5 through a pipe": _via_pickle,
        "stdlib SharedMemory, copied out": _via_stdlib,
    }
    if SharedArray is not None:
        found["SharedArray, zero-copy"] = _via_shared_array
    return found


def _settle() -> None:
    """Free the previous result before the next measurement starts."""
    gc.collect()
    _releaser.wait_for_releases()  # shmalloc closes large consumed objects on a background thread


def measure(conn: Connection, rows: int, repeat: int) -> dict[str, list[float]]:
    """Seconds of each method for ``rows`` rows, ``repeat`` times, interleaved."""
    conn.send(("make", rows))
    conn.recv()
    expected = make_frame(rows)
    found = methods()
    for label, method in found.items():  # warm up, and check that every method returns the frame
        pd.testing.assert_frame_equal(method(conn), expected, check_column_type=False, check_index_type=False)
        _settle()
    del expected
    times: dict[str, list[float]] = {label: [] for label in found}
    for _ in range(repeat):
        for label, method in found.items():
            start = time.perf_counter()
            result = method(conn)
            times[label].append(time.perf_counter() - start)
            del result
            _settle()
    return times


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
                    [rows, f"{rows * ROW_BYTES / 1e6:.3f}", label, f"{statistics.median(t):.6f}", f"{min(t):.6f}", f"{max(t):.6f}", len(t)]
                )


def plot(path: Path, results: dict[int, dict[str, list[float]]], subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    labels = list(results[sizes[0]])
    medians = {label: np.array([statistics.median(results[n][label]) for n in sizes]) for label in labels}
    baseline = medians["pickle protocol 5 through a pipe"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for label in labels:
        style = "-" if label.startswith("shmalloc") else "--"
        left.loglog(sizes, medians[label], style, marker="o", label=label)
        right.semilogx(sizes, baseline / medians[label], style, marker="o", label=label)
    left.set(xlabel="rows (13 bytes each)", ylabel="seconds (median)", title="time to return the frame")
    right.set(xlabel="rows (13 bytes each)", ylabel="times faster than pickle", title="speed-up over pickle through a pipe")
    right.axhline(1, color="grey", linewidth=0.8)
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"One worker returns a DataFrame (x float64, y bool, z int32)\n{subtitle}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-rows", type=float, default=1e7, help="largest frame measured (default 1e7)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per size and method (default 7)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "_static", help="where to write the files")
    args = parser.parse_args(argv)
    sizes = [n for n in SIZES if n <= args.max_rows]
    if not sizes or args.repeat < 1:
        parser.error("--max-rows must be at least 1e4 and --repeat at least 1")
    args.out.mkdir(parents=True, exist_ok=True)

    before = load_average()
    resource_tracker.ensure_running()  # the worker's SharedMemory blocks register with the parent's tracker
    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.get_context("fork").Process(target=_serve, args=(child,), daemon=True)
    worker.start()
    child.close()
    results: dict[int, dict[str, list[float]]] = {}
    try:
        for rows in sizes:
            results[rows] = measure(parent, rows, args.repeat)
            line = ", ".join(f"{label} {statistics.median(t):.4f}" for label, t in results[rows].items())
            print(f"{rows:>9} rows: {line}", flush=True)
        parent.send(("stop", None))
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()
        for leftover in Path("/dev/shm").glob(f"{PEER_PREFIX}{worker.pid}_*"):  # after a failure
            leftover.unlink(missing_ok=True)
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
