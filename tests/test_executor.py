"""shmalloc.ProcessPoolExecutor: the concurrent.futures interface with results through shared memory."""
from __future__ import annotations

import concurrent.futures as cf
import errno
import multiprocessing as mp
import os
import signal
import time
import warnings
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pandas as pd
import pytest

import shmalloc
import shmalloc.parallel._protocol as protocol_module
from numpy._core.multiarray import get_handler_name

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


def make_frame(n: int, shift: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {"x": np.arange(n, dtype=np.float64) + shift, "y": np.arange(n) % 2 == 0, "z": np.arange(n, dtype=np.int32)}
    )


def big_or_small(i: int):
    return np.full(50_000, i) if i % 2 else i


def fail(message: str) -> None:
    raise KeyError(message)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def slow_big(i: int) -> np.ndarray:
    time.sleep(0.2)
    return np.full(50_000, i)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", START_METHODS)
def test_submit_and_map_return_frames_and_arrays(method, copy):
    """Frames and arrays come back equal through submit and map, with every start method and copy mode."""
    with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context(method), copy=copy) as pool:
        frames = [pool.submit(make_frame, 20_000, shift=i) for i in range(3)]
        arrays = list(pool.map(big_or_small, range(6)))
        for i, future in enumerate(frames):
            pd.testing.assert_frame_equal(future.result(), make_frame(20_000, i))
    for i, value in enumerate(arrays):
        if i % 2:
            np.testing.assert_array_equal(value, np.full(50_000, i))
            assert (get_handler_name(value) == "default_allocator") == copy
        else:
            assert value == i


def test_exception_keeps_its_type_and_the_pool_goes_on():
    """An exception in a task is raised by its future; other tasks are unaffected."""
    with shmalloc.ProcessPoolExecutor(2) as pool:
        bad = pool.submit(fail, "missing")
        good = pool.submit(big_or_small, 1)
        with pytest.raises(KeyError, match="missing"):
            bad.result()
        np.testing.assert_array_equal(good.result(), np.full(50_000, 1))


def test_killed_worker_breaks_the_pool_without_hanging_or_leaking():
    """A killed worker makes pending futures raise BrokenProcessPool; no segment is left after shutdown."""
    with shmalloc.ProcessPoolExecutor(2) as pool:
        others = [pool.submit(slow_big, i) for i in range(4)]
        doomed = pool.submit(kill_self)
        with pytest.raises(BrokenProcessPool):
            doomed.result(timeout=30)
        for future in others:
            try:
                future.result(timeout=30)
            except BrokenProcessPool:
                pass
    assert not mp.active_children()


def test_uncollected_and_cancelled_results_leave_nothing():
    """Results nobody asks for, and cancelled tasks, leave no segment once the pool is shut down."""
    pool = shmalloc.ProcessPoolExecutor(1)
    futures = [pool.submit(slow_big, i) for i in range(6)]
    cancelled = [f.cancel() for f in futures[3:]]
    pool.shutdown(wait=True)
    assert any(cancelled)
    for future, was_cancelled in zip(futures[3:], cancelled):
        assert future.cancelled() == was_cancelled
    assert all(f.done() for f in futures)


def test_results_are_consumed_even_if_never_asked_for():
    """A finished task's segment is consumed at once, before anybody calls result()."""
    with shmalloc.ProcessPoolExecutor(1) as pool:
        future = pool.submit(big_or_small, 3)
        cf.wait([future])
        deadline = time.monotonic() + 10
        while pool._names and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pool._names
        np.testing.assert_array_equal(future.result(), np.full(50_000, 3))


def test_enospc_falls_back_to_the_pipe_with_one_warning(monkeypatch):
    """ENOSPC in a worker: results come through the pipe, right, with one warning for the pool."""

    def full(x, name=None, **kwargs):
        raise shmalloc.ShmError(errno.ENOSPC, None, name)

    monkeypatch.setattr(protocol_module, "copy2shm", full)  # forked workers inherit it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
            got = list(pool.map(big_or_small, range(6)))
    for i in range(1, 6, 2):
        np.testing.assert_array_equal(got[i], np.full(50_000, i))
    assert sum(issubclass(w.category, shmalloc.ShmFallbackWarning) for w in caught) == 1


def test_bad_arguments():
    """Bad arguments give clear exceptions."""
    with pytest.raises(TypeError):
        shmalloc.ProcessPoolExecutor(copy=1)
    with pytest.raises(ValueError):
        shmalloc.ProcessPoolExecutor(pipe_limit=-1)
    with pytest.raises(ValueError):
        shmalloc.ProcessPoolExecutor(0)


def test_is_a_concurrent_futures_executor():
    """It can be used wherever a concurrent.futures.Executor is expected."""
    with shmalloc.ProcessPoolExecutor(1) as pool:
        assert isinstance(pool, cf.Executor)
        done, _ = cf.wait([pool.submit(abs, -1)])
        assert done.pop().result() == 1
