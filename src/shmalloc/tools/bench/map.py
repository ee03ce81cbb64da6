"""Benchmark of shmalloc.map and Pool: 2 forked workers each return a data frame (bettermc's README benchmark).

The input frame has N rows of x float64, y bool, z int32 (13 bytes a row)
and is made in the parent before the workers fork. Two workloads:

- "inherited": each worker returns the input as it is, so every method
  measures only the return of the results (bettermc's benchmark);
- "computed": each worker returns a new frame computed from the input
  (``workloads.computed_frame``), as real tasks do: the result is born in
  the worker, and its pages are new.

Ray runs in this process, warm: started once for the section, the input
``ray.put`` once per size, its tasks take that reference. Every method runs
once untimed (that round checks the results), then all run interleaved,
repetition by repetition, in one process; medians are reported.
"""
from __future__ import annotations

import gc
import logging
import mmap
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor as StdExecutor
from multiprocessing import resource_tracker
from typing import Any

import numpy as np
import pandas as pd

import shmalloc

from . import WARM_ROUNDS, interleaved_medians, peers, print_table, workloads

WORKERS = 2
RAY = "Ray object store (warm), zero-copy"
STDLIB = "stdlib SharedMemory by hand, copied out"
FLOOR = "floor: the workers compute, return nothing (shmalloc.Pool)"
WARM_FLOOR = "floor: the workers write the result by hand into warm shared memory"
Item = tuple[str, int]  # (workload, the task's number)
_frame: pd.DataFrame | None = None  # inherited by the forked workers


def result_of(frame: pd.DataFrame, workload: str, number: int) -> pd.DataFrame:
    """What task ``number`` of ``workload`` returns, given the input ``frame``."""
    return frame if workload == "inherited" else workloads.computed_frame(frame, number)


def _task(item: Item) -> pd.DataFrame:
    assert _frame is not None  # set before the workers fork
    return result_of(_frame, *item)


def _compute_only(item: Item) -> None:
    """The floor: the task's work, with nothing returned."""
    _task(item)


# In each worker of the warm floor's pool: two sets of arrays shaped as the frame's columns, in shared
# memory it faulted in once (anonymous: no name to leave behind), for the frame of this many rows.
_warm_rows = -1
_warm_arrays: list[list[np.ndarray]] = []


def _warm_shared_arrays(frame: pd.DataFrame) -> list[list[np.ndarray]]:
    global _warm_rows, _warm_arrays
    if _warm_rows != len(frame):
        _warm_arrays = []  # the last size's mappings go with their arrays
        columns = [frame[column].to_numpy() for column in frame.columns]
        for _ in range(2):
            arrays = [np.frombuffer(mmap.mmap(-1, max(c.nbytes, 1)), c.dtype, len(c)) for c in columns]
            for array in arrays:
                array.fill(0)  # every page faulted in now, not while timed
            _warm_arrays.append(arrays)
        _warm_rows = len(frame)
    return _warm_arrays


def _write_into_warm_memory(item: Item) -> None:
    """The floor of any method that returns the result through shared memory: the result written by hand
    into shared pages the worker has already faulted in (what a recycled spare is at best), nothing
    returned. Inherited: one copy of the columns. Computed: the arithmetic into them, then the copy
    that pandas makes of a dict's arrays when it builds the frame (``computed_frame`` does)."""
    workload, number = item
    assert _frame is not None  # set before the workers fork
    first, second = _warm_shared_arrays(_frame)
    if workload == "inherited":
        sources = [_frame[column].to_numpy() for column in _frame.columns]
    else:
        workloads.computed_columns_into(_frame, number, first)
        sources = first
    for out, source in zip(second, sources, strict=True):
        np.copyto(out, source)


def _items(workload: str) -> list[Item]:
    return [(workload, number) for number in range(WORKERS)]


def _fork() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


# --- the methods: each returns the list of the workers' frames ------------------------------


# Made in measure(), after the frame: the workers inherit it. One per copy mode, and one for the floor (a call
# that returns nothing would leave the others' spares cold: the last calls' bytes bound them).
_pools: dict[bool | str, "shmalloc.Pool"] = {}


def _send_stdlib(item: Item) -> peers.StdlibAnswer:
    return peers.send_stdlib(_task(item))


def _send_shared_array(item: Item) -> list[tuple[str, str]]:
    return peers.send_shared_array(_task(item))


