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
from engines import wait_for_no_workers, wait_until

import shmalloc
from shmalloc.parallel._executor import BURST_GAP


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
        assert future.shm_bytes >= 50_000 * 8  # it came through shared memory
        small = pool.submit(big_or_small, 4)
        assert small.result() == 4 and small.shm_bytes == 0  # through the pipe


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


def full(i: int) -> np.ndarray:
    return np.full(1 << 20, i, dtype=np.float64)  # 8 MB: shared memory, not the pipe


def test_a_dropped_result_is_freed_without_the_garbage_collector():
    """Once the caller drops a future and its result, the result is freed by reference counting: nothing of
    the executor keeps it in a reference cycle (a copy=False result's spare comes back at once too)."""
    import gc
    import weakref

    with shmalloc.ProcessPoolExecutor(1, copy=False) as pool:
        gc.disable()
        try:
            future = pool.submit(full, 1)
            result = future.result()
            freed = weakref.ref(result)
            del future, result
            wait_until(lambda: freed() is None, "the result stayed alive")
            wait_until(lambda: len(pool._spares.free) == 1, "its spare did not come back")
        finally:
            gc.enable()


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_large_results_are_written_into_the_objects_of_consumed_ones(start_method):
    """A consumed result's object becomes a spare, and the next large result is written into it (its pages
    are warm) by whichever worker runs the task: the same object each time, every result right."""
    import multiprocessing

    with shmalloc.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(start_method)) as pool:
        np.testing.assert_array_equal(pool.submit(full, 1).result(), full(1))
        assert len(pool._spares.free) == 1
        sid = pool._spares.free[0].sid  # the same spare holds its descriptor, so the same object, throughout
        for i in range(2, 6):
            np.testing.assert_array_equal(pool.submit(full, i).result(), full(i))
            assert [spare.sid for spare in pool._spares.free] == [sid]
        assert pool.submit(abs, -3).result() == 3  # a small result leaves the spare as it was
        assert [spare.sid for spare in pool._spares.free] == [sid]
    assert pool._spares.closed and not pool._spares.free


def test_a_zero_copy_result_keeps_its_object_until_its_arrays_are_freed():
    """copy=False: a result's arrays map its object, which no later result is written into while they live;
    once they are freed it becomes a spare again."""
    import gc

    with shmalloc.ProcessPoolExecutor(1, copy=False) as pool:
        first = pool.submit(full, 1).result()
        assert len(pool._spares.lent) == 1 and not pool._spares.free
        others = [pool.submit(full, i).result() for i in range(2, 5)]
        np.testing.assert_array_equal(first, full(1))
        for i, other in enumerate(others, start=2):
            np.testing.assert_array_equal(other, full(i))
        first[:] = -1  # private: no later result sees it
        lent = len(pool._spares.lent)
        del first, others, other
        gc.collect()
        wait_until(lambda: not pool._spares.lent and pool._spares.free, "freed results' objects did not come back")
        assert lent == 4
        np.testing.assert_array_equal(pool.submit(full, 7).result(), full(7))


def test_a_worker_that_cannot_open_the_spare_writes_under_the_name(monkeypatch, tmp_path):
    """Where /proc/<parent>/fd cannot be opened (hidden /proc), a large result goes under the task's name,
    right, and nothing is left under a name."""
    import multiprocessing

    from shmalloc.parallel import _executor

    refused = tmp_path / "refused"

    def cannot_open(spare: tuple[str, int, int] | None) -> int:
        if spare is not None:
            with open(refused, "a") as log:
                log.write(spare[0] + "\n")
        return -1

    monkeypatch.setattr(_executor, "_open_spare", cannot_open)  # the forked workers inherit it
    with shmalloc.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        for i in range(3):
            np.testing.assert_array_equal(pool.submit(full, i).result(), full(i))
        assert not pool._names
    # The tasks after the first were given a spare (the first result's object, then others): all refused.
    assert len(refused.read_text().splitlines()) == 2


def test_the_spare_of_a_task_whose_worker_died_is_never_reused():
    """A spare handed to a task whose worker was killed (a broken pool) is released, not kept: a worker
    of the broken pool might still write into it."""
    with shmalloc.ProcessPoolExecutor(1) as pool:
        pool.submit(full, 1).result()
        (spare,) = pool._spares.free
        with pytest.raises(BrokenProcessPool):
            pool.submit(die_on_zero, 0).result()
        wait_until(lambda: not pool._spares.handed, "the dead task's spare was not given up")
        assert spare not in pool._spares.free and not pool._spares.free


