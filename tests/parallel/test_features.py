"""What users of mclapply, multiprocessing and joblib expect of map and Pool: functions by value,
processes=-1, an initializer, the default start method.

Each runs across real process boundaries under every start method.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from engines import map_on

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


# ----------------------------------------------------------------------------
# Warnings and output of func reach the parent


class CustomWarning(UserWarning):
    pass


def _talk(i: int) -> np.ndarray:
    print(f"item {i} starts", end="")
    print(f" and ends {i}")
    print(f"item {i} to stderr", file=sys.stderr)
    if i % 2:
        warnings.warn(f"odd item {i}", CustomWarning, stacklevel=1)
    return np.full(20_000, i)  # large: through shared memory


def _talk_then_fail(i: int) -> int:
    print(f"before failing {i}")
    warnings.warn("about to fail", RuntimeWarning, stacklevel=1)
    raise KeyError(i)


def _warn_unknown_category(i: int) -> int:
    # A warning class the parent cannot find: its module is not importable there.
    category = type("LocalWarning", (UserWarning,), {"__module__": "no_such_module_here"})
    warnings.warn("from an unknown class", category, stacklevel=1)
    return i


ENGINES = ["map", "pool"]



@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_warnings_of_func_are_reissued_in_the_parent_with_category_and_item(engine, method):
    """Each warning issued in func arrives in the parent once, with its class, the item's index and func's line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = map_on(engine, method, _talk, range(6), chunksize=2)
    assert [int(r[0]) for r in results] == list(range(6))
    relayed = sorted(str(w.message) for w in caught if w.category is CustomWarning)
    assert relayed == ["odd item 1 (item 1)", "odd item 3 (item 3)", "odd item 5 (item 5)"]
    assert all(w.lineno > 0 and w.filename for w in caught if w.category is CustomWarning)


@pytest.mark.parametrize("engine", ENGINES)
def test_pytest_warns_sees_a_workers_warning(engine):
    """pytest.warns around a call sees the warning func issued in a worker."""
    with pytest.warns(CustomWarning, match=r"odd item (\d) \(item \1\)"):
        map_on(engine, "fork", _talk, range(4))


