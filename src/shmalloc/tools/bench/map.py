"""Benchmark of shmalloc.map: 2 forked workers each return a data frame (bettermc's README benchmark).

The frame has N rows of x float64, y bool, z int32 (13 bytes a row) and is
made in the parent before the workers fork, so every method measures only
the return of the results. All methods run interleaved, repetition by
repetition, in one process; medians are reported.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor as StdExecutor
from multiprocessing import resource_tracker

import pandas as pd

import shmalloc

from . import median_time, peers, print_table, workloads

WORKERS = 2
_frame: pd.DataFrame | None = None  # inherited by the forked workers


def _return_frame(_: int) -> pd.DataFrame:
    assert _frame is not None  # set before the workers fork
    return _frame


def _fork() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


# --- the methods: each returns the list of the workers' frames ------------------------------


def shmalloc_map(copy: bool) -> Callable[[], list]:
    return lambda: shmalloc.map(_return_frame, range(WORKERS), processes=WORKERS, start_method="fork", copy=copy)


_pools: dict[bool, "shmalloc.Pool"] = {}  # made in measure(), after the frame: the workers inherit it


def shmalloc_pool(copy: bool) -> Callable[[], list]:
    """A persistent shmalloc.Pool (one per copy mode), warm after the first call."""
    return lambda: _pools[copy].map(_return_frame, range(WORKERS), copy=copy)


def mp_pool() -> list:
    with _fork().Pool(WORKERS) as pool:
        return pool.map(_return_frame, range(WORKERS))


def cf_executor() -> list:
    with StdExecutor(WORKERS, mp_context=_fork()) as pool:
        return list(pool.map(_return_frame, range(WORKERS)))


def _send_stdlib(_: int) -> peers.StdlibAnswer:
    return peers.send_stdlib(_return_frame(0))


def stdlib_shared_memory() -> list:
    """By hand with multiprocessing.shared_memory; columns copied out (zero-copy would crash on close)."""
    with _fork().Pool(WORKERS) as pool:
        answers = pool.map(_send_stdlib, range(WORKERS))
    return [peers.receive_stdlib(answer) for answer in answers]


def _send_shared_array(_: int) -> list[tuple[str, str]]:
    return peers.send_shared_array(_return_frame(0))


def shared_array() -> list:
    """SharedArray by hand: workers create and fill arrays, the parent attaches them (zero-copy)."""
    with _fork().Pool(WORKERS) as pool:
        answers = pool.map(_send_shared_array, range(WORKERS))
    return [peers.receive_shared_array(answer) for answer in answers]


def ray_store(rows: int, repeat: int) -> float | None:
    """Ray's object store: the frame is put once, tasks return it (zero-copy, read-only).

    Measured in a child process after the others: forking a process that runs
    Ray's threads is unsafe, and Ray's signal handlers would reach the workers.
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_ray_child, (rows, repeat))


def _ray_child(rows: int, repeat: int) -> float:
    import ray

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        frame = workloads.frame(rows)
        ref = ray.put(frame)

        @ray.remote
        def give(frame):
            return frame

        def method() -> list:
            return ray.get([give.remote(ref) for _ in range(WORKERS)])

        got = method()
        assert len(got) == WORKERS and got[0]["z"].equals(frame["z"])
        del got
        return statistics.median(median_time(method, 1) for _ in range(repeat))
    finally:
        ray.shutdown()


def _methods() -> dict[str, Callable[[], list]]:
    methods = {
        "shmalloc.map, copy=False": shmalloc_map(False),
        "shmalloc.map, copy=True": shmalloc_map(True),
        "shmalloc.Pool (persistent, warm), copy=False": shmalloc_pool(False),
        "shmalloc.Pool (persistent, warm), copy=True": shmalloc_pool(True),
        "multiprocessing.Pool": mp_pool,
        "concurrent.futures": cf_executor,
        "stdlib SharedMemory by hand, copied out": stdlib_shared_memory,
    }
    if peers.SharedArray is not None:
        methods["SharedArray by hand, zero-copy"] = shared_array
    return methods


def _check(frames: list) -> None:
    assert _frame is not None and len(frames) == WORKERS
    for frame in frames:
        pd.testing.assert_frame_equal(frame, _frame, check_column_type=False, check_index_type=False)


