"""How map, Pool and the executor report what happens to an item: exits, signals, errors while describing or rebuilding."""
from __future__ import annotations

import concurrent.futures as cf
import copyreg
import gc
import multiprocessing as mp
import os
import pickle
import pickletools
import signal
import time

import numpy as np
import pandas as pd
import pytest
from engines import map_on

import shmalloc
from shmalloc.parallel import _protocol, _workers

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
TWO_METHODS = [m for m in ("fork", "spawn") if m in mp.get_all_start_methods()]
RTSIG = signal.SIGRTMIN + 2  # a signal without a name in signal.Signals


# Module-level functions and classes: spawn and forkserver workers import them by name.


def own_pid(_: int) -> int:
    return os.getpid()


def kill_self_by_rt_signal_on_two(i: int) -> int:
    if i == 2:
        os.kill(os.getpid(), RTSIG)
    return i


def _explode_outside(pid: int, kind: str):
    """Rebuilds a result: fine in the worker ``pid`` made it in, raises ``kind`` anywhere else."""
    if os.getpid() != pid:
        raise {"OSError": OSError, "ValueError": ValueError}[kind](f"cannot rebuild here (made in {pid})")
    return "rebuilt"


class ExplodesInParent:
    """A result whose unpickling raises in any process but the worker that made it."""

    def __init__(self, kind: str, big: bool = False) -> None:
        self.kind = kind
        self.big = big

    def __reduce__(self):
        return (_explode_outside, (os.getpid(), self.kind))


def explode_in_parent_on_three(i: int, kind: str = "OSError"):
    if i == 3:
        return ExplodesInParent(kind)
    return np.full(30_000, i)


def explode_oserror(i: int):
    return explode_in_parent_on_three(i, "OSError")


def explode_valueerror(i: int):
    return explode_in_parent_on_three(i, "ValueError")


def explode_in_big_result(i: int):
    """A large result (through shared memory) holding a part that cannot be rebuilt in the parent."""
    if i == 3:
        return [np.full(30_000, i), ExplodesInParent("OSError")]
    return np.full(30_000, i)


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class StrAndReprRaise(StrRaises):
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class ReduceRaises(Exception):
    def __reduce__(self):
        raise RuntimeError("cannot pickle me")


class NotesRaise(Exception):
    """traceback formatting reads __notes__: this makes it raise."""

    @property
    def __notes__(self):
        raise RuntimeError("no notes")


def _refuse_unpickling():
    raise RuntimeError("cannot unpickle me here")


class UnpicklingRaises(Exception):
    def __reduce__(self):
        return (_refuse_unpickling, ())


FAILURES = {
    "str raises": StrRaises,
    "str and repr raise": StrAndReprRaise,
    "reduce raises": ReduceRaises,
    "notes raise": NotesRaise,
    "unpickling raises": UnpicklingRaises,
}


def fail_undescribably(arg: tuple[str, int]):
    kind, i = arg
    if i == 2:
        raise FAILURES[kind]("item two")
    return i


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _is_zombie_or_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status"):
            return True  # a zombie or a live process: either way not gone
    except FileNotFoundError:
        return False


# ---- 1. nothing left behind ----------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_map_returns_with_no_descriptor_open_and_no_zombie(method):
    """After map returns, the parent has as many descriptors as before and its workers are reaped."""
    shmalloc.map(abs, [1], start_method=method)  # starts a forkserver or resource tracker once
    before = _fds()
    pids = shmalloc.map(own_pid, range(200), processes=2, start_method=method)
    assert _fds() == before
    assert len(set(pids)) >= 1
    for pid in set(pids):
        assert not _is_zombie_or_alive(pid), f"worker {pid} was not reaped"


@pytest.mark.parametrize("method", TWO_METHODS)
def test_map_that_raises_leaves_no_descriptor_and_no_zombie(method):
    """After map raises for an item, the parent has as many descriptors as before and no worker left."""
    shmalloc.map(abs, [1], start_method=method)
    before = _fds()
    with pytest.raises(shmalloc.WorkerDiedError):
        shmalloc.map(kill_self_by_rt_signal_on_two, range(20), processes=2, start_method=method)
    assert _fds() == before
    assert not mp.active_children()