def test_spare_limit_zero_keeps_no_spare_and_a_bad_one_is_refused():
    """spare_limit=0: every large result gets a new object; a spare_limit that is no share or byte count is refused."""
    with shmalloc.ProcessPoolExecutor(1, spare_limit=0) as pool:
        for i in range(3):
            np.testing.assert_array_equal(pool.submit(full, i).result(), full(i))
            assert not pool._spares.free
    with pytest.raises(ValueError, match="spare_limit"):
        shmalloc.ProcessPoolExecutor(spare_limit=1.5)
    with pytest.raises(TypeError, match="spare_limit"):
        shmalloc.ProcessPoolExecutor(spare_limit="all")


def full_after(value: float, delay: float) -> np.ndarray:
    time.sleep(delay)
    return np.full(1 << 20, value)


def test_a_task_queued_by_a_submit_that_raised_never_shares_its_spare(monkeypatch):
    """The standard pool's submit can raise after queueing the task (a worker or its manager thread failing to
    start); the task still runs. Its spare is released at once, never reused, so the next task's copy=False
    result is not overwritten; the queued task's result goes under its name, swept at shutdown."""
    import gc

    pool = shmalloc.ProcessPoolExecutor(2, copy=False)
    pool.submit(full, 0).result()  # dropped at once: its object becomes the one spare
    gc.collect()
    wait_until(lambda: len(pool._spares.free) == 1, "no spare")
    start_manager = pool._pool._start_executor_manager_thread
    calls = []

    def start_then_fail() -> None:
        start_manager()
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files (after the task was queued)")

    monkeypatch.setattr(pool._pool, "_start_executor_manager_thread", start_then_fail)
    with pytest.raises(OSError, match="after the task was queued"):
        pool.submit(full_after, 1.0, 0.5)  # still runs: writes 1.0 half a second later
    assert not pool._spares.free and not pool._spares.handed
    later = pool.submit(full_after, 2.0, 0.0).result()
    time.sleep(1.0)  # the first task has written its result by now
    np.testing.assert_array_equal(later, np.full(1 << 20, 2.0))
    del later
    pool.shutdown(wait=True)
    assert not pool._spares.handed and not pool._spares.free


