"""shmalloc.ProcessPoolExecutor's own behaviour: cancelled and uncollected tasks, results consumed at once, the Executor interface.

What the executor shares with map and Pool is in test_contract.py."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from engines import wait_for_no_workers

import shmalloc


def big_or_small(i: int):
    return np.full(50_000, i) if i % 2 else i


def slow_big(i: int) -> np.ndarray:
    time.sleep(0.2)
    return np.full(50_000, i)


def die_on_zero(i: int, gate: str | None = None) -> int:
    """Item 0 kills its worker: once the file ``gate`` exists, if given (all tasks submitted by then)."""
    if i == 0:
        deadline = time.monotonic() + 60
        while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return i


def test_cancelling_tasks_of_a_breaking_pool_leaves_no_worker(tmp_path):
    """Cancelling the other futures when the first one fails with BrokenProcessPool (what Executor.map
    does, from another thread; here from the failing future's callback, while the pool is failing its
    pending tasks) cancels them, and the pool's other worker still ends."""
    pool = shmalloc.ProcessPoolExecutor(2)
    gate = str(tmp_path / "all-submitted")  # item 0 dies only then: a broken pool refuses further submits
    futures = [pool.submit(die_on_zero, i, gate) for i in range(12)]

    def cancel_the_rest(done: cf.Future) -> None:
        if isinstance(done.exception(), BrokenProcessPool):
            for future in futures:
                future.cancel()

    for future in futures:
        future.add_done_callback(cancel_the_rest)
    open(gate, "w").close()
    cf.wait(futures, timeout=60)
    pool.shutdown(wait=True)
    assert all(future.done() for future in futures)
    assert any(future.cancelled() for future in futures)
    with pytest.raises(BrokenProcessPool):
        futures[0].result()
    left = wait_for_no_workers()
    for worker in left:
        worker.kill()  # so that a failure does not hang the run at exit, joining it
    assert not left


def test_uncollected_and_cancelled_results_leave_nothing():
    """Results nobody asks for, and cancelled tasks, leave no segment once the pool is shut down."""
    pool = shmalloc.ProcessPoolExecutor(1)
    futures = [pool.submit(slow_big, i) for i in range(6)]
    cancelled = [f.cancel() for f in futures[3:]]
    pool.shutdown(wait=True)
    assert any(cancelled)
    for future, was_cancelled in zip(futures[3:], cancelled, strict=True):
        assert future.cancelled() == was_cancelled
    assert all(f.done() for f in futures)


def test_a_task_cancelled_before_its_pool_breaks_leaves_no_worker(tmp_path):
    """A task cancelled while queued, then a worker that dies: every future ends (Python 3.11's pool would
    lose its manager thread to the cancelled task, and the rest would wait for ever)."""
    pool = shmalloc.ProcessPoolExecutor(1)
    gate = str(tmp_path / "cancelled")
    futures = [pool.submit(die_on_zero, i, gate) for i in range(6)]
    assert futures[4].cancel()
    open(gate, "w").close()
    cf.wait(futures, timeout=60)
    pool.shutdown(wait=True)
    left = wait_for_no_workers()
    for worker in left:
        worker.kill()
    assert not left
    assert all(future.done() for future in futures) and futures[4].cancelled()
    with pytest.raises(BrokenProcessPool):
        futures[0].result()


_CANCEL_IN_CALLBACK_SCRIPT = textwrap.dedent(
    """
    import concurrent.futures as cf, time
    import shmalloc

    if __name__ == "__main__":
        with shmalloc.ProcessPoolExecutor(1) as pool:
            futures = [pool.submit(time.sleep, 0.2) for _ in range(6)]

            def cancel_all(done):  # "the first one wins": cancel every other, this one included
                for future in futures:
                    future.cancel()

            for future in futures:
                future.add_done_callback(cancel_all)
            done, not_done = cf.wait(futures, timeout=30)
            assert not not_done, len(not_done)
        print("done")
    """
)


def test_a_done_callback_may_cancel_its_own_future(tmp_path):
    """A done callback that cancels every future, its own included, neither deadlocks nor keeps cf.wait or
    shutdown waiting (run in a child, so that a deadlock fails the test instead of hanging the run)."""
    script = tmp_path / "cancel_in_callback.py"
    script.write_text(_CANCEL_IN_CALLBACK_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]


def test_cancelled_futures_are_done_for_wait_and_as_completed():
    """A cancelled future counts as done for cf.wait and cf.as_completed, as the standard executor's do."""
    with shmalloc.ProcessPoolExecutor(1) as pool:
        futures = [pool.submit(slow_big, i) for i in range(6)]
        cancelled = [future for future in futures[3:] if future.cancel()]
        assert cancelled
        done, not_done = cf.wait(cancelled, timeout=10)
        assert done == set(cancelled) and not not_done
        assert set(cf.as_completed(cancelled, timeout=10)) == set(cancelled)


def test_map_in_chunks_returns_every_result_in_order():
    """map(chunksize=k) runs k calls per task, as the standard executor does; large chunks travel through
    shared memory, results stay in order, a bad chunksize is a ValueError."""
    with shmalloc.ProcessPoolExecutor(2, copy=False) as pool:
        got = list(pool.map(np.full, [10, 100_000, 3, 50_000, 7], [1, 2, 3, 4, 5], chunksize=2))
        assert [a.shape for a in got] == [(10,), (100_000,), (3,), (50_000,), (7,)]
        assert [int(a[-1]) for a in got] == [1, 2, 3, 4, 5]
        assert list(pool.map(abs, range(-7, 0), chunksize=3)) == [7, 6, 5, 4, 3, 2, 1]
        assert list(pool.map(abs, [], chunksize=3)) == []
        with pytest.raises(ValueError):
            pool.map(abs, [1], chunksize=0)


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