@pytest.mark.parametrize("method", TWO_METHODS)
def test_pool_close_leaves_no_descriptor_and_no_zombie(method):
    """After Pool.close the parent has as many descriptors as before and the workers are reaped."""
    shmalloc.map(abs, [1], start_method=method)
    before = _fds()
    pool = shmalloc.Pool(2, method)
    pids = pool.map(own_pid, range(20))
    pool.close()
    assert _fds() == before
    for pid in set(pids):
        assert not _is_zombie_or_alive(pid), f"worker {pid} was not reaped"


# ---- 2. signals without a name --------------------------------------------------------------------


@pytest.mark.parametrize("method", TWO_METHODS)
def test_map_worker_killed_by_a_realtime_signal_names_item_and_signal(method):
    """A worker killed by SIGRTMIN+2 gives WorkerDiedError naming the item and the signal number."""
    with pytest.raises(shmalloc.WorkerDiedError, match=rf"item 2 was killed by signal SIGRTMIN\+2 \({RTSIG}\)") as info:
        shmalloc.map(kill_self_by_rt_signal_on_two, range(5), processes=2, start_method=method)
    assert info.value.index == 2 and info.value.exitcode == -RTSIG


@pytest.mark.parametrize("method", TWO_METHODS)
def test_pool_worker_killed_by_a_realtime_signal_names_item_and_signal(method):
    """A Pool worker killed by SIGRTMIN+2 gives WorkerDiedError naming the item and signal; the pool still works."""
    with shmalloc.Pool(2, method) as pool:
        with pytest.raises(shmalloc.WorkerDiedError, match=rf"item 2 was killed by signal SIGRTMIN\+2 \({RTSIG}\)") as info:
            pool.map(kill_self_by_rt_signal_on_two, range(5))
        assert info.value.exitcode == -RTSIG
        assert pool.map(abs, [-1, -2]) == [1, 2]


def test_exit_text_names_every_kind_of_end():
    """Exit codes become text: code, named signal, real-time signal, and a number no signal has."""
    from shmalloc.parallel._failures import exit_text

    assert exit_text(3) == "exited with code 3"
    assert exit_text(-signal.SIGKILL) == f"was killed by signal SIGKILL ({int(signal.SIGKILL)})"
    assert exit_text(-RTSIG) == f"was killed by signal SIGRTMIN+2 ({RTSIG})"
    assert exit_text(-1000) == "was killed by signal 1000"


# ---- 5. errors while rebuilding a result in the parent ------------------------------------------


@pytest.mark.parametrize("func, kind", [(explode_oserror, OSError), (explode_valueerror, ValueError)])
@pytest.mark.parametrize("method", TWO_METHODS)
def test_map_rebuild_error_is_the_items_error(method, func, kind):
    """An error while rebuilding a result in the parent is raised as it is, naming the item (not a dead worker)."""
    with pytest.raises(kind, match="cannot rebuild here") as info:
        shmalloc.map(func, range(6), processes=2, start_method=method)
    assert not isinstance(info.value, shmalloc.WorkerError)
    assert info.value.shmalloc_index == 3
    assert any("item 3" in note for note in info.value.__notes__)
    assert not mp.active_children()


@pytest.mark.parametrize("chunksize", [1, 4])
@pytest.mark.parametrize("method", TWO_METHODS)
def test_pool_rebuild_error_is_the_items_error_and_the_pool_still_works(method, chunksize):
    """A Pool result that cannot be rebuilt in the parent raises the real error naming the item; the pool works on."""
    with shmalloc.Pool(2, method) as pool:
        for func, kind in [(explode_oserror, OSError), (explode_valueerror, ValueError), (explode_in_big_result, OSError)]:
            with pytest.raises(kind, match="cannot rebuild here") as info:
                pool.map(func, range(8), chunksize=chunksize)
            assert info.value.shmalloc_index == 3
            got = pool.map(explode_oserror, [0, 1, 2, 4])
            for value, i in zip(got, [0, 1, 2, 4], strict=True):
                np.testing.assert_array_equal(value, np.full(30_000, i))


def test_map_rebuild_error_of_a_large_result_leaves_nothing():
    """A large result whose rebuilding fails in the parent raises the real error, and its segment is gone."""
    with pytest.raises(OSError, match="cannot rebuild here") as info:
        shmalloc.map(explode_in_big_result, range(6), processes=2, start_method="fork")
    assert info.value.shmalloc_index == 3