def test_a_worker_opens_only_the_spare_it_was_told_of(tmp_path):
    """The worker checks the object it opened through /proc: the same device and inode as the parent's spare,
    unlinked. Another file under that descriptor number (the spare closed meanwhile) is not written."""
    from shmalloc.parallel import _executor

    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)  # an unlinked object, as a spare is
    other = os.open(tmp_path / "a-file", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        st = os.fstat(fd)
        here = f"/proc/{os.getpid()}/fd/{fd}"
        opened = _executor._open_spare((here, st.st_dev, st.st_ino))
        assert opened >= 0 and os.fstat(opened).st_ino == st.st_ino
        os.close(opened)
        assert _executor._open_spare((here, st.st_dev, st.st_ino + 1)) == -1  # another object
        linked = os.fstat(other)
        assert _executor._open_spare((f"/proc/{os.getpid()}/fd/{other}", linked.st_dev, linked.st_ino)) == -1  # linked
        assert _executor._open_spare((f"/proc/{os.getpid()}/fd/999999", st.st_dev, st.st_ino)) == -1  # closed
        assert _executor._open_spare(None) == -1
    finally:
        os.close(fd)
        os.close(other)


def test_a_small_zero_copy_result_does_not_keep_a_large_spare_past_its_burst():
    """copy=False: a result written into a spare several times its size keeps the spare's pages while its burst of
    tasks and the next last; still alive when the burst after begins, it has the pages past it freed."""
    import gc
    import time

    from shmalloc.parallel import _executor

    with shmalloc.ProcessPoolExecutor(1, copy=False) as pool:
        pool.submit(full, 0).result()  # 8 MB, dropped: the spare
        gc.collect()
        wait_until(lambda: len(pool._spares.free) == 1, "no spare")
        small = pool.submit(np.full, 100_000, 3.0).result()  # 800 KB: shared memory, into the spare
        np.testing.assert_array_equal(small, np.full(100_000, 3.0))
        (lent,) = pool._spares.lent
        assert os.fstat(lent.fd).st_blocks * 512 >= 8 << 20  # a next task of the burst may want them
        time.sleep(2 * _executor.BURST_GAP)
        assert pool.submit(abs, -1).result() == 1  # a new burst: the result may still be dropped in it
        assert os.fstat(lent.fd).st_blocks * 512 >= 8 << 20
        time.sleep(2 * _executor.BURST_GAP)
        assert pool.submit(abs, -2).result() == 2  # the second since: the result is kept for long
        assert os.fstat(lent.fd).st_blocks * 512 < 1 << 20  # its pages past the result are freed
        np.testing.assert_array_equal(small, np.full(100_000, 3.0))


def _burst(pool: shmalloc.ProcessPoolExecutor, values: range) -> None:
    """A task per value, two at a time, every result kept until all are in (as a joblib call does with its default
    pre_dispatch); check them, drop them, and wait until their objects are spares again."""
    import gc

    results, pending, todo = [], [], list(values)
    while todo or pending:
        while todo and len(pending) < 2:
            pending.append(pool.submit(full, todo.pop(0)))
        results.append(pending.pop(0).result())
    for i, result in zip(values, results, strict=True):
        np.testing.assert_array_equal(result, full(i))
    del results, result
    gc.collect()
    wait_until(lambda: not pool._spares.lent and not pool._spares.handed, "the burst's objects did not come back")
    time.sleep(2 * BURST_GAP)  # idle: the next task starts a new burst


def test_the_next_burst_finds_an_object_for_each_result_of_the_last_one():
    """Six zero-copy results alive at once, then dropped: all six objects stay spares, and the next burst of six
    writes into them (no new object). Once the last two bursts were small, the spares shrink to about the last
    two results."""
    with shmalloc.ProcessPoolExecutor(1, copy=False) as pool:
        _burst(pool, range(6))
        first = {spare.sid for spare in pool._spares.free}
        assert len(first) == 6  # more than the last 2 * max_workers results would keep
        _burst(pool, range(6, 12))
        assert {spare.sid for spare in pool._spares.free} == first
        for i in range(12, 14):  # the bursts of six are among the last two: all stay
            _burst(pool, range(i, i + 1))
            assert len(pool._spares.free) == 6
        _burst(pool, range(14, 15))
        assert len(pool._spares.free) == 2  # 1.25 times the last two results


def test_shutdown_cancelling_futures_ends_every_one():
    """shutdown(cancel_futures=True): the futures of tasks the pool never started end cancelled (on Python 3.11
    they stayed pending, their own cancel() refused because their task was done), the others with their result."""
    pool = shmalloc.ProcessPoolExecutor(1)
    futures = [pool.submit(slow_big, i) for i in range(10)]
    time.sleep(0.1)
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(future.done() for future in futures)
    assert any(future.cancelled() for future in futures)
    for i, future in enumerate(futures):
        if not future.cancelled():
            np.testing.assert_array_equal(future.result(), np.full(50_000, i))


@pytest.mark.parametrize("warm", [False, True], ids=["new object", "spare"])
def test_a_result_that_arrives_after_shutdown_without_waiting_is_right(warm):
    """copy=False: a task still running when shutdown(wait=False) returns delivers its result, and the object it
    maps is released without a page of it freed under the result."""
    import threading

    from shmalloc import _releaser

    threads_before = set(threading.enumerate())
    pool = shmalloc.ProcessPoolExecutor(1, copy=False)
    if warm:  # the late task gets a spare, and computes in it
        for _ in range(3):
            assert (pool.submit(full_after, 1.0, 0.0).result() == 1.0).all()
    future = pool.submit(full_after, 7.0, 0.5)
    pool.shutdown(wait=False)
    result = future.result()
    _releaser.wait_for_releases()
    assert (result == 7.0).all()
    # The standard pool's threads, not joined by shutdown(wait=False), end on their own: a fork of the next
    # test must find this process without them (shmalloc's releaser thread stops before every fork).
    wait_until(
        lambda: all(t.name == "shmalloc-release" for t in set(threading.enumerate()) - threads_before),
        "the pool's threads did not end",
    )
    wait_for_no_workers()
