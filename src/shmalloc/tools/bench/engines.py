"""Benchmark of the engines people run: 8 tasks each compute and return a new frame, on 2 workers.

shmalloc's Pool, joblib with its loky backend and with shmalloc's backend,
a multiprocessing.Pool kept open, and, where installed, a Dask LocalCluster
of 2 worker processes, plain and with shmalloc's transport (shmalloc.dask),
and Ray. Every engine is started and used once before
timing (Ray's store and Dask's workers warm); methods run interleaved,
repetition by repetition, in one process; medians are reported, as ratios to
joblib's default backend (loky). The floor is the computation alone: the
same tasks returning nothing.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

import shmalloc

from . import WARM_ROUNDS, interleaved_medians, print_table, workloads
from .workloads import compute_task, compute_task_only

WORKERS = 2
START_METHOD = "forkserver"  # the pools kept open run threads: workers come from the fork server
BASELINE = "joblib, loky backend"
FLOOR = "floor: the tasks compute, return nothing (multiprocessing.Pool kept open)"


def _joblib_methods(stack: contextlib.ExitStack) -> dict[str, Callable[[list], list]]:
    try:
        import joblib
    except ImportError:
        return {}
    from joblib.externals.loky import get_reusable_executor

    import shmalloc.joblib

    # Both backends keep their workers between calls: stop them when the benchmark ends.
    stack.callback(shmalloc.joblib.shutdown)
    stack.callback(lambda: get_reusable_executor().shutdown(wait=True))

    def run(backend: str, **options: Any) -> Callable[[list], list]:
        def call(tasks: list) -> list:
            with joblib.parallel_config(backend=backend, n_jobs=WORKERS, **options):
                return joblib.Parallel()(joblib.delayed(compute_task)(task) for task in tasks)

        return call

    return {
        BASELINE: run("loky"),
        "joblib, shmalloc backend, copy=False": run("shmalloc", copy=False, start_method=START_METHOD),
        "joblib, shmalloc backend, copy=True": run("shmalloc", copy=True, start_method=START_METHOD),
    }


def _dask_methods(stack: contextlib.ExitStack) -> dict[str, Callable[[list], list]]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return {}
    import shmalloc.dask

    def gather_with(cluster_class: type, client_class: type) -> Callable[[list], list]:
        options = {"n_workers": WORKERS, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
        cluster = stack.enter_context(cluster_class(**options))
        client = stack.enter_context(client_class(cluster))
        return lambda tasks: client.gather(client.map(compute_task, tasks, pure=False))

    return {
        "Dask LocalCluster, client.gather": gather_with(LocalCluster, Client),
        "shmalloc.dask LocalCluster, client.gather": gather_with(shmalloc.dask.LocalCluster, shmalloc.dask.Client),
    }


def _ray_methods(stack: contextlib.ExitStack) -> dict[str, Callable[[list], list]]:
    try:
        import ray
    except ImportError:
        return {}
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)
    remote = ray.remote(compute_task)
    return {"Ray (warm store), ray.get": lambda tasks: ray.get([remote.remote(task) for task in tasks])}


@contextlib.contextmanager
def _engines() -> Iterator[dict[str, Callable[[list], list]]]:
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(shmalloc.Pool(WORKERS, start_method=START_METHOD))
        mp_pool = stack.enter_context(multiprocessing.get_context(START_METHOD).Pool(WORKERS))
        methods = {
            "shmalloc.Pool, copy=False": lambda tasks: pool.map(compute_task, tasks, copy=False, chunksize=1),
            "shmalloc.Pool, copy=True": lambda tasks: pool.map(compute_task, tasks, copy=True, chunksize=1),
            **_joblib_methods(stack),
            "multiprocessing.Pool kept open": lambda tasks: mp_pool.map(compute_task, tasks, chunksize=1),
            FLOOR: lambda tasks: mp_pool.map(compute_task_only, tasks, chunksize=1),
            **_dask_methods(stack),
            **_ray_methods(stack),
        }
        yield methods


def measure(rows: int, repeat: int, warm: int = WARM_ROUNDS) -> dict[str, float]:
    """Median seconds of each engine, interleaved; each is started and used ``warm`` times (at least once)
    before timing."""
    tasks = [(number, rows) for number in range(workloads.ENGINES_TASKS)]
    expected = compute_task(tasks[-1])
    with _engines() as methods:
        for label, method in methods.items():  # warm up, and check that every engine returns the frames
            got = method(tasks)
            assert len(got) == len(tasks)
            if label != FLOOR:
                pd.testing.assert_frame_equal(got[-1], expected, check_column_type=False, check_index_type=False)
            del got
            gc.collect()
        runs = {label: functools.partial(method, tasks) for label, method in methods.items()}
        return interleaved_medians(runs, repeat, warm - 1)


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the table: milliseconds per call and the ratio to joblib's loky backend."""
    rows = workloads.ENGINES_ROWS.pick(quick)[0]
    repeat = min(repeat, 2) if quick else repeat
    medians = measure(rows, repeat, 1 if quick else WARM_ROUNDS)
    baseline = medians.get(BASELINE)
    table = [[label, seconds * 1e3, seconds / baseline if baseline else "-"] for label, seconds in medians.items()]
    print_table(
        f"engines: {workloads.ENGINES_TASKS} tasks each compute and return a new {rows:.0e}-row frame "
        f"({workloads.FRAME_COLUMNS}), {WORKERS} workers; median of {repeat}",
        ["engine", "ms", f"x {BASELINE}"],
        table,
    )
