"""Benchmark: data frames through shared memory against pickle protocol 5, in one run.

The frame of bettermc's benchmark (x float64, y bool, z int32: 13 bytes a
row), and variants with a category column and with a string column of
``rows / 30`` distinct values, each repeated 30 times.
"""
from __future__ import annotations

import gc
import pickle

import pandas as pd

from ... import ShmObj, allocate_from_shm, copy2shm, unlink
from . import median_time, print_table, workloads


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the table: seconds (medians) and the speed-up over pickle."""
    (rows,) = workloads.PANDAS_ROWS.pick(quick)
    rows_out = []
    for label, df in workloads.pandas_frames(rows).items():
        rows_out.append([label, *_measure(df, repeat)])
        del df
        gc.collect()
    print_table(
        f"pandas: {rows:.0e} rows, seconds (median of {repeat})",
        [
            "frame",
            "pickle dumps",
            "pickle loads",
            "copy2shm",
            "allocate copy=True",
            "allocate copy=False",
            "speed-up, copy=True",
            "speed-up, copy=False",
            "MB in shm",
            "MB pickled",
        ],
        rows_out,
    )


def _pickle_times(df: pd.DataFrame, repeat: int) -> tuple[float, float, float]:
    """Seconds of pickle.dumps and pickle.loads, and MB of the stream (freed on return)."""
    stream = pickle.dumps(df, protocol=5)
    dumps = median_time(lambda: pickle.dumps(df, protocol=5), repeat)
    loads = median_time(lambda: pickle.loads(stream), repeat)
    return dumps, loads, len(stream) / 1e6


def _measure(df: pd.DataFrame, repeat: int) -> list[object]:
    dumps, loads, pickled_mb = _pickle_times(df, repeat)

    handles: list[ShmObj] = []
    export = median_time(lambda: handles.append(copy2shm(df)), repeat, setup=lambda: _consume(handles))
    _consume(handles)
    size_mb = 0.0

    def make() -> None:
        nonlocal size_mb
        _consume(handles)
        handles.append(copy2shm(df))
        size_mb = handles[-1].size / 1e6

    allocate: dict[bool, float] = {}
    results: list[pd.DataFrame] = []

    def setup() -> None:
        results.clear()  # free the previous result outside the timed part
        make()

    for copy in (True, False):

        def allocate_one(copy: bool = copy) -> None:  # bound now: median_time calls it within this iteration
            results.append(allocate_from_shm(handles.pop(), copy=copy))

        allocate[copy] = median_time(allocate_one, repeat, setup)
    results.clear()
    pickle_total = dumps + loads
    return [
        dumps,
        loads,
        export,
        allocate[True],
        allocate[False],
        f"{pickle_total / (export + allocate[True]):.1f}x",
        f"{pickle_total / (export + allocate[False]):.1f}x",
        size_mb,
        pickled_mb,
    ]


def _consume(handles: list[ShmObj]) -> None:
    """Remove the objects of handles left over from a previous round."""
    while handles:
        unlink(handles.pop())
