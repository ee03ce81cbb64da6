"""One Pool or executor used from several threads: right results, never a broken pool."""
from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmalloc

TWO_METHODS = [m for m in ("fork", "spawn") if m in mp.get_all_start_methods()]


def scaled(arg: tuple[int, int]) -> np.ndarray:
    """A result that goes through shared memory, different for every thread and item."""
    thread, i = arg
    return np.full(20_000, thread * 1000 + i)


def slow_square(i: int) -> int:
    time.sleep(0.05)
    return i * i


def _wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def _run_threads(target, count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:  # collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("method", TWO_METHODS)
def test_threads_hammering_one_pool_get_their_own_results(method):
    """Three threads calling map on one pool each get exactly their own results, and the pool works after."""
    with shmalloc.Pool(2, method) as pool:

        def hammer(thread: int) -> None:
            for round_ in range(4):
                items = [(thread, i) for i in range(round_ * 3, round_ * 3 + 6)]
                got = pool.map(scaled, items, chunksize=1 + round_ % 2)
                for (t, i), value in zip(items, got, strict=True):
                    np.testing.assert_array_equal(value, np.full(20_000, t * 1000 + i))

        errors = _run_threads(hammer, 3)
        assert not errors, errors
        np.testing.assert_array_equal(pool.map(scaled, [(9, 9)])[0], np.full(20_000, 9009))
    assert not mp.active_children()


def test_close_from_another_thread_waits_for_the_running_map():
    """close() called while another thread's map runs lets that map finish with right results, then closes."""
    pool = shmalloc.Pool(2)
    results: list = []
    started = threading.Event()

    def run() -> None:
        started.set()
        results.append(pool.map(slow_square, range(20)))

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    _wait_until(lambda: pool._runner is not None)  # the map holds the pool (the outcome is right either way)
    pool.close()
    thread.join()
    assert results == [[i * i for i in range(20)]] or not results
    with pytest.raises(ValueError, match="closed"):
        pool.map(abs, [1])
    assert not mp.active_children()


def test_terminate_from_another_thread_stops_the_running_map_cleanly():
    """terminate() during another thread's map ends that map with a clear RuntimeError (or its results); the pool is closed, not broken."""
    pool = shmalloc.Pool(2)
    outcome: list = []
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            outcome.append(pool.map(slow_square, range(200)))
        except RuntimeError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    _wait_until(lambda: pool._runner is not None)
    pool.terminate()
    thread.join()
    assert len(outcome) == 1
    if isinstance(outcome[0], BaseException):
        assert "terminate" in str(outcome[0]) and not isinstance(outcome[0], shmalloc.WorkerError)
    else:
        assert outcome[0] == [i * i for i in range(200)]
    with pytest.raises(ValueError, match="closed"):
        pool.map(abs, [1])
    pool.terminate()  # again: harmless
    pool.close()
    assert not mp.active_children()


@pytest.mark.allow_fork_with_threads  # the test's own threads run while workers start
def test_threads_submitting_and_shutting_down_the_executor():
    """Threads submit to one executor while one shuts it down: each accepted task's result is right, the rest refused clearly."""
    pool = shmalloc.ProcessPoolExecutor(2)
    accepted: list = []
    lock = threading.Lock()

    def submit(thread: int) -> None:
        if thread == 3:
            _wait_until(lambda: len(accepted) >= 5)
            pool.shutdown(wait=True)
            return
        for i in range(30):
            try:
                future = pool.submit(scaled, (thread, i))
            except RuntimeError as exc:
                assert "shutdown" in str(exc)
                return
            with lock:
                accepted.append((thread, i, future))

    errors = _run_threads(submit, 4)
    assert not errors, errors
    pool.shutdown(wait=True)
    for thread, i, future in accepted:
        np.testing.assert_array_equal(future.result(timeout=60), np.full(20_000, thread * 1000 + i))
    assert not pool._names


def test_terminate_from_a_signal_handler_during_map_ends_it_cleanly():
    """Pool.terminate() called by a signal handler in the thread running map: map raises RuntimeError, the pool ends closed."""
    pool = shmalloc.Pool(2)
    seen: list = []

    def on_alarm(signum, frame):
        seen.append(pool._runner is not None)
        if seen[-1]:
            with pytest.raises(RuntimeError, match="signal handler"):
                pool.map(abs, [1])  # re-entering would hang on the lock: refused
        pool.terminate()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            pool.map(slow_square, range(400))
        except RuntimeError as exc:
            assert "terminate" in str(exc)
        else:
            pytest.fail("the map ran to its end: the alarm did not interrupt it")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert seen == [True]
    with pytest.raises(ValueError, match="closed"):
        pool.map(abs, [1])
    pool.close()
    assert not mp.active_children()


# A signal arrives while this thread holds Pool._lock but has not yet set Pool._runner (in map)
# or taken the spares (in close); its handler calls terminate(). A trace function sends the
# signal at that line.
_TERMINATE_IN_HANDLER = textwrap.dedent(
    """
    import inspect, os, signal, sys
    import shmalloc
    from shmalloc.parallel import _pool

    which = sys.argv[1]
    pool = shmalloc.Pool(1, start_method="fork")
    signal.signal(signal.SIGUSR1, lambda *args: pool.terminate())
    func = _pool.Pool.close if which == "close" else _pool.Pool._results  # map's and imap's run
    src, first = inspect.getsourcelines(func)
    marker = "self._shut(graceful=True)" if which == "close" else "self._runner = threading.get_ident()"
    line = first + next(k for k, text in enumerate(src) if marker in text)
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not func.__code__:
            return None
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGUSR1)
            return local
        return local

    sys.settrace(tracer)
    try:
        pool.close() if which == "close" else pool.map(abs, [1, 2])
    except (RuntimeError, ValueError):
        pass  # refused or ended by the terminate: fine, as long as it returns
    sys.settrace(None)
    pool.terminate()
    print("ok")
    """
)


@pytest.mark.parametrize("which", ["close", "map"])
def test_terminate_from_signal_handler_while_this_thread_holds_the_pool_lock_returns(which):
    """Pool.terminate() called by a signal handler that interrupts map() or close() of the same pool returns instead of hanging."""
    try:
        proc = subprocess.run([sys.executable, "-c", _TERMINATE_IN_HANDLER, which], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("terminate() from the signal handler hung")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
