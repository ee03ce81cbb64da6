"""A worker's arena (a Pool's or an executor's): results computed in the worker are shipped where they lie (no
copy), and nothing the worker does afterwards, nor a fork it makes, ever reaches them. Across real worker
processes."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shmalloc
from shmalloc.parallel import _arena, _spares, _workers

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
ROWS = 200_000  # 1.6 MB a float64 column: above the arena's threshold
BIG = 1 << 21  # 16 MB of float64


# Module-level functions: spawn and forkserver workers import them.


def computed(i: int) -> pd.DataFrame:
    """A new frame of every kind the codec handles, computed in the worker."""
    rows = np.arange(ROWS)
    x = rows * (i + 1.5)
    return pd.DataFrame(
        {
            "x": x,
            "x2": x * 2,  # a second float column: one 2-column block, its second row not on a page boundary
            "flag": rows % 3 == i % 3,
            "n": (rows + i).astype(np.int32),
            "category": pd.Categorical(np.array(["red", "green", "blue"])[(rows + i) % 3]),
            "when": pd.date_range("2024-01-01", periods=ROWS, freq="s") + pd.Timedelta(days=i),
            "text": np.array([f"t{i}", "u", "v"], dtype=object)[rows % 3],
        }
    )


def arena_counts(_: int) -> tuple[int, dict[str, int]]:
    """This worker's pid and what its arenas did."""
    time.sleep(0.05)  # so that both workers take items
    return os.getpid(), dict(_arena.counts)


def total_counts(pool: shmalloc.Pool) -> Counter:
    """What the pool's workers' arenas did, summed over the workers."""
    by_pid = dict(pool.map(arena_counts, range(8), chunksize=1))
    total: Counter = Counter()
    for counts in by_pid.values():
        total.update(counts)
    return total


_kept: list[np.ndarray] = []  # in a worker: arrays a task kept


def kept_and_returned(i: int) -> np.ndarray:
    """Returns a new array and keeps it, to write into it in a later task."""
    array = np.full(BIG, float(i))
    _kept.append(array)
    return array


def write_into_kept(_: int) -> list[float]:
    """Write into every array this worker kept; return the smallest value each held before."""
    seen = [float(a.min()) for a in _kept]
    for a in _kept:
        a[:] = -2.0
    return seen


def forks_then_writes(item: tuple[int, str]) -> np.ndarray:
    """Forks while its result is in the arena; the child writes into its copy later (and leaves a file
    saying it lived through it), the worker right away."""
    i, done = item
    array = np.full(BIG, float(i))
    if os.fork() == 0:
        try:
            time.sleep(0.3)  # the worker has answered by then
            array[:] = -7.0
            with open(done + ".part", "w") as file:
                file.write(str(float(array.sum())))
            os.rename(done + ".part", done)  # the test sees the file only once it is written
        finally:
            os._exit(0)
    array[:10] = 5.0
    return array


def fails_on_odd(i: int) -> np.ndarray:
    """Allocates in the arena, then fails for odd items (the traceback holds the array)."""
    array = np.full(BIG, float(i))
    if i % 2:
        raise ValueError(f"item {i} fails")
    return array


def dies_while_computing(i: int) -> np.ndarray:
    """Fills an array in the arena; item 1 kills its worker before returning it."""
    array = np.full(BIG, float(i))
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return array


def filled(value: float) -> np.ndarray:
    return np.full(BIG, value)


def _warm(pool: shmalloc.Pool, func, items: list, copy: bool, rounds: int = 4) -> None:
    """Calls that leave spares their tasks' arenas fit in (the workers grow them as their tasks need)."""
    for _ in range(rounds):
        got = pool.map(func, items, copy=copy)
        del got
        gc.collect()


@pytest.mark.parametrize(
    ("method", "copy"), [(m, False) for m in START_METHODS] + [("fork", True)], ids=lambda v: str(v).lower()
)
def test_frames_computed_in_the_arena_come_back_equal(method, copy):
    """Frames of every kind computed in a worker come back equal, call after call, and most of them where they lay."""
    expected = [computed(i) for i in range(4)]
    with shmalloc.Pool(2, start_method=method) as pool:
        for _ in range(4):
            got = pool.map(computed, range(4), copy=copy)
            for frame, wanted in zip(got, expected, strict=True):  # equals: assert_frame_equal takes a second here
                assert frame.dtypes.equals(wanted.dtypes) and frame.index.equals(wanted.index) and frame.equals(wanted)
            del got, frame
            gc.collect()
        counts = total_counts(pool)
    assert counts["in place"] >= 4, counts  # the later calls' results were shipped where they were computed
    assert counts["grown"] >= 1  # the spares grew to what the tasks wanted


