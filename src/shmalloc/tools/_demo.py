"""``python -m shmalloc demo``: a data frame made in worker processes, returned three ways."""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TextIO

import numpy as np
import pandas as pd

import shmalloc

WORKERS = 2
#: Rows of each worker's frame: small enough that a first run takes about 10 s, pool startup included.
DEFAULT_ROWS = 5_000_000
#: ``--large``: the size of bettermc's benchmark.
LARGE_ROWS = 10_000_000
#: Each method is timed this often, the methods interleaved; the table shows medians.
ROUNDS = 3
#: The methods compared: label in the table, and in the progress lines.
METHODS = [
    ("pickled through pipes (ProcessPoolExecutor)", "pickled"),
    ("shmalloc, copy=True", "copy=True"),
    ("shmalloc, copy=False (zero-copy)", "copy=False"),
]


def make_frame(rows: int, seed: int) -> pd.DataFrame:
    """A frame shaped like sensor readings: time stamps, a station factor, floats, flags, counts."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2026-01-01T00:00:00", "ns")
    return pd.DataFrame(
        {
            "time": start + np.cumsum(rng.integers(0, 2 * 10**9, rows)).astype("m8[ns]"),
            "station": pd.Categorical.from_codes(rng.integers(0, 500, rows), pd.Index([f"ST{i:04d}" for i in range(500)])),
            "temperature": rng.normal(12.0, 8.0, rows),
            "ok": rng.random(rows) > 0.01,
            "count": rng.integers(0, 1000, rows, dtype=np.int32),
        }
    )


_frame: pd.DataFrame | None = None  # each worker's result, built once before timing


def _build(rows: int) -> None:
    global _frame
    _frame = make_frame(rows, seed=os.getpid())


def _pickled() -> pd.DataFrame:
    assert _frame is not None  # built by the worker's initializer
    return _frame


def _through_shm(copy: bool) -> shmalloc.ShmObj:
    return shmalloc.copy2shm(_frame, copy=copy)


def _collect(pools: list[ProcessPoolExecutor], method: int) -> tuple[float, list[pd.DataFrame]]:
    """Time getting every worker's frame into this process by ``method`` (an index into METHODS)."""
    fn: Callable[..., object] = _pickled if method == 0 else _through_shm
    args = () if method == 0 else (method == 1,)
    start = time.perf_counter()
    futures = [pool.submit(fn, *args) for pool in pools]
    results: list[Any] = [f.result() for f in futures]  # frames, or handles to them
    if method > 0:
        results = [shmalloc.allocate_from_shm(obj) for obj in results]
    return time.perf_counter() - start, results


def leftover_segments(before: set[str], pids: set[int], since: float) -> list[str]:
    """Names of the shmalloc segments in /dev/shm that a run of this process may have left.

    A segment counts if its name carries one of ``pids`` (this process and its
    workers), or if it is new: not in ``before`` and written at ``since`` (a
    time.time()) or later, whichever pid its name carries. New segments of
    other live processes (another program using shmalloc meanwhile) do not count.
    """
    now = shmalloc.segments()
    carries_pid = now["pid"].isin(list(pids))
    new = ~now["name"].isin(list(before)) & (now["created"] >= pd.Timestamp(since, unit="s", tz="UTC"))
    someone_elses = now["alive"] & ~carries_pid
    return sorted(now.loc[carries_pid | (new & ~someone_elses), "name"])


def _lasting_leftovers(before: set[str], pids: set[int], since: float, settle: float = 1.0) -> list[str]:
    """:func:`leftover_segments`, less new segments that vanish within ``settle`` seconds: a segment
    whose name carries none of ``pids`` may be another program's handle in flight, consumed a moment later."""
    leftovers = leftover_segments(before, pids, since)
    deadline = time.monotonic() + settle
    while any(_creator_pid(name) not in pids for name in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)
        still = set(leftover_segments(before, pids, since))
        leftovers = [name for name in leftovers if name in still]
    return leftovers


def _creator_pid(name: str) -> int:
    """The creator pid in a generated name ``/shmalloc_<pid>_<random>``."""
    return int(name.split("_")[1])


