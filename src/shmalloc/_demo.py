"""``python -m shmalloc demo``: a data frame made in worker processes, returned three ways."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

import shmalloc

WORKERS = 2


def make_frame(rows: int, seed: int) -> pd.DataFrame:
    """A frame shaped like sensor readings: time stamps, a station factor, floats, flags, counts."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2026-01-01T00:00:00", "ns")
    return pd.DataFrame(
        {
            "time": start + np.cumsum(rng.integers(0, 2 * 10**9, rows)).astype("m8[ns]"),
            "station": pd.Categorical.from_codes(rng.integers(0, 500, rows), [f"ST{i:04d}" for i in range(500)]),
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
    return _frame


def _through_shm(copy: bool) -> shmalloc.ShmObj:
    return shmalloc.copy2shm(_frame, copy=copy)


def _collect(pools: list[ProcessPoolExecutor], fn, *args) -> tuple[float, list]:
    start = time.perf_counter()
    futures = [pool.submit(fn, *args) for pool in pools]
    results = [f.result() for f in futures]
    if fn is _through_shm:
        results = [shmalloc.allocate_from_shm(obj) for obj in results]
    return time.perf_counter() - start, results


def run_demo(rows: int = 10_000_000) -> int:
    """Return frames from worker processes by pickling and through shared memory; print the comparison."""
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    print(f"{WORKERS} worker processes each build and return a frame of {rows:,} rows "
          f"(time, station, temperature, ok, count).")
    # A pool of one worker per result, so that each result is built once (untimed) in its own process.
    pools = [ProcessPoolExecutor(1, mp_context=mp.get_context(method), initializer=_build, initargs=(rows,))
             for _ in range(WORKERS)]
    try:
        for pool in pools:
            pool.submit(int).result()  # wait until the frames are built
        pickled_s, pickled = _collect(pools, _pickled)
        copied_s, copied = _collect(pools, _through_shm, True)
        zero_s, zero = _collect(pools, _through_shm, False)
    finally:
        for pool in pools:
            pool.shutdown()
    for a, b, c in zip(pickled, copied, zero):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        pd.testing.assert_frame_equal(a, c, check_exact=True)
    zero[0].loc[0, "temperature"] = -99.0  # zero-copy results are writable (copy-on-write)
    size = sum(int(df.memory_usage(index=True, deep=False).sum()) for df in pickled)
    print(f"results: {size / 1e6:,.0f} MB in all\n")
    print(f"{'method':<46}{'seconds':>9}{'vs. pickling':>14}")
    for label, seconds in [
        ("pickled through pipes (ProcessPoolExecutor)", pickled_s),
        ("shmalloc, copy=True", copied_s),
        ("shmalloc, copy=False (zero-copy)", zero_s),
    ]:
        print(f"{label:<46}{seconds:>9.2f}{pickled_s / seconds:>13.1f}x")
    print("\nAll results equal (pandas.testing.assert_frame_equal, check_exact=True).")
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{os.getpid()}_")]
    print(f"Segments left in /dev/shm by this demo: {len(leftovers)}")
    return 0