def test_executor_rebuild_error_is_the_tasks_error_not_a_broken_pool():
    """In the executor, a result that cannot be rebuilt fails its future with the real error; the pool works on."""
    with shmalloc.ProcessPoolExecutor(2) as pool:
        with pytest.raises(OSError, match="cannot rebuild here"):
            pool.submit(explode_oserror, 3).result(timeout=60)
        assert pool.submit(abs, -5).result(timeout=60) == 5


# ---- 6. exceptions that cannot be described ------------------------------------------------------


@pytest.mark.parametrize("kind", list(FAILURES))
@pytest.mark.parametrize("method", TWO_METHODS)
def test_map_reports_an_undescribable_exception_as_the_items_error(method, kind):
    """An exception whose str, repr, pickling, notes or unpickling fails is still the item's error, not a dead worker."""
    with pytest.raises(Exception) as info:
        shmalloc.map(fail_undescribably, [(kind, i) for i in range(5)], processes=2, start_method=method)
    assert not isinstance(info.value, shmalloc.WorkerDiedError)
    error = info.value
    if isinstance(error, shmalloc.WorkerError):
        assert error.index == 2 and FAILURES[kind].__name__ in str(error)
    else:
        assert type(error) is FAILURES[kind] and error.shmalloc_index == 2


@pytest.mark.parametrize("kind", list(FAILURES))
def test_pool_reports_an_undescribable_exception_as_the_items_error(kind):
    """Under Pool an undescribable exception is the item's error, and the pool still works."""
    with shmalloc.Pool(2) as pool:
        with pytest.raises(Exception) as info:
            pool.map(fail_undescribably, [(kind, i) for i in range(5)])
        assert not isinstance(info.value, shmalloc.WorkerDiedError)
        assert getattr(info.value, "index", getattr(info.value, "shmalloc_index", None)) == 2
        assert pool.map(fail_undescribably, [(kind, 1)]) == [1]


@pytest.mark.parametrize("kind", list(FAILURES))
def test_executor_reports_an_undescribable_exception_as_the_tasks_error(kind):
    """In the executor an undescribable exception fails its future (not a broken pool); the pool works on."""
    with shmalloc.ProcessPoolExecutor(2) as pool:
        with pytest.raises(Exception) as info:
            pool.submit(fail_undescribably, (kind, 2)).result(timeout=60)
        assert not isinstance(info.value, cf.process.BrokenProcessPool)
        assert type(info.value) in (FAILURES[kind], shmalloc.WorkerError)
        assert pool.submit(fail_undescribably, (kind, 1)).result(timeout=60) == 1


@pytest.mark.parametrize("method", TWO_METHODS)
def test_executor_shutdown_leaves_no_descriptor_and_no_zombie(method):
    """After the executor's shutdown the parent has as many descriptors as before and its workers are reaped."""
    with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
        pool.submit(abs, 1).result(timeout=60)  # starts what a start method starts once
    gc.collect()
    before = _fds()
    with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
        pids = [pool.submit(own_pid, i).result(timeout=60) for i in range(6)]
    # The standard pool joins its processes but never closes them: their descriptors close when the
    # process objects are freed, which may wait for the garbage collector. A leak would not close then.
    gc.collect()
    assert _fds() == before
    for pid in set(pids):
        assert not _is_zombie_or_alive(pid), f"worker {pid} was not reaped"


# ---- 7. answers held back by a worker ------------------------------------------------------------
# A worker holds back the answers of fast items whose results travel in the pipe and sends them
# together: a death, a result that cannot be rebuilt and the items' output must come out as if each
# answer had been sent at once.


def print_then_die_on_seven(i: int) -> int:
    print(f"item {i} says", flush=i % 2 == 0)  # even items flush: their output travels early
    return die_on_seven(i)


def die_on_seven(i: int) -> int:
    if i == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return -i


def negate(i: int) -> int:
    return -i


def _die_instead_of_sending(messages: list[bytes]) -> bytes:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def small_or_explode_on_three(i: int):
    return ExplodesInParent("ValueError") if i == 3 else -i


def wait_for_the_consumer(arg: tuple[int, str]) -> str:
    """Item 1 finishes only once the consumer has seen item 0's result (it creates ``flag`` then)."""
    i, flag = arg
    deadline = time.monotonic() + 30
    while i == 1 and not os.path.exists(flag):
        if time.monotonic() > deadline:
            return "gave up: the result of item 0 never reached the consumer"
        time.sleep(0.01)
    return f"item {i}"