def _methods(workload: str, ray: Any, frame_ref: Any) -> dict[str, Callable[[], list]]:
    """The methods for ``workload``; Ray's if ``ray`` (the module, started) is given, with the input's ref."""
    items = _items(workload)

    def shmalloc_map(copy: bool) -> Callable[[], list]:
        return lambda: shmalloc.map(_task, items, processes=WORKERS, start_method="fork", copy=copy)

    def shmalloc_pool(copy: bool) -> Callable[[], list]:
        # A persistent shmalloc.Pool (one per copy mode), warm after the first call.
        return lambda: _pools[copy].map(_task, items, copy=copy)

    def mp_pool() -> list:
        with _fork().Pool(WORKERS) as pool:
            return pool.map(_task, items)

    def cf_executor() -> list:
        with StdExecutor(WORKERS, mp_context=_fork()) as pool:
            return list(pool.map(_task, items))

    def stdlib_shared_memory() -> list:
        # By hand with multiprocessing.shared_memory; columns copied out (zero-copy would crash on close).
        with _fork().Pool(WORKERS) as pool:
            answers = pool.map(_send_stdlib, items)
        return [peers.receive_stdlib(answer) for answer in answers]

    def shared_array() -> list:
        # SharedArray by hand: workers create and fill arrays, the parent attaches them (zero-copy).
        with _fork().Pool(WORKERS) as pool:
            answers = pool.map(_send_shared_array, items)
        return [peers.receive_shared_array(answer) for answer in answers]

    methods = {
        FLOOR: lambda: _pools[FLOOR].map(_compute_only, items),
        WARM_FLOOR: lambda: _pools[WARM_FLOOR].map(_write_into_warm_memory, items),
        "shmalloc.map, copy=False": shmalloc_map(False),
        "shmalloc.map, copy=True": shmalloc_map(True),
        "shmalloc.Pool (persistent, warm), copy=False": shmalloc_pool(False),
        "shmalloc.Pool (persistent, warm), copy=True": shmalloc_pool(True),
        "multiprocessing.Pool": mp_pool,
        "concurrent.futures": cf_executor,
        STDLIB: stdlib_shared_memory,
    }
    if peers.SharedArray is not None:
        methods["SharedArray by hand, zero-copy"] = shared_array
    if ray is not None:
        remote = ray.remote(result_of)
        methods[RAY] = lambda: ray.get([remote.remote(frame_ref, workload, number) for number in range(WORKERS)])
    return methods


_ray_started = False


def _no_ray_sigterm_in_child() -> None:
    # Ray's SIGTERM handlers (its native one and a Python one) must not reach the forked workers:
    # pools terminate theirs with SIGTERM, and Ray's handler would print a stack trace there.
    if _ray_started:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_ray() -> Any:
    """Ray, started in this process for the section; None where it is not installed."""
    global _ray_started
    try:
        import ray
    except ImportError:
        return None
    if not _ray_started:
        os.register_at_fork(after_in_child=_no_ray_sigterm_in_child)
    _ray_started = True
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return ray


def _check(frames: list, workload: str) -> None:
    assert _frame is not None and len(frames) == WORKERS
    if all(frame is None for frame in frames):  # the floor
        return
    for number, frame in enumerate(frames):
        expected = result_of(_frame, workload, number)
        pd.testing.assert_frame_equal(frame, expected, check_column_type=False, check_index_type=False)


PEAKS: dict[tuple[str, int, str], float] = {}  # (workload, rows, method) -> parent's peak extra memory / results' size


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


def measure(rows: int, workload: str, repeat: int, ray: Any = None, warm: int = WARM_ROUNDS) -> dict[str, float]:
    """Median seconds of each method for ``workload`` on a frame of ``rows`` rows, interleaved.

    ``ray``: the module, started (:func:`start_ray`), to measure it too. Each method runs ``warm`` times
    (at least once, checked) before timing.
    """
    global _frame
    _frame = workloads.frame(rows)
    resource_tracker.ensure_running()  # the workers' SharedMemory blocks register with the parent's tracker
    for key in (False, True, FLOOR, WARM_FLOOR):
        _pools[key] = shmalloc.Pool(WORKERS, start_method="fork")
    frame_ref = ray.put(_frame) if ray is not None else None
    try:
        methods = _methods(workload, ray, frame_ref)
        for method in methods.values():  # warm up, and check every method returns the frames
            _check(method(), workload)
            gc.collect()
        medians = interleaved_medians(methods, repeat, warm - 1)
        peaks = {label: peak_extra(methods[label]) for label in methods if label.startswith("shmalloc")}
    finally:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
        del frame_ref  # Ray frees the input once its last reference is gone
        peers.remove_leftovers(os.getpid())  # what a failed peer left
    result_bytes = int(_frame.memory_usage(index=False).sum()) * WORKERS
    _frame = None
    for label, peak in peaks.items():
        PEAKS[(workload, rows, label)] = peak / result_bytes
    return medians


