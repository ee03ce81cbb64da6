"""What users of mclapply, multiprocessing and joblib expect of map and Pool: functions by value,
processes=-1, an initializer, the default start method.

Each runs across real process boundaries under every start method.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np
import pytest

import shmalloc
from shmalloc.parallel._options import resolve_processes

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


def _set_environment(key: str, value: str) -> None:
    os.environ[key] = value


def _fail_to_start() -> None:
    raise ValueError("the initializer refuses")


def _pid(_: object) -> int:
    return os.getpid()


@pytest.mark.parametrize("method", START_METHODS)
def test_map_and_pool_take_lambdas_and_closures_under_every_start_method(method):
    """func travels by value: a closure over a local array gives the same results as a loop, in map and in Pool.map."""
    offset = np.arange(30_000)
    expected = [offset * i for i in range(5)]
    got = shmalloc.map(lambda i: offset * i, range(5), processes=2, start_method=method)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    with shmalloc.Pool(2, start_method=method) as pool:
        got = pool.map(lambda i: offset * i, range(5))
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert pool.map(lambda i: -i, range(3)) == [0, -1, -2]  # a second function to the same workers


def test_pool_refuses_a_func_that_cannot_be_pickled_before_starting_work():
    """A func holding a lock cannot travel even by value: TypeError naming func, and the pool still serves the next call."""
    import threading

    lock = threading.Lock()
    with shmalloc.Pool(1) as pool:
        with pytest.raises(TypeError, match="func must be picklable to its workers"):
            pool.map(lambda i: lock.locked() or i, range(3))
        assert pool.map(abs, [-1, -2]) == [1, 2]


def test_negative_processes_count_back_from_the_usable_cpus():
    """-1 is every usable CPU, -2 all but one (at least one), as in joblib; 0 and non-ints are refused."""
    cpus = len(os.sched_getaffinity(0))
    assert resolve_processes(-1) == cpus
    assert resolve_processes(-2) == max(1, cpus - 1)
    assert resolve_processes(-10_000) == 1
    assert resolve_processes(3) == 3
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="processes must be"):
            resolve_processes(bad)
    with pytest.raises(ValueError, match="processes must be"):
        shmalloc.map(abs, [1], processes=0)
    with pytest.raises(ValueError, match="processes must be"):
        shmalloc.Pool(0)


def test_processes_minus_one_runs_one_worker_per_cpu():
    """A Pool(-1) runs as many distinct workers as there are usable CPUs."""
    cpus = len(os.sched_getaffinity(0))
    with shmalloc.Pool(-1) as pool:
        pids = set(pool.map(_pid, range(50 * cpus), chunksize=1))
    assert 1 <= len(pids) <= cpus
    assert os.getpid() not in pids


@pytest.mark.parametrize("method", START_METHODS)
def test_initializer_runs_in_every_worker_before_its_items(method):
    """initializer(*initargs) runs in each worker first; a lambda initializer works under every start method."""
    key = "SHMALLOC_TEST_INITIALIZED"
    assert key not in os.environ
    with shmalloc.Pool(2, start_method=method, initializer=lambda v: _set_environment(key, v), initargs=("yes",)) as pool:
        assert pool.map(lambda _: os.environ.get(key), range(6), chunksize=1) == ["yes"] * 6
    assert key not in os.environ  # it ran in the workers only


@pytest.mark.parametrize("method", START_METHODS)
def test_a_failing_initializer_raises_its_error_in_map_instead_of_restarting_workers(method):
    """An initializer that raises: map raises that exception, with a note naming the initializer, every time it is called."""
    with shmalloc.Pool(2, start_method=method, initializer=_fail_to_start) as pool:
        for _ in range(2):
            with pytest.raises(ValueError, match="the initializer refuses") as info:
                pool.map(abs, range(4))
            assert any("raised by the initializer of worker" in note for note in info.value.__notes__)


def test_initializer_arguments_are_checked():
    """A non-callable initializer or non-tuple initargs is refused when the pool is made."""
    with pytest.raises(TypeError, match="initializer must be callable"):
        shmalloc.Pool(1, initializer=3)
    with pytest.raises(TypeError, match="initargs must be a tuple"):
        shmalloc.Pool(1, initializer=print, initargs=[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the default is fork on Linux only")
def test_default_start_method_is_fork_on_linux_whatever_the_platform_default():
    """map and Pool fork by default on Linux (also where Python's default became forkserver): workers inherit module state."""
    key = "SHMALLOC_TEST_INHERITED"
    os.environ[key] = "inherited"
    try:
        with shmalloc.Pool(1) as pool:
            os.environ.pop(key)  # after the fork: the worker kept its copy
            assert pool.map(lambda _: os.environ.get(key), [0]) == ["inherited"]
    finally:
        os.environ.pop(key, None)