def _raise_in_the_worker():
    raise RuntimeError("this item cannot be rebuilt in a worker")


class FailsToReachTheWorker:
    """Pickles in the parent; rebuilding it in a worker raises, and the worker dies reading its task."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self):
        if os.getpid() == self.parent:
            return (_raise_in_the_worker, ())
        return (FailsToReachTheWorker, (self.parent,))


def same(x):
    return x


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("engine", ["map", "pool"])
def test_a_worker_dying_after_fast_items_is_blamed_for_its_item_only(engine, method):
    """Items 0-6 finish fast, item 7 kills its worker: only item 7 fails (WorkerDiedError, SIGKILL); the others'
    answers, held back and lost with the worker, are made again."""
    with pytest.warns(shmalloc.FailedItemsWarning, match="1 of 12 items failed"):
        got = map_on(engine, method, die_on_seven, range(12), processes=1, chunksize=12, errors="return")
    assert isinstance(got[7], shmalloc.WorkerDiedError) and got[7].index == 7 and got[7].exitcode == -signal.SIGKILL
    assert [value for i, value in enumerate(got) if i != 7] == [-i for i in range(12) if i != 7]


@pytest.mark.parametrize("method", TWO_METHODS)
@pytest.mark.parametrize("engine", ["map", "pool"])
def test_what_items_said_before_a_death_is_shown_once_and_never_lost(engine, method, capsys):
    """Items that print are never held back: when item 7 kills its worker and the call raises, what items 0-6
    said is shown, each once (and also when the call goes on with errors="return")."""
    with pytest.raises(shmalloc.WorkerDiedError, match="item 7"):
        map_on(engine, method, print_then_die_on_seven, range(12), processes=1, chunksize=12)
    out = capsys.readouterr().out
    assert [out.count(f"item {i} says\n") for i in range(8)] == [1] * 7 + [0], out
    with pytest.warns(shmalloc.FailedItemsWarning):
        map_on(engine, method, print_then_die_on_seven, range(12), processes=1, chunksize=12, errors="return")
    out = capsys.readouterr().out
    assert [out.count(f"item {i} says\n") for i in range(12)] == [1] * 7 + [0] + [1] * 4, out


@pytest.mark.parametrize("engine", ["map", "pool"])
def test_a_worker_dying_while_sending_held_answers_blames_the_last_item_of_its_task(engine, monkeypatch):
    """A worker that dies sending its held answers (the next chunk already waiting for it) fails the last item
    of the task it was answering, not the next chunk's first, which runs once like the others."""
    monkeypatch.setattr(_protocol, "batch", _die_instead_of_sending)  # in forked workers only
    with pytest.warns(shmalloc.FailedItemsWarning, match="1 of 8 items failed"):
        got = map_on(engine, "fork", negate, range(8), processes=1, chunksize=4, errors="return")
    assert isinstance(got[3], shmalloc.WorkerDiedError) and got[3].index == 3
    assert [value for i, value in enumerate(got) if i != 3] == [-i for i in range(8) if i != 3]


@pytest.mark.parametrize("method", TWO_METHODS)
@pytest.mark.parametrize("engine", ["map", "pool"])
def test_a_result_that_cannot_be_rebuilt_among_held_answers_fails_alone(engine, method):
    """A small result whose rebuilding raises, sent together with its neighbours', is that item's error only."""
    with pytest.warns(shmalloc.FailedItemsWarning, match="1 of 8 items failed"):
        got = map_on(engine, method, small_or_explode_on_three, range(8), processes=1, chunksize=8, errors="return")
    assert isinstance(got[3], ValueError) and "cannot rebuild here" in str(got[3])
    assert [value for i, value in enumerate(got) if i != 3] == [-i for i in range(8) if i != 3]


class _RecordingConnection:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def _answer(index: int, padding: int = 0) -> bytes:
    return _protocol.pickled((_protocol.OK, index, (), ())) + b"x" * padding


def _indices(sent: list[bytes]) -> list[object]:
    """The item of each message, or the items of the answers a batch holds."""
    out: list[object] = []
    for message in sent:
        header, stream = _protocol.read_header(message)
        if header.kind == _protocol.BATCH:
            out.append([_protocol.read_header(answer)[0].index for answer in _protocol.read_payload(stream)])
        else:
            out.append(header.index)
    return out