PEAKS: dict[tuple[int, str], float] = {}  # (rows, method) -> parent's peak extra memory / results' size


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_extra(method: Callable[[], list]) -> float:
    """Bytes the parent's resident set peaks above its size before the call, results touched.

    Linux only (resets the peak through /proc/self/clear_refs); nan elsewhere.
    """
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident size
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    frames = method()
    for frame in frames:  # read every page of the results, as a user would
        for column in frame.columns:
            frame[column].to_numpy().sum()
    peak = _status_kb("VmHWM")
    del frames
    gc.collect()
    return (peak - before) * 1024.0


def measure(rows: int, repeat: int) -> dict[str, float]:
    """Median seconds of each method for a frame of ``rows`` rows, interleaved."""
    global _frame
    _frame = workloads.frame(rows)
    resource_tracker.ensure_running()  # the workers' SharedMemory blocks register with the parent's tracker
    for copy in (False, True):
        _pools[copy] = shmalloc.Pool(WORKERS, start_method="fork")
    try:
        methods = _methods()
        for method in methods.values():  # warm up, and check every method returns the frames
            _check(method())
            gc.collect()
        times: dict[str, list[float]] = {label: [] for label in methods}
        for _ in range(repeat):
            for label, method in methods.items():
                times[label].append(median_time(method, 1))
                gc.collect()
        peaks = {label: peak_extra(methods[label]) for label in methods if label.startswith("shmalloc")}
    finally:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
        peers.remove_leftovers(os.getpid())  # what a failed peer left
    result_bytes = int(_frame.memory_usage(index=False).sum()) * WORKERS
    _frame = None
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, peak in peaks.items():
        PEAKS[(rows, label)] = peak / result_bytes
    ray = ray_store(rows, repeat)
    if ray is not None:
        medians["Ray object store, zero-copy (measured after the others)"] = ray
    return medians


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the benchmark table (and the goals of issues 4 and 6) for 1e7 and 3e7 rows; small sizes if quick."""
    sizes = workloads.MAP_ROWS.pick(quick)
    repeat = min(repeat, 2) if quick else repeat
    results = {rows: measure(rows, repeat) for rows in sizes}
    labels = list(results[sizes[0]])
    header = ["method"] + [f"{rows:.0e} rows: s" for rows in sizes] + [f"{rows:.0e}: x Pool" for rows in sizes]
    rows_out = []
    for label in labels:
        rows_out.append(
            [label]
            + [results[rows][label] for rows in sizes]
            + [results[rows][label] / results[rows]["multiprocessing.Pool"] for rows in sizes]
        )
    print_table(
        f"map: {WORKERS} forked workers each return a data frame ({workloads.FRAME_COLUMNS}), median of {repeat}",
        header,
        rows_out,
    )
    print()
    ray = "Ray object store, zero-copy (measured after the others)"
    stdlib = "stdlib SharedMemory by hand, copied out"
    goals = []
    for ours in ("shmalloc.map", "shmalloc.Pool (persistent, warm)"):
        goals += [
            (f"{ours} copy=False / Ray", f"{ours}, copy=False", ray, "<= 0.8 (then 0.5)"),
            (f"{ours} copy=False / multiprocessing.Pool", f"{ours}, copy=False", "multiprocessing.Pool", "<= 1/40 (0.025)"),
            (f"{ours} copy=True / {stdlib}", f"{ours}, copy=True", stdlib, "<= 0.4"),
        ]
    goal_rows = []
    for title, ours, theirs, target in goals:
        if theirs in results[sizes[0]]:
            goal_rows.append([title, target] + [results[rows][ours] / results[rows][theirs] for rows in sizes])
    print_table("map: goals (time ratios)", ["ratio", "goal"] + [f"{rows:.0e} rows" for rows in sizes], goal_rows)
    print()
    peak_rows = [
        [label] + [PEAKS.get((rows, label), float("nan")) for rows in sizes]
        for label in labels
        if label.startswith("shmalloc")
    ]
    print_table(
        "map: the parent's peak memory above its size before the call, results read, / the results' size"
        " (goal for copy=False: <= 1.1)",
        ["method"] + [f"{rows:.0e} rows" for rows in sizes],
        peak_rows,
    )
