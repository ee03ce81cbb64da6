"""Benchmark of many results: 2 workers run many tasks, each computing and returning a new data frame.

What most pools do all day: per-group or per-chunk results of medium size,
computed in the worker. Each task builds a new frame of N rows (bettermc's
columns, seeded by the task's number), so every method pays the same
computation and what differs is how the results come back. Every pool is
started (and used once) before timing and kept open; ``shmalloc.map`` starts
its workers per call, as it does when used. Methods run interleaved,
repetition by repetition, in one process; medians are reported.
"""
from __future__ import annotations

import functools
import gc
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor as StdExecutor
from typing import Any

import pandas as pd

import shmalloc
from shmalloc.parallel._options import pick_chunksize

from . import WARM_ROUNDS, interleaved_medians, print_table, workloads
from .workloads import compute_task, compute_task_only

WORKERS = 2
# The pools kept open run threads (multiprocessing.Pool's handlers, the executors' managers): every
# worker started beside them comes from the fork server, so that no multi-threaded process forks.
START_METHOD = "forkserver"
BASELINE = "multiprocessing.Pool"
FLOOR = "floor: the tasks compute, return nothing (multiprocessing.Pool)"


def _std_chunksize(tasks: int) -> int:
    # what multiprocessing.Pool.map (and shmalloc's map) picks by itself, given to the executors too
    # (their default is 1)
    return pick_chunksize(None, tasks, WORKERS)


def _methods(pools: dict[str, Any]) -> dict[str, Callable[[list], list]]:
    return {
        "shmalloc.Pool, copy=False": lambda tasks: pools["pool"].map(compute_task, tasks, copy=False),
        "shmalloc.Pool, copy=True": lambda tasks: pools["pool"].map(compute_task, tasks, copy=True),
        "shmalloc.ProcessPoolExecutor, copy=False": lambda tasks: list(
            pools["executor"].map(compute_task, tasks, chunksize=_std_chunksize(len(tasks)))
        ),
        "shmalloc.map (starts its workers), copy=False": lambda tasks: shmalloc.map(
            compute_task, tasks, processes=WORKERS, start_method=START_METHOD, copy=False
        ),
        BASELINE: lambda tasks: pools["mp"].map(compute_task, tasks),
        f"{BASELINE} (started per call)": _mp_pool_per_call,
        "concurrent.futures": lambda tasks: list(pools["cf"].map(compute_task, tasks, chunksize=_std_chunksize(len(tasks)))),
        FLOOR: lambda tasks: pools["mp"].map(compute_task_only, tasks),
    }


def _mp_pool_per_call(tasks: list) -> list:
    """shmalloc.map's peer: a multiprocessing.Pool started for the call."""
    with multiprocessing.get_context(START_METHOD).Pool(WORKERS) as pool:
        return pool.map(compute_task, tasks)


def _start_pools() -> dict[str, Any]:
    context = multiprocessing.get_context(START_METHOD)
    return {
        "pool": shmalloc.Pool(WORKERS, start_method=START_METHOD),
        "executor": shmalloc.ProcessPoolExecutor(WORKERS, mp_context=context, copy=False),
        "mp": context.Pool(WORKERS),
        "cf": StdExecutor(WORKERS, mp_context=context),
    }


def _close(pools: dict[str, Any]) -> None:
    pools["pool"].close()
    pools["executor"].shutdown(wait=True)
    pools["mp"].close()
    pools["mp"].join()
    pools["cf"].shutdown(wait=True)


def measure(tasks_by_rows: dict[int, int], repeat: int, warm: int = WARM_ROUNDS) -> dict[int, dict[str, float]]:
    """Median seconds of each method for each size, methods interleaved, each run ``warm`` times (at least
    once, checked) before timing."""
    pools = _start_pools()
    try:
        methods = _methods(pools)
        found: dict[int, dict[str, float]] = {}
        for rows, count in tasks_by_rows.items():
            tasks = [(number, rows) for number in range(count)]
            expected = [compute_task(task) for task in tasks[:2]]
            for label, method in methods.items():  # warm up, and check that every method returns the frames
                got = method(tasks)
                if label == FLOOR:
                    continue
                assert len(got) == count
                for frame, want in zip(got, expected, strict=False):
                    pd.testing.assert_frame_equal(frame, want, check_column_type=False, check_index_type=False)
                del got
                gc.collect()
            runs = {label: functools.partial(method, tasks) for label, method in methods.items()}
            found[rows] = interleaved_medians(runs, repeat, warm - 1)
    finally:
        _close(pools)
    return found


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the table: seconds per call and the ratio to multiprocessing.Pool, per size of result."""
    tasks_by_rows = workloads.RESULTS_QUICK_TASKS_BY_ROWS if quick else workloads.RESULTS_TASKS_BY_ROWS
    repeat = min(repeat, 2) if quick else repeat
    results = measure(tasks_by_rows, repeat, 1 if quick else WARM_ROUNDS)
    sizes = list(tasks_by_rows)
    labels = list(results[sizes[0]])
    header = ["method"] + [f"{rows:.0e} rows x {tasks_by_rows[rows]}: x {BASELINE}" for rows in sizes]
    rows_out = [[label] + [results[rows][label] / results[rows][BASELINE] for rows in sizes] for label in labels]
    rows_out.append([f"{BASELINE}: ms"] + [results[rows][BASELINE] * 1e3 for rows in sizes])
    print_table(
        f"results: {WORKERS} workers ({START_METHOD}), tasks each compute and return a new frame ({workloads.FRAME_COLUMNS}); "
        f"time / {BASELINE}'s, median of {repeat}",
        header,
        rows_out,
    )