def test_held_answers_go_out_in_order_before_the_next_one_and_never_wait_too_long(monkeypatch):
    """Held answers leave as one batch, before an answer that may not wait; none waits past HOLD_SECONDS or
    HOLD_BYTES."""
    clock = [100.0]
    monkeypatch.setattr(_workers.time, "monotonic", lambda: clock[0])
    conn = _RecordingConnection()
    unsent = _workers._Unsent(conn)  # type: ignore[arg-type]
    unsent.send(_answer(0), True)
    unsent.send(_answer(1), True)
    assert conn.sent == []
    unsent.send(_answer(2), False)
    assert _indices(conn.sent) == [[0, 1], 2]
    conn.sent.clear()
    unsent.send(_answer(3), True)
    clock[0] += _workers.HOLD_SECONDS * 1.01
    unsent.send(_answer(4), True)  # the first held is old enough: both go
    assert _indices(conn.sent) == [[3], 4]
    conn.sent.clear()
    half = _workers.HOLD_BYTES // 2
    unsent.send(_answer(5, half), True)
    unsent.send(_answer(6, half), True)  # would hold more than HOLD_BYTES
    assert _indices(conn.sent) == [[5], 6]
    conn.sent.clear()
    unsent.send(_answer(7), True)
    unsent.flush()
    unsent.flush()
    assert _indices(conn.sent) == [[7]]


@pytest.mark.parametrize("engine", ["imap", "pool"])
def test_an_imap_never_holds_back_a_result_its_caller_waits_for(engine, tmp_path):
    """In an imap, item 0's result reaches the caller while item 1 of the same chunk still runs (item 1 waits
    for the caller to have it): answers are held back in a map only."""
    flag = str(tmp_path / "seen")
    items = [(0, flag), (1, flag)]
    got = []

    def consume(results):
        for result in results:
            got.append(result)
            open(flag, "w").close()

    if engine == "imap":
        consume(shmalloc.imap(wait_for_the_consumer, items, processes=1, chunksize=2))
    else:
        with shmalloc.Pool(1) as pool:
            consume(pool.imap(wait_for_the_consumer, items, chunksize=2))
    assert got == ["item 0", "item 1"]


@pytest.mark.parametrize("method", TWO_METHODS)
def test_a_worker_dying_before_it_starts_a_call_is_not_judged_by_its_last_call(method):
    """A Pool worker that dies reading the next call's task (its first item cannot be rebuilt there) fails item 0
    only: what it noted in its previous call (item 2 finished) names no item of this one."""
    with shmalloc.Pool(1, start_method=method) as pool:
        assert pool.map(same, range(3), chunksize=3) == [0, 1, 2]
        with pytest.warns(shmalloc.FailedItemsWarning, match="1 of 6 items failed"):
            got = pool.map(same, [FailsToReachTheWorker(os.getpid()), 1, 2, 3, 4, 5], chunksize=6, errors="return")
    assert isinstance(got[0], shmalloc.WorkerDiedError) and got[0].index == 0
    assert got[1:] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("noted", "died_on"),
    [
        (None, 4),  # nothing noted in this task: the first item owed
        (6, 6),  # on item 6 (4 and 5 finished, their answers held back)
        (7, 7),  # on the last item owed: running it, or sending the answers
        (9, 4),  # an item it does not owe (noted in an earlier call): the first item owed
    ],
)
def test_the_item_a_worker_died_on_is_read_from_its_progress(noted, died_on):
    """The parent names the item a dead worker was on from the word the worker shares with it."""
    fd = _workers.Progress.new_file()
    try:
        progress = _workers.Progress(fd)
    finally:
        os.close(fd)
    try:
        if noted is not None:
            progress.started(noted)
        worker = _workers.Worker(None, None, progress)  # type: ignore[arg-type]
        worker.pending.extend([4, 5, 6, 7])
        assert worker.died_on() == died_on
    finally:
        progress.close()


def _rebuilt(message: bytes, copy: bool = True) -> tuple[str, object]:
    header, stream = _protocol.read_header(message)
    shipped = _protocol.as_shipped(header, _protocol.read_payload(stream))
    if shipped.handle is None:
        return header.kind, shipped.value
    return header.kind, _protocol.receive(shipped, shipped.handle.name, copy)