MEDIUM = 50_000  # 400 KB a float64 array: above the arena's threshold, the size of a common medium result


def medium(value: float) -> np.ndarray:
    """A new array of MEDIUM elements."""
    return np.full(MEDIUM, value)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_many_medium_results_are_computed_in_their_spares_whatever_their_number(method):
    """A call of many more medium results than a worker keeps mappings of spares: each is computed in the
    spare its task was given and shipped where it lies, not only those of the spares the worker mapped first;
    every result comes back right while the next calls reuse the objects."""
    assert MEDIUM * 8 >= _arena.THRESHOLD
    items = [float(i) for i in range(4 * _workers.WORKER_MAPPINGS)]
    with shmalloc.Pool(1, start_method=method) as pool:
        _warm(pool, medium, items, copy=False, rounds=3)
        before = total_counts(pool)["in place"]
        kept = pool.map(medium, items, copy=False)
        placed = total_counts(pool)["in place"] - before
        again = pool.map(medium, [-v for v in items], copy=False)
        assert all((a == v).all() for a, v in zip(kept, items, strict=True))
        assert all((a == -v).all() for a, v in zip(again, items, strict=True))
    assert placed >= len(items) // 2, placed  # with only the first mappings kept: at most WORKER_MAPPINGS


def small_of_large_temporaries(value: float) -> np.ndarray:
    """A medium result (400 KB) computed from temporaries of 32 MB."""
    temporary = np.full(4 * BIG // 2, value)
    return temporary[:MEDIUM] + temporary[MEDIUM : 2 * MEDIUM]


def test_a_spare_does_not_grow_for_temporaries_much_larger_than_its_result():
    """A copy=False result keeps its spare whole: a small result computed from large temporaries does not
    grow its spare to hold them (they come from the heap), only to hold the result itself, and comes back
    right."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        for _ in range(5):  # each call's results freed before the next: its spares serve the next
            got = pool.map(small_of_large_temporaries, [1.0, 2.0], copy=False)
            assert (got[0] == 2.0).all() and (got[1] == 4.0).all()
            del got
            gc.collect()
        counts = total_counts(pool)
        held = shmalloc.held_objects()
        spares = int(held[held["pid"] == os.getpid()]["size"].sum())
    assert counts["in place"] >= 2, counts  # results computed where they are shipped
    assert spares < 2 * _spares.OVERSIZE * (1 << 20), spares  # a spare within twice its 0.5 MB result, not 32 MB


@pytest.mark.parametrize("method", START_METHODS)
def test_what_a_worker_writes_into_an_array_it_returned_and_kept_never_reaches_the_result(method):
    """The worker keeps the array it returned (in place) and writes into it later: the parent's result stays."""
    with shmalloc.Pool(1, start_method=method) as pool:
        _warm(pool, filled, [1.0] * 2, copy=False)
        results = pool.map(kept_and_returned, range(2), copy=False)
        results[0][:5] = -1.0  # the parent's write
        assert all(min(seen) >= 0 for seen in pool.map(write_into_kept, range(1)))  # never the parent's -1
        for _ in range(2):  # the objects of other results are reused meanwhile
            again = pool.map(filled, [3.0] * 2, copy=False)
            assert all((a == 3.0).all() for a in again)
            del again
            gc.collect()
        assert (results[0][:5] == -1).all() and (results[0][5:] == 0).all()
        assert (results[1] == 1.0).all()
        counts = total_counts(pool)
    assert counts["in place"] >= 1 and counts["frozen"] >= 1  # shipped where they lay, and the kept ones frozen


@pytest.mark.parametrize("method", START_METHODS)
def test_a_fork_in_the_task_keeps_its_childs_writes_and_the_workers_out_of_the_result(method, tmp_path):
    """A task that forks while its result is in the arena: the result is what the worker returned; the child's
    later writes into its copy reach neither the result nor the next results, and the child lives on (its
    copy is not taken from it when the parent frees or reuses the object's pages)."""
    done = [str(tmp_path / f"child-{i}") for i in range(2)]
    with shmalloc.Pool(1, start_method=method) as pool:
        _warm(pool, filled, [1.0] * 2, copy=False)
        results = pool.map(forks_then_writes, list(zip(range(2), done, strict=True)), copy=False)
        deadline = time.monotonic() + 10
        while not all(os.path.exists(path) for path in done) and time.monotonic() < deadline:
            time.sleep(0.05)
        wrote = [Path(path).read_text() if os.path.exists(path) else "died" for path in done]
        assert wrote == [str(-7.0 * BIG)] * 2  # both children wrote, and lived
        for i, a in enumerate(results):
            assert (a[:10] == 5.0).all() and (a[10:] == i).all()
        again = pool.map(filled, [4.0] * 2, copy=False)
        assert all((a == 4.0).all() for a in again)
        for i, a in enumerate(results):
            assert (a[:10] == 5.0).all() and (a[10:] == i).all()


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_task_that_fails_after_allocating_leaves_the_arena_usable(method):
    """Errors of tasks whose arrays are in the arena come back as values; the next results are right."""
    with shmalloc.Pool(2, start_method=method) as pool:
        _warm(pool, filled, [1.0] * 4, copy=False)
        with pytest.warns(shmalloc.FailedItemsWarning, match="3 of 6 items failed"):
            got = pool.map(fails_on_odd, range(6), copy=False, errors="return")
        for i, value in enumerate(got):
            if i % 2:
                assert isinstance(value, ValueError) and f"item {i}" in str(value)
            else:
                assert (value == i).all()
        del got, value
        gc.collect()
        for _ in range(2):
            again = pool.map(filled, [float(k) for k in range(4)], copy=False)
            for k, a in enumerate(again):
                assert (a == k).all()
            del again, a
            gc.collect()


def test_small_arrays_and_other_threads_allocate_on_the_heap():
    """Only large arrays of the task's own thread come from the arena: the rest behaves as without it."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        _warm(pool, filled, [1.0], copy=False)
        got = pool.map(_small_and_threaded, range(3), copy=False)
        for i, (small, threaded) in enumerate(got):
            assert (small == i).all() and (threaded == i).all()


def _small_and_threaded(i: int) -> tuple[np.ndarray, np.ndarray]:
    import threading

    out: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: out.append(np.full(BIG, float(i))))
    thread.start()
    thread.join()
    return np.full(1000, float(i)), out[0]


@pytest.mark.parametrize("method", START_METHODS)
def test_executor_tasks_compute_in_their_spares_and_what_workers_keep_stays_theirs(method):
    """shmalloc.ProcessPoolExecutor (and so the joblib backend): frames computed in the tasks' spares come back
    equal; an array a task returned and kept in its worker is the worker's own afterwards (its writes never reach
    the result, nor the parent's writes it)."""
    expected = [computed(i) for i in range(4)]
    with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context(method), copy=False) as pool:
        for _ in range(4):  # spares, then spares the tasks' arenas fit in
            got = list(pool.map(computed, range(4)))
            for frame, wanted in zip(got, expected, strict=True):
                assert frame.dtypes.equals(wanted.dtypes) and frame.equals(wanted)
            del got, frame
            gc.collect()
            time.sleep(0.15)  # a new burst: results alive at its start would be shrunk
        results = list(pool.map(kept_and_returned, range(2)))
        results[0][:5] = -1.0  # the parent's write
        seen = [v for worker_seen in pool.map(write_into_kept, range(4)) for v in worker_seen]
        assert seen and -1.0 not in seen  # never the parent's write
        assert (results[0][:5] == -1.0).all() and (results[0][5:] == 0.0).all() and (results[1] == 1.0).all()
        counts: Counter = Counter()
        for counted in dict(pool.map(arena_counts, range(8))).values():
            counts.update(counted)
    assert counts["in place"] >= 4, counts  # results shipped where the tasks made them


@pytest.mark.parametrize("method", START_METHODS)
def test_a_worker_killed_while_its_task_computes_in_the_arena_leaves_every_result_right(method):
    """A worker killed while its task computes in its spare: that item is a WorkerDiedError, the others and the
    results alive meanwhile (made in place) stay right, and the spares serve the next calls with the right data."""
    with shmalloc.Pool(2, start_method=method) as pool:
        _warm(pool, filled, [1.0] * 4, copy=False)
        alive = pool.map(filled, [2.0] * 2, copy=False)
        with pytest.warns(shmalloc.FailedItemsWarning):
            got = pool.map(dies_while_computing, range(4), copy=False, errors="return")
        assert isinstance(got[1], shmalloc.WorkerDiedError)
        assert all((got[i] == i).all() for i in (0, 2, 3))
        for _ in range(3):
            again = pool.map(filled, [float(k) for k in range(4)], copy=False)
            assert all((a == k).all() for k, a in enumerate(again))
            del again
            gc.collect()
        assert all((a == 2.0).all() for a in alive)
        counts = total_counts(pool)
    assert counts["in place"] >= 4, counts