@pytest.mark.parametrize("engine", ENGINES)
def test_warnings_made_errors_in_the_parent_raise_there_and_leave_nothing(engine):
    """Under simplefilter("error") in the parent, a worker's warning raises from the call, as in a loop."""
    before = set(os.listdir("/dev/shm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CustomWarning)
        with pytest.raises(CustomWarning, match=r"odd item \d \(item \d\)"):
            map_on(engine, "fork", _talk, range(6))
    assert set(os.listdir("/dev/shm")) <= before


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_output_of_each_item_reaches_the_parents_streams_whole(engine, method, capsys):
    """What func prints reaches the parent's sys.stdout / sys.stderr, each item's text in one piece."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CustomWarning)
        map_on(engine, method, _talk, range(8), chunksize=1)
    out, err = capsys.readouterr()
    assert sorted(out.splitlines()) == sorted(f"item {i} starts and ends {i}" for i in range(8))
    assert sorted(err.splitlines()) == sorted(f"item {i} to stderr" for i in range(8))


@pytest.mark.parametrize("engine", ENGINES)
def test_output_and_warnings_before_an_error_are_relayed_before_it_is_raised(engine, capsys):
    """An item that prints and warns, then raises: the parent gets its output and warning, then its exception."""
    with pytest.warns(RuntimeWarning, match=r"about to fail \(item 0\)"), pytest.raises(KeyError):
        map_on(engine, "fork", _talk_then_fail, [0])
    assert "before failing 0" in capsys.readouterr().out


def test_a_warning_class_unknown_in_the_parent_arrives_as_userwarning_named():
    """A category the parent cannot import arrives as a UserWarning whose message names the class."""
    with pytest.warns(UserWarning, match=r"no_such_module_here.LocalWarning: from an unknown class \(item 0\)"):
        shmalloc.map(_warn_unknown_category, [0], processes=1)


def test_the_executor_relays_warnings_and_output(capsys):
    """shmalloc.ProcessPoolExecutor relays a task's warnings and output too."""
    with shmalloc.ProcessPoolExecutor(1) as executor, pytest.warns(CustomWarning, match=r"odd item 1 \(a task\)"):
        executor.submit(_talk, 1).result()
    assert "item 1 starts and ends 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Retries and errors as values


def _fail_first_try(task: tuple[str, int]) -> np.ndarray:
    """Fails (raises, or kills its worker for odd items) the first time it runs an item: a marker file remembers."""
    directory, i = task
    marker = os.path.join(directory, f"tried-{i}")
    if i % 3 == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        if i % 2:
            os._exit(3)
        raise ValueError(f"first try of {i}")
    return np.full(20_000, i) * float(shmalloc.item_seed().generate_state(1)[0] % 1000)


def _fails_on_multiples_of_three(i: int) -> int:
    if i % 3 == 0:
        raise KeyError(i)
    if i == 4:
        os._exit(5)
    return -i


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_retries_give_the_results_of_a_first_time_success(engine, method, tmp_path):
    """Items that raised or whose worker died on their first try are run again, with the same seed: results as without failures."""
    items = [(str(tmp_path), i) for i in range(10)]
    expected_dir = tmp_path / "expected"
    expected_dir.mkdir()
    for i in range(10):  # no failure: every marker exists already
        (expected_dir / f"tried-{i}").touch()
    expected = map_on(engine, method, _fail_first_try, [(str(expected_dir), i) for i in range(10)], seed=7)
    got = map_on(engine, method, _fail_first_try, items, seed=7, retries=1, chunksize=2)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert sorted(p.name for p in tmp_path.glob("tried-*")) == sorted(f"tried-{i}" for i in (1, 4, 7))


@pytest.mark.parametrize("engine", ENGINES)
def test_retries_spent_raise_the_last_failure(engine, tmp_path):
    """An item that fails more times than it may be retried raises as without retries."""
    with pytest.raises(KeyError):
        map_on(engine, "fork", _fails_on_multiples_of_three, range(3), retries=2)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_errors_return_gives_exceptions_as_results_and_one_warning(engine, method):
    """errors="return": failed items' results are their exceptions (WorkerDiedError for a death), the rest complete, one warning counts them."""
    before = set(os.listdir("/dev/shm"))
    with pytest.warns(shmalloc.FailedItemsWarning, match="4 of 9 items failed") as caught:
        got = map_on(engine, method, _fails_on_multiples_of_three, range(9), errors="return", chunksize=2)
    assert len([w for w in caught if w.category is shmalloc.FailedItemsWarning]) == 1
    for i, value in enumerate(got):
        if i % 3 == 0:
            assert isinstance(value, KeyError) and value.args == (i,)
        elif i == 4:
            assert isinstance(value, shmalloc.WorkerDiedError) and value.index == 4 and value.exitcode == 5
        else:
            assert value == -i
    assert set(os.listdir("/dev/shm")) <= before


def test_errors_return_in_a_pool_keeps_the_pool_serving():
    """After a call with errors="return" whose worker died, the pool serves the next call with all its workers."""
    with shmalloc.Pool(2) as pool:
        with pytest.warns(shmalloc.FailedItemsWarning):
            pool.map(_fails_on_multiples_of_three, range(6), errors="return")
        assert pool.map(abs, range(-4, 0)) == [4, 3, 2, 1]
        assert len(set(pool.map(_pid, range(40), chunksize=1))) == 2


def test_failure_policy_arguments_are_checked():
    """errors must be "raise" or "return", retries a non-negative int."""
    with pytest.raises(ValueError, match="errors must be one of"):
        shmalloc.map(abs, [1], errors="ignore")
    with pytest.raises(ValueError, match="retries must be"):
        shmalloc.map(abs, [1], retries=-1)
    with shmalloc.Pool(1) as pool, pytest.raises(ValueError, match="retries must be"):
        pool.map(abs, [1], retries=1.5)


# ----------------------------------------------------------------------------
# Calls inside a worker


def _nested_map(i: int) -> list:
    return shmalloc.map(_square_with_seed, range(i, i + 3), processes=2, seed=i)


def _nested_pool(i: int) -> list:
    with shmalloc.Pool(2) as pool:
        return pool.map(_square_with_seed, range(i, i + 3), seed=i)


def _square_with_seed(j: int) -> tuple[int, int, int]:
    return j * j, os.getpid(), int(np.random.randint(1 << 30))


def _nested_failures(i: int) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = shmalloc.map(_fails_on_multiples_of_three, [0, 1, 2], errors="return")
    return [type(v).__name__ for v in values] + [str(w.message) for w in caught]


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("inner", [_nested_map, _nested_pool])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_call_inside_a_worker_runs_serially_there_with_the_same_results(engine, inner, method):
    """map or Pool.map called from func runs in that worker (no daemonic-children error), with the results and seeds of a top-level call."""
    got = map_on(engine, method, inner, range(4), chunksize=1)
    for i, values in enumerate(got):
        expected = shmalloc.map(_square_with_seed, range(i, i + 3), processes=2, seed=i)
        assert [v[0] for v in values] == [v[0] for v in expected]
        assert [v[2] for v in values] == [v[2] for v in expected]  # the same seeds, run serially
        assert len({v[1] for v in values}) == 1  # all in the one worker


def test_a_call_inside_a_worker_keeps_the_outer_items_random_state():
    """The serial inner call leaves the outer item's seeded generator where it was."""

    def outer(i: int) -> tuple[int, int]:
        np.random.seed(i)
        shmalloc.map(_square_with_seed, range(3), seed=99)
        return i, int(np.random.randint(1 << 30))

    got = shmalloc.map(outer, range(2), processes=2)
    for i, draw in got:
        np.random.seed(i)
        assert draw == np.random.randint(1 << 30)


def test_a_call_inside_a_worker_honours_errors_return():
    """errors="return" inside a worker: exceptions as values, and the warning counting them issued there."""
    (got,) = shmalloc.map(_nested_failures, [0], processes=1)
    assert got == ["KeyError", "int", "int", "1 of 3 items failed: their results are their exceptions"]


# ----------------------------------------------------------------------------
# imap


def _wait_for_file(task: tuple[str, int]) -> np.ndarray:
    """Item 0 waits (at most 60 s) until the parent has created the file: it can only finish after the others."""
    path, i = task
    if i == 0:
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
    return np.full(20_000, i)


def _imap(engine: str, method: str, func, items, **kwargs):
    """An iterator over the results, and what to close afterwards."""
    if engine == "map":
        return shmalloc.imap(func, items, processes=2, start_method=method, **kwargs), None
    pool = shmalloc.Pool(2, start_method=method)
    return pool.imap(func, items, **kwargs), pool


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_imap_yields_the_results_of_map_in_input_order(engine, method):
    """imap (ordered) yields what map returns, in input order, for large and small results."""
    items = [20_000 if i % 2 else 3 for i in range(12)]
    results, pool = _imap(engine, method, np.arange, items, chunksize=2)
    try:
        got = list(results)
    finally:
        if pool is not None:
            pool.close()
    assert [len(a) for a in got] == items
    assert all(np.array_equal(a, np.arange(n)) for a, n in zip(got, items, strict=True))


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_imap_unordered_yields_results_as_they_are_ready(engine, method, tmp_path):
    """ordered=False: other items' results arrive while item 0 still waits (ordered, the loop would wait for item 0 forever)."""
    path = str(tmp_path / "release")
    results, pool = _imap(engine, method, _wait_for_file, [(path, i) for i in range(6)], ordered=False)
    try:
        order = []
        for array in results:
            order.append(int(array[0]))
            if len(order) == 4:  # four others are in (one more may wait behind item 0 in its worker): let it finish
                open(path, "w").close()
    finally:
        if pool is not None:
            pool.close()
    assert 0 not in order[:4] and sorted(order) == list(range(6))


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_imap_reads_its_input_lazily_and_a_break_stops_everything(engine, method):
    """An endless input is read only a few chunks ahead of the results taken; leaving the loop stops the workers and leaves nothing."""
    before = set(os.listdir("/dev/shm"))
    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield 20_000 + i

    results, pool = _imap(engine, method, np.ones, endless(), chunksize=2)
    try:
        for k, array in enumerate(results):
            assert len(array) == 20_000 + k
            if k == 9:
                break
        results.close()
        assert len(read) <= 10 + 2 * 2 * 4 + 1  # taken + the look-ahead (2 workers x 2 items x 4 chunks) + the one peeked
        if pool is not None:
            assert pool.map(abs, [-3]) == [3]  # the pool serves the next call
    finally:
        if pool is not None:
            pool.close()
    assert set(os.listdir("/dev/shm")) <= before
    assert wait_for_no_children()


@pytest.mark.parametrize("engine", ENGINES)
def test_imap_failures_follow_the_errors_policy(engine):
    """imap raises the failing item's exception at its turn, or with errors="return" yields it in its place."""
    results, pool = _imap(engine, "fork", _fails_on_multiples_of_three, [1, 2, 3, 5])
    try:
        assert next(results) == -1 and next(results) == -2
        with pytest.raises(KeyError):
            next(results)
        results, _ = (pool.imap(_fails_on_multiples_of_three, [1, 3], errors="return"), None) if pool else _imap(
            engine, "fork", _fails_on_multiples_of_three, [1, 3], errors="return"
        )
        with pytest.warns(shmalloc.FailedItemsWarning):
            got = list(results)
        assert got[0] == -1 and isinstance(got[1], KeyError)
    finally:
        if pool is not None:
            pool.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_imap_input_that_raises_ends_the_loop_with_that_error_after_the_results_before_it(engine):
    """An exception raised by the input iterator comes out of the loop once the results of the items before it are out, as
    with multiprocessing; the call leaves nothing behind."""
    before = set(os.listdir("/dev/shm"))

    def broken():
        yield from range(20_000, 20_005)
        raise OSError("the input broke")

    results, pool = _imap(engine, "forkserver", np.ones, broken())  # iterated in a thread: no fork there
    got: list = []
    try:
        error = _consume_within(results, got, seconds=60)
    finally:
        if pool is not None:
            pool.close()
    assert [len(a) for a in got] == list(range(20_000, 20_005))
    assert isinstance(error, OSError) and "the input broke" in str(error)
    assert set(os.listdir("/dev/shm")) <= before
    assert wait_for_no_children()


def test_a_pool_is_held_by_its_imap_until_the_loop_ends():
    """Inside the loop over a Pool's imap, another call of the same pool is refused (it would run inside this one)."""
    with shmalloc.Pool(2) as pool:
        for _ in pool.imap(abs, [1, 2]):
            with pytest.raises(RuntimeError, match="runs a call of this pool"):
                pool.map(abs, [1])
        assert pool.map(abs, [-1]) == [1]


def test_imap_inside_a_worker_runs_serially():
    """shmalloc.imap called from func yields in that worker, serially."""
    got = shmalloc.map(lambda n: [int(a.sum()) for a in shmalloc.imap(np.ones, [n, n + 1])], [3, 5], processes=2)
    assert got == [[3, 4], [5, 6]]


def wait_for_no_children(timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not mp.active_children()


def _slow_flaky_then_failing(task: tuple[str, int]) -> int:
    """Item 0 is slow and fails on its first try; item 1 always fails; the others succeed at once."""
    directory, i = task
    if i == 0:
        time.sleep(0.5)
        marker = os.path.join(directory, "tried-0")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError("item 0, first try")
    if i == 1:
        raise KeyError("item 1, every try")
    return -i


@pytest.mark.parametrize("engine", ENGINES)
def test_imap_retries_an_earlier_item_while_a_later_failure_waits_for_its_turn(engine, tmp_path):
    """Item 1 fails for good while item 0 waits for its retry: the retry still runs, item 0 is yielded, then item 1's error."""
    results, pool = _imap(engine, "forkserver", _slow_flaky_then_failing, [(str(tmp_path), i) for i in range(6)], retries=1)
    got: list = []
    try:
        error = _consume_within(results, got, seconds=60)
    finally:
        if pool is not None:
            pool.close()
    assert got == [0]
    assert isinstance(error, KeyError) and "item 1, every try" in str(error)


def _consume_within(results, got: list, seconds: float) -> BaseException | None:
    """Append every result to ``got`` in a thread; return what the loop raised. A loop that hangs fails the test
    (its workers are killed, so that nothing blocks the run). Workers started in that thread must not fork (the
    process has two threads then): callers use forkserver."""
    raised: list[BaseException] = []

    def consume() -> None:
        try:
            for value in results:
                got.append(value)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for child in mp.active_children():
            child.kill()
        thread.join(30)
        pytest.fail(f"the loop over the results hung for {seconds} s")
    return raised[0] if raised else None


# ----------------------------------------------------------------------------
# How functions travel, and where workers come from


_initialized_value: str | None = None


def _set_module_global(value: str) -> None:
    global _initialized_value
    _initialized_value = value


def _read_module_global(_: int) -> str | None:
    return _initialized_value


_calls_in_this_process = 0


def _count_calls(_: int) -> int:
    global _calls_in_this_process
    _calls_in_this_process += 1
    return _calls_in_this_process


@pytest.mark.parametrize("method", START_METHODS)
def test_a_module_function_sees_the_globals_its_initializer_set(method):
    """The multiprocessing pattern: the initializer sets a module global that func reads (functions travel by reference)."""
    with shmalloc.Pool(2, start_method=method, initializer=_set_module_global, initargs=("set",)) as pool:
        assert pool.map(_read_module_global, range(6), chunksize=1) == ["set"] * 6


@pytest.mark.parametrize("method", START_METHODS)
def test_module_state_lasts_across_the_tasks_of_a_worker(method):
    """A worker's module globals (a cache, a loaded model) last across its tasks and calls."""
    with shmalloc.Pool(1, start_method=method) as pool:
        assert pool.map(_count_calls, range(5), chunksize=1) == [1, 2, 3, 4, 5]
        assert pool.map(_count_calls, range(2)) == [6, 7]


def test_a_start_method_the_program_set_goes_before_the_default(tmp_path):
    """multiprocessing.set_start_method("spawn") in the program: map and Pool spawn their workers."""
    script = tmp_path / "spawned.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys
            import shmalloc

            def method(_):
                return multiprocessing.current_process()._config.get("start_method") or sys.modules["__main__"].__name__

            if __name__ == "__main__":
                multiprocessing.set_start_method("spawn")
                print(shmalloc.map(method, [0], processes=1))
                with shmalloc.Pool(1) as pool:
                    print(pool.map(method, [0]))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['__mp_main__']", "['__mp_main__']"]  # spawned workers import the script as __mp_main__


def test_map_workers_exit_when_the_parent_is_killed(tmp_path):
    """A killed parent: map's forked workers see their pipe close and exit, also those waiting for a task."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing, os, signal, threading, time
            import shmalloc

            def work(i):
                time.sleep(3 if i == 0 else 0)
                return i

            def kill_parent():
                time.sleep(1.0)
                print(" ".join(str(c.pid) for c in multiprocessing.active_children()), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=kill_parent, daemon=True).start()
            shmalloc.map(work, range(40), processes=2, chunksize=1, start_method="fork")
            """
        )
    )
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        for pid in (exc.stdout or b"").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        pytest.fail("a worker outlived its killed parent (it held its own pipe open)")
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.mark.parametrize("method", START_METHODS)
def test_the_parents_filters_by_message_and_module_apply_to_relayed_warnings(method):
    """filterwarnings("ignore", message=...) and (..., module=...) silence a worker's warnings as they would in a loop."""
    for rule in ({"message": "odd item"}, {"module": _talk.__module__}, {"category": CustomWarning}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", **rule)
            map_on("map", method, _talk, range(4))
        assert not [w for w in caught if w.category is CustomWarning], rule
    with warnings.catch_warnings(record=True) as caught:  # a filter on another module leaves them
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="some_other_module")
        map_on("map", method, _talk, range(4))
    assert len([w for w in caught if w.category is CustomWarning]) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_warning_made_an_error_is_that_items_failure(engine):
    """Under simplefilter("error"), a relayed warning fails its item: errors="return" gives it as the item's result."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CustomWarning)
        warnings.simplefilter("ignore", shmalloc.FailedItemsWarning)
        got = map_on(engine, "fork", _talk, range(4), errors="return")
    assert [type(v).__name__ for v in got] == ["ndarray", "CustomWarning", "ndarray", "CustomWarning"]
    assert got[1].shmalloc_index == 1


def _log_with_a_handler_made_lazily(i: int) -> int:
    import logging

    logger = logging.getLogger("shmalloc-test-lazy")
    if not logger.handlers:  # made in the worker's first item: it keeps that item's sys.stderr
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    logger.info("logged by item %d", i)
    return i


def _use_the_streams_below(i: int) -> int:
    sys.stdout.buffer.write(b"")  # bytes go straight through, as C code's output does
    os.fstat(sys.stderr.fileno())
    sys.stdout.flush()
    return i


def _say_then_die(i: int) -> int:
    print(f"item {i} was here", flush=True)
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_a_logging_handler_made_in_an_item_captures_the_later_items_too(capsys):
    """A StreamHandler made lazily in a worker keeps writing into whichever item runs: every item's log line arrives."""
    assert shmalloc.map(_log_with_a_handler_made_lazily, range(6), processes=1) == list(range(6))
    assert sorted(capsys.readouterr().err.splitlines()) == sorted(f"logged by item {i}" for i in range(6))


def test_the_streams_below_stay_reachable_in_a_worker():
    """sys.stdout.buffer, fileno() and flush() work in func as in a loop."""
    assert shmalloc.map(_use_the_streams_below, range(2), processes=1) == [0, 1]


@pytest.mark.parametrize("engine", ENGINES)
def test_flushed_output_of_an_item_whose_worker_dies_reaches_the_parent(engine, capsys):
    """print(..., flush=True) before a SIGKILL: the line still reaches the parent, as it would reach a terminal."""
    with pytest.warns(shmalloc.FailedItemsWarning):
        got = map_on(engine, "fork", _say_then_die, range(3), errors="return", chunksize=1)
    assert isinstance(got[1], shmalloc.WorkerDiedError)
    assert sorted(capsys.readouterr().out.splitlines()) == [f"item {i} was here" for i in range(3)]


def test_leaving_a_pools_with_block_stops_its_unfinished_imap():
    """`with Pool() as p: it = p.imap(...); next(it)`: leaving the block (normally or by an exception) stops the imap and the workers."""
    with shmalloc.Pool(2) as pool:
        results = pool.imap(np.ones, [20_000] * 50)
        assert len(next(results)) == 20_000
    assert wait_for_no_children()
    with pytest.raises(ValueError, match="stop here"), shmalloc.Pool(2) as pool:
        for _ in pool.imap(np.ones, [20_000] * 50):
            raise ValueError("stop here")
    assert wait_for_no_children()
    assert next(results, None) is None  # the stopped imap is over


def test_terminate_from_another_thread_while_an_imap_waits_between_results():
    """terminate() in another thread returns at once while this thread's imap waits between two results; the imap then raises."""
    pool = shmalloc.Pool(2)
    results = pool.imap(np.ones, [20_000] * 50)
    next(results)
    other = threading.Thread(target=pool.terminate)
    other.start()
    other.join(10)
    assert not other.is_alive(), "terminate() waited for the imap"
    with pytest.raises(RuntimeError, match="terminate"):
        list(results)
    assert wait_for_no_children()


def _warn_flush_then_die(i: int) -> int:
    warnings.warn(f"warned by item {i}", UserWarning, stacklevel=1)
    print(f"item {i} flushed", flush=True)
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_warnings_before_a_flush_reach_the_parent_even_if_the_worker_then_dies(capsys):
    """A warning issued before a flushed print travels with it: the dying item's warning is re-issued too, before its output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = shmalloc.map(_warn_flush_then_die, range(3), processes=2, errors="return", chunksize=1)
    assert isinstance(got[1], shmalloc.WorkerDiedError)
    assert sorted(str(w.message) for w in caught if w.category is UserWarning) == [f"warned by item {i} (item {i})" for i in range(3)]
    assert sorted(capsys.readouterr().out.splitlines()) == [f"item {i} flushed" for i in range(3)]


@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_a_function_defined_under_the_main_guard_reaches_spawned_workers(method, tmp_path):
    """A function the main script defines under `if __name__ == "__main__":` is not in the main module a spawned worker
    imports: it travels by value then, in map and in Pool.map."""
    script = tmp_path / "guarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import shmalloc

            if __name__ == "__main__":
                def square(x):
                    return x * x

                print(shmalloc.map(square, range(4), processes=2, start_method={method!r}))
                with shmalloc.Pool(2, start_method={method!r}) as pool:
                    print(pool.map(square, range(4)))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[0, 1, 4, 9]", "[0, 1, 4, 9]"]


def test_workers_keep_small_functions_unpickled_but_not_large_payloads():
    """A worker keeps a function it unpickled (one object across tasks), but not a large pickle, which holds data."""
    from shmalloc.parallel._options import Portable, _load_function

    small = Portable(lambda x: x + 1)
    assert _load_function(*small.pickled) is _load_function(*small.pickled)
    data = np.ones(100_000)
    large = Portable(lambda x: data[0] + x)
    assert _load_function(*large.pickled) is not _load_function(*large.pickled)