def test_a_result_in_the_pipe_travels_as_itself_and_a_large_one_as_its_handle():
    """A small result's answer carries the value alone (VALUE), whatever it is, even a Shipped; a result in
    shared memory, or one that fell back to the pipe, carries its Shipped (OK)."""
    from shmalloc import _names

    kind, value = _rebuilt(_protocol.answer(3, lambda: _protocol.ship({"a": [1, 2]}, _names.generate())).message)
    assert (kind, value) == (_protocol.VALUE, {"a": [1, 2]})
    lookalike = _protocol.Shipped(value=5, fell_back=True)
    kind, value = _rebuilt(_protocol.answer(4, lambda: _protocol.ship(lookalike, _names.generate())).message)
    assert (kind, value) == (_protocol.VALUE, lookalike)
    fell_back = _protocol.answer(5, lambda: _protocol.Shipped(value=np.arange(3), fell_back=True)).message
    header, stream = _protocol.read_header(fell_back)
    shipped = _protocol.as_shipped(header, _protocol.read_payload(stream))
    assert header.kind == _protocol.OK and shipped.fell_back and shipped.value.tolist() == [0, 1, 2]
    large = np.arange(300_000.0)
    answer = _protocol.answer(6, lambda: _protocol.ship(large, _names.generate()))
    kind, value = _rebuilt(answer.message)
    answer.handover.complete()
    assert kind == _protocol.OK and np.array_equal(value, large)


# An Index of few plain labels travels as its labels and a RangeIndex as its range (see _protocol._Pickler);
# any other, as pandas pickles it.
_AS_LABELS = {
    "str": pd.Index(["x", "y", "z"]),
    "str with a name and a missing label": pd.Index(["a", np.nan], name="n"),
    "int64": pd.Index([3, 1, 2]),
    "uint64 above int64": pd.Index([2**63 + 5]),
    "float64 with 0.0, -0.0 and NaN": pd.Index([0.0, -0.0, np.nan]),
    "bool": pd.Index([True, False]),
    "object of mixed labels": pd.Index(["a", 1, 2.5, True], dtype=object),
    "empty": pd.Index([], dtype=object),
    "a tuple for a name": pd.Index(["a", "b"], name=("t", 1)),
}
_AS_RANGE = {
    "RangeIndex": pd.RangeIndex(2, 9, 3, name="r"),
    "descending, a tuple for a name": pd.RangeIndex(0, -10, -2, name=("a", 1)),
    "empty RangeIndex": pd.RangeIndex(0),
}
_AS_PANDAS_PICKLES = {
    "too many labels": pd.Index([f"c{i}" for i in range(200)]),
    "labels of numpy scalar types": pd.Index([np.float32(1.5), np.int8(2)], dtype=object),
    "a label of None": pd.Index(["a", None], dtype=object),
    "str with NA": pd.Index(["a", "b"], dtype="string"),
    "DatetimeIndex": pd.date_range("2024-01-01", periods=3, freq="D", tz="UTC"),
    "CategoricalIndex": pd.CategoricalIndex(["a", "b", "a"]),
    "MultiIndex": pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["k", "n"]),
}
_REBUILT_BY = {"labels": ("shmalloc.codecs.pandas", "labels_index"), "range": ("shmalloc.parallel._protocol", "_range_index")}


@pytest.mark.parametrize(
    "label, index, route",
    [(k, v, "labels") for k, v in _AS_LABELS.items()]
    + [(k, v, "range") for k, v in _AS_RANGE.items()]
    + [(k, v, "pandas") for k, v in _AS_PANDAS_PICKLES.items()],
)
def test_an_index_in_an_answer_comes_back_exactly_and_a_frames_axes_in_fewer_steps(label, index, route):
    data = _protocol.pickled(index)
    back = pickle.loads(data)
    pd.testing.assert_index_equal(back, index, exact=True, check_exact=True)
    assert (type(back), back.dtype, back.names) == (type(index), index.dtype, index.names)
    assert repr(back.tolist()) == repr(index.tolist())  # tells 0.0 from -0.0, 1 from True
    assert _first_global(data) == _REBUILT_BY.get(route, _first_global(pickle.dumps(index, protocol=5)))