def stop_ray(ray: Any) -> None:
    """Shut down the Ray that :func:`start_ray` started."""
    global _ray_started
    ray.shutdown()
    _ray_started = False


# (workload, ratio, ours, theirs, goal): the goals of issues 4, 6 and 14
GOALS = [
    ("inherited", "{ours} copy=False / Ray", "{ours}, copy=False", RAY, "<= 0.8 (then 0.5); Pool <= 0.6"),
    ("inherited", "{ours} copy=False / multiprocessing.Pool", "{ours}, copy=False", "multiprocessing.Pool", "<= 1/40 (0.025)"),
    ("inherited", "{ours} copy=True / stdlib SharedMemory by hand", "{ours}, copy=True", STDLIB, "<= 0.4"),
    ("computed", "{ours} copy=False / Ray", "{ours}, copy=False", RAY, "Pool <= 0.4"),
    ("computed", "{ours} copy=True / Ray", "{ours}, copy=True", RAY, "Pool <= 1.0"),
]


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the tables of both workloads (and the goals) for 1e7 and 3e7 rows; small sizes if quick."""
    sizes = workloads.MAP_ROWS.pick(quick)
    repeat = min(repeat, 2) if quick else repeat
    ray = start_ray()
    try:
        results = {
            workload: {rows: measure(rows, workload, repeat, ray, 1 if quick else WARM_ROUNDS) for rows in sizes}
            for workload in workloads.MAP_WORKLOADS
        }
    finally:
        if ray is not None:
            stop_ray(ray)
    what = {
        "inherited": "return the frame they inherited",
        "computed": "return a new frame computed from the one they inherited",
    }
    for workload, by_rows in results.items():
        labels = list(by_rows[sizes[0]])
        header = ["method"] + [f"{rows:.0e} rows: s" for rows in sizes] + [f"{rows:.0e}: x Pool" for rows in sizes]
        rows_out = [
            [label]
            + [by_rows[rows][label] for rows in sizes]
            + [by_rows[rows][label] / by_rows[rows]["multiprocessing.Pool"] for rows in sizes]
            for label in labels
        ]
        print_table(
            f"map, {workload}: {WORKERS} forked workers {what[workload]} ({workloads.FRAME_COLUMNS}), median of {repeat}",
            header,
            rows_out,
        )
        print()
    goal_rows = []
    for workload, ratio, ours_pattern, theirs, target in GOALS:
        for ours in ("shmalloc.map", "shmalloc.Pool (persistent, warm)"):
            by_rows = results[workload]
            label = ours_pattern.format(ours=ours)
            if theirs in by_rows[sizes[0]]:
                title = f"{workload}: {ratio.format(ours=ours)}"
                goal_rows.append([title, target] + [by_rows[rows][label] / by_rows[rows][theirs] for rows in sizes])
    for workload, by_rows in results.items():
        # The goals' bound: no method returning through shared memory takes less than this floor.
        if RAY in by_rows[sizes[0]]:
            title = f"{workload}: warm floor / Ray"
            floors = [by_rows[rows][WARM_FLOOR] / by_rows[rows][RAY] for rows in sizes]
            goal_rows.append([title, "(the least a goal / Ray can be)"] + floors)
        pool = "shmalloc.Pool (persistent, warm), copy=False"
        title = f"{workload}: {pool} / warm floor"
        goal_rows.append([title, "(1 is the work alone)"] + [by_rows[rows][pool] / by_rows[rows][WARM_FLOOR] for rows in sizes])
    print_table("map: goals (time ratios)", ["ratio", "goal"] + [f"{rows:.0e} rows" for rows in sizes], goal_rows)
    print()
    peak_rows = [
        [f"{workload}: {label}"] + [PEAKS.get((workload, rows, label), float("nan")) for rows in sizes]
        for workload in results
        for label in results[workload][sizes[0]]
        if label.startswith("shmalloc")
    ]
    print_table(
        "map: the parent's peak memory above its size before the call, results read, / the results' size"
        " (goal for copy=False: <= 1.1)",
        ["method"] + [f"{rows:.0e} rows" for rows in sizes],
        peak_rows,
    )