def intro(rows: int, rounds: int = ROUNDS) -> str:
    """The demo's first lines: what it does."""
    return (
        f"{WORKERS} worker processes each build a data frame of {rows:,} rows (time, station, temperature, ok,"
        f" count);\nthis process gets both frames back by pickling and through shared memory, {rounds} rounds each."
    )


def _check_same(expected: list[pd.DataFrame], got: list[pd.DataFrame], thorough: bool, what: str) -> None:
    """Raise AssertionError unless each frame of ``got`` equals its counterpart in ``expected``."""
    for a, b in zip(expected, got, strict=True):
        if a is b:
            continue
        if thorough:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        elif not (a.dtypes.equals(b.dtypes) and a.equals(b)):
            raise AssertionError(f"{what}: a result differs from the first one")


def _measure(
    pools: list[ProcessPoolExecutor], rounds: int, say: Callable[..., None]
) -> tuple[list[list[float]], list[pd.DataFrame]]:
    """Time every method ``rounds`` times, interleaved, checking every result; return the times and the first results."""
    seconds: list[list[float]] = [[] for _ in METHODS]
    first: list[pd.DataFrame] = []
    for round_ in range(1, rounds + 1):
        say(f"Round {round_}/{rounds}:", end="")
        for index, (label, short) in enumerate(METHODS):  # interleaved: a change of load hits every method alike
            elapsed, frames = _collect(pools, index)
            seconds[index].append(elapsed)
            first = first or frames
            # Thoroughly once; later rounds by DataFrame.equals (values and dtypes), which is much faster.
            _check_same(first, frames, thorough=round_ == 1, what=f"{label}, round {round_}")
            if index == 2:
                frames[0].loc[0, "temperature"] = -99.0  # zero-copy results are writable (copy-on-write)
            say(f"  {short} {elapsed:.2f} s", end="")
            del frames  # free this round's results before the next method runs
        say()
    return seconds, first


def run_demo(rows: int = DEFAULT_ROWS, rounds: int = ROUNDS, out: TextIO | None = None) -> int:
    """Return frames from worker processes by pickling and through shared memory; print the comparison.

    Returns 0, or 1 if the run left a segment in /dev/shm (the names are printed).
    """
    out = out or sys.stdout

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    # Margin for file time stamps, which the kernel takes from a clock that may lag time.time().
    since = time.time() - 1.0
    before = set(shmalloc.segments()["name"])
    say(intro(rows, rounds) + "\n")
    say("Starting the workers and building their frames (not timed) ...", end=" ")
    started = time.perf_counter()
    # One single-worker pool per result, so that each result is built once, untimed, in its own process,
    # and every method (pickling included) finds its workers running.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_build, initargs=(rows,)) for _ in range(WORKERS)]
    try:
        worker_pids = {pool.submit(os.getpid).result() for pool in pools}  # returns once the frame is built
        say(f"done in {time.perf_counter() - started:.1f} s.")
        seconds, first = _measure(pools, rounds, say)
    finally:
        for pool in pools:
            pool.shutdown()
    size = sum(int(df.memory_usage(index=True, deep=False).sum()) for df in first)
    medians = [statistics.median(s) for s in seconds]
    say(f"\nResults: {size / 1e6:,.0f} MB in all. Medians of {rounds} rounds:\n")
    say(f"{'method':<46}{'seconds':>9}{'vs. pickling':>14}")
    for (label, _), median in zip(METHODS, medians, strict=True):  # a median for each method
        say(f"{label:<46}{median:>9.2f}{medians[0] / median:>13.1f}x")
    say("\nAll results are equal: pandas.testing.assert_frame_equal(check_exact=True) in round 1,"
        "\nDataFrame.equals in later rounds.")
    leftovers = _lasting_leftovers(before, worker_pids | {os.getpid()}, since)
    say(f"Segments left in /dev/shm by this demo: {len(leftovers)}")
    if leftovers:
        say("  " + "\n  ".join(leftovers))
    return 1 if leftovers else 0