def _first_global(data: bytes) -> tuple[str, ...]:
    """The (module, name) of the first global a pickle refers to: what rebuilds its outermost object."""
    strings: list[str] = []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name == "STACK_GLOBAL":
            return tuple(strings[-2:])
        if isinstance(argument, str):
            strings.append(argument)
    return ()


def test_indexes_sent_as_labels_keep_identity_within_an_answer_and_are_their_own_across_answers():
    """Two results with the same labels share no Index object that changing one would change in the other."""
    columns = pd.Index(["x", "y"])
    first = pd.DataFrame([[1.0, 2.0]], columns=columns)
    pair = pickle.loads(_protocol.pickled((first, first.columns, pd.DataFrame([[3, 4]], columns=columns))))
    assert pair[0].columns is pair[1] is pair[2].columns  # one object in the answer, one object rebuilt
    other = pickle.loads(_protocol.pickled(first))
    assert other.columns is not pair[1]
    pair[1].name = "renamed"
    assert other.columns.name is None and other.columns.tolist() == ["x", "y"]
    other.columns = ["p", "q"]
    assert pair[0].columns.tolist() == ["x", "y"] and pair[0].iloc[0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "labels, write",
    [
        ([10, 20, 30], lambda index: np.asarray(index).__setitem__(0, 99)),
        ([10, 20, 30], lambda index: np.asarray(index).sort()),
        (["x", "y", "z"], lambda index: pd.Series(index).array.__setitem__(0, "w")),
        (["x", "y", "z"], lambda index: pd.array(index, copy=False).__setitem__(0, "w")),
    ],
    ids=["int, np.asarray", "int, sort in place", "str, Series.array", "str, pd.array"],
)
def test_labels_written_through_one_answers_index_never_change_another_answers(labels, write):
    """Answers with the same labels share none of them: pandas lets these writes through to an Index."""
    columns = pd.Index(labels)
    first, second = (pickle.loads(_protocol.pickled(pd.DataFrame([[1, 2, 3]], columns=columns))) for _ in range(2))
    write(first.columns)
    first.columns.get_loc(labels[1])  # a lookup in the changed labels first
    later = pickle.loads(_protocol.pickled(columns))
    assert [second.columns.tolist(), later.tolist()] == [labels] * 2
    assert second[labels[0]].tolist() == [1] and later.get_loc(labels[0]) == 0


def test_labels_that_only_a_cache_key_would_mix_up_come_back_as_sent():
    """NaNs of another sign, and a dtype with metadata (it compares equal to the plain one)."""
    negative_nan = -np.float64("nan")
    for index in (pd.Index([negative_nan, 1.0]), pd.Index([np.nan, 1.0])):
        back = pickle.loads(_protocol.pickled(index))
        assert np.signbit(np.asarray(back)).tolist() == np.signbit(np.asarray(index)).tolist()
    with_metadata = pd.Index(np.array([1, 2], dtype=np.dtype("int64", metadata={"unit": "m"})))
    for index in (pd.Index([1, 2]), with_metadata):
        assert pickle.loads(_protocol.pickled(index)).dtype.metadata == index.dtype.metadata


def test_a_reducer_registered_for_index_classes_is_used():
    def as_list(index: pd.Index) -> tuple[object, ...]:
        return list, (index.tolist(),)

    for index in (pd.Index([1, 2]), pd.RangeIndex(2)):
        copyreg.pickle(type(index), as_list)
        try:
            assert pickle.loads(_protocol.pickled(index)) == index.tolist()
        finally:
            del copyreg.dispatch_table[type(index)]


@pytest.mark.parametrize("method", START_METHODS)
def test_frames_of_every_label_kind_come_back_exactly_from_workers(method):
    indexes = [*_AS_LABELS.values(), *_AS_RANGE.values(), *_AS_PANDAS_PICKLES.values()]
    frames = [pd.DataFrame(np.arange(2 * len(ix)).reshape(2, len(ix)), columns=ix) for ix in indexes]
    with shmalloc.Pool(2, start_method=method) as pool:
        back = pool.map(_itself, frames, chunksize=3)
    for got, sent in zip(back, frames, strict=True):
        pd.testing.assert_frame_equal(got, sent, check_exact=True, check_column_type=True)
        assert repr(got.columns.tolist()) == repr(sent.columns.tolist())


def _itself(x: object) -> object:
    return x
