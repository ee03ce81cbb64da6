"""The contract of map, Pool and the executor: each behaviour stated once, run against every engine.

The engines share one transport (results through shared memory or, when small, through the pipe), so
they must agree on what comes back and on how failures are reported. ``engine`` (see engines.py) is
parametrized over the engines and, where the behaviour is about processes, over the start methods; spawn
and forkserver start slowly, so the cheap cases run widely and the slow ones narrowly. Only the public
API is used.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from engines import KINDS, START_METHODS, Engine, make, wait_for_no_workers
from numpy._core.multiarray import get_handler_name

import shmalloc

PIPE_LIMIT = 64 * 1024  # the engines' default
ROWS = 20_000  # frames of this many rows hold more than the pipe limit


def engines(methods: list[str]) -> list[Any]:
    """Parameters for ``engine``: every engine with each of ``methods`` (those this platform has)."""
    return [pytest.param((kind, m), id=f"{kind}-{m}") for kind in KINDS for m in methods if m in START_METHODS]


EVERY_METHOD = engines(START_METHODS)
FORK = engines(["fork"])
FORK_AND_SPAWN = engines(["fork", "spawn"])


@pytest.fixture
def engine(request) -> Iterator[Engine]:
    """An engine adapter; closed after the test, which must leave no worker process behind."""
    adapter = make(*request.param)
    try:
        yield adapter
    finally:
        adapter.close()
    assert not wait_for_no_workers(), "worker processes are left after the engine was closed"


# ---- functions run by the workers (module level: spawn and forkserver workers import them by name) ----


def frame(i: int) -> pd.DataFrame:
    """A frame above the pipe limit with numeric, categorical, datetime (tz-aware too) and string columns."""
    rng = np.random.default_rng(i)
    rows = np.arange(ROWS)
    return pd.DataFrame(
        {
            "x": rng.random(ROWS) + i,
            "flag": rows % 3 == 0,
            "n": (rows * i).astype(np.int32),
            "category": pd.Categorical(np.array(["red", "green", "blue"])[rows % 3]),
            "when": pd.date_range("2024-01-01", periods=ROWS, freq="min") + pd.Timedelta(days=i),
            "zoned": pd.date_range("2024-01-01", periods=ROWS, freq="s", tz="Europe/Berlin"),
            "text": [f"row {r} of {i}" for r in rows],
            "string": pd.array([f"s{r % 97}" for r in rows], dtype="string"),
        },
        index=pd.RangeIndex(i, i + ROWS),
    )


def value_makers(i: int) -> list[Callable[[], Any]]:
    """Makers of results of many kinds for item ``i``: large ones (through shared memory) and small ones (through the pipe)."""
    n = 50_000
    return [
        lambda: np.where(np.arange(n).reshape(-1, 10) % 7 == 0, np.nan, np.arange(n, dtype=np.float64).reshape(-1, 10) * i),
        lambda: np.asfortranarray(np.arange(n, dtype=np.int32).reshape(-1, 50) - i),
        lambda: np.arange(4 * n, dtype=np.int16).reshape(-1, 4)[:, ::2],  # not contiguous
        lambda: np.arange(n, dtype=np.complex128) * (1 + 1j) * i,
        lambda: (np.arange(n) * i).astype("datetime64[ms]"),
        lambda: np.array([f"word {k + i}" for k in range(n // 10)]),
        lambda: np.zeros(n, dtype=[("a", "<i4"), ("b", ">f8")]),
        lambda: frame(i),
        lambda: frame(i).iloc[:10],  # a small frame: through the pipe
        lambda: pd.Series(np.arange(n) * i, name="s"),
        lambda: (i, np.full(2 * n, i, dtype=np.uint8), {"frame": frame(i), "list": [np.arange(n) + i]}),
        lambda: list(range(i, i + n)),  # a large list of ints stays a list
        lambda: {"small": [i] * 3, "array": np.array([i, i + 1])},
        lambda: i,
        lambda: None,
        lambda: f"item {i}",
        lambda: np.float32(i),
        lambda: b"\x00" * 100_000,
    ]


KINDS_OF_VALUES = len(value_makers(0))


def value(i: int) -> Any:
    """A result of kind ``i`` modulo the number of kinds."""
    return value_makers(i)[i % KINDS_OF_VALUES]()


def ones(nbytes: int) -> np.ndarray:
    return np.ones(nbytes, dtype=np.uint8)


def full(i: int) -> np.ndarray:
    return np.full(100_000, i, dtype=np.float64)  # 800 kB: through shared memory


_GROWN: list[int] = []  # in each worker


def grown(i: int) -> list[int]:
    """The same list each time, grown by ``i``."""
    _GROWN.append(i)
    return _GROWN


def ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 3 + n


def fail_on_three(i: int) -> np.ndarray:
    if i == 3:
        raise ValueError(f"item {i} is bad")
    return full(i)


class UnpicklableError(Exception):
    def __init__(self, a: Any, b: Any) -> None:  # pickle calls it with one argument: unpickling fails
        super().__init__(f"{a}-{b}")


def fail_unpicklable(i: int) -> int:
    raise UnpicklableError(i, "x")


def kill_self_on_two(i: int) -> np.ndarray:
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return full(i)


def pid_and_value(i: int) -> tuple[int, Any]:
    return os.getpid(), value(i)


def make_shmarray(i: int) -> shmalloc.ShmArray:
    return shmalloc.ShmArray.from_array(np.arange(100_000, dtype=np.float64) * i)


def first_element(a: np.ndarray) -> float:
    return float(a[0])


# ---- checks ----


def assert_same(got: Any, want: Any) -> None:
    """``got`` equals ``want`` in type, dtype, shape, layout (where ``want`` is contiguous) and values."""
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, np.ndarray):
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous or not want.flags.c_contiguous
        assert got.flags.f_contiguous or not want.flags.f_contiguous
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    else:
        assert type(got) is type(want) and got == want


def arrays_in(result: Any) -> list[np.ndarray]:
    """The ndarrays of ``result`` (also inside containers and frames)."""
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, (tuple, list)):
        return [a for part in result for a in arrays_in(part)]
    if isinstance(result, dict):
        return [a for part in result.values() for a in arrays_in(part)]
    return []


def memory_of(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (``a`` itself, or the last array in its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended and been reaped (no /proc entry, not even a zombie's)."""
    return not Path(f"/proc/{pid}").exists()


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fds_once_warm(engine) -> set[str]:
    """The descriptors open once the engine ran and closed (a start method starts its forkserver and
    resource tracker once, and they stay), with no worker left."""
    engine.run(abs, [-1])
    engine.close()
    assert not wait_for_no_workers()
    return open_fds()


# ---- results ----


@pytest.mark.parametrize("engine", EVERY_METHOD, indirect=True)
def test_results_come_back_equal_and_in_input_order(engine):
    """Arrays of several dtypes and layouts, frames with categorical, datetime and string columns, containers and small values come back equal, in input order, with copy=True and copy=False."""
    items = list(range(KINDS_OF_VALUES + 3))
    for copy in (True, False):
        got = engine.run(value, items, copy=copy)
        assert len(got) == len(items)
        for i, result in zip(items, got, strict=True):
            assert_same(result, value(i))


@pytest.mark.parametrize("engine", FORK, indirect=True)
def test_each_result_is_the_object_as_its_item_left_it_though_later_items_change_it(engine):
    """func returns one list that later items of its chunk grow: each result is the list as its own item
    left it (a result is taken when its item ends, not when its chunk does, as multiprocessing.Pool does)."""
    got = engine.run(grown, range(60))
    for i, result in enumerate(got):
        assert result[-1] == i, (i, result)
    assert max(len(result) for result in got) > 1  # items did run after others in one worker


@pytest.mark.parametrize("pipe_limit", [None, 1000])
@pytest.mark.parametrize("engine", FORK, indirect=True)
def test_results_below_the_pipe_limit_come_through_the_pipe_and_others_through_shared_memory(engine, pipe_limit):
    """A result of pipe_limit - 1 bytes is sent by value; one of pipe_limit bytes arrives in a shmalloc mapping (copy=False)."""
    limit = PIPE_LIMIT if pipe_limit is None else pipe_limit
    for _ in range(2):  # the Pool's second call refills the objects of the first
        small, large = engine.run(ones, [limit - 1, limit], copy=False, pipe_limit=pipe_limit)
        assert get_handler_name(small) != "shmalloc" and small.nbytes == limit - 1 and small.all()
        assert get_handler_name(large) == "shmalloc" and large.nbytes == limit and large.all()
        del small, large


@pytest.mark.parametrize("engine", FORK, indirect=True)
def test_copy_true_gives_regular_arrays(engine):
    """With copy=True, arrays from shared memory are regular numpy arrays: in memory of numpy's default allocator, writable."""
    for _ in range(2):
        got = engine.run(value, [0, 1, 10], copy=True)
        arrays = [a for result in got for a in arrays_in(result) if a.nbytes >= PIPE_LIMIT]
        assert len(arrays) == 4
        for a in arrays:  # those in containers are views of the container's copy
            assert type(a) is np.ndarray and get_handler_name(memory_of(a)) == "default_allocator"
            assert a.flags.writeable


@pytest.mark.parametrize("engine", FORK, indirect=True)
def test_copy_false_arrays_are_shmallocs_writable_and_private(engine):
    """With copy=False, arrays own shmalloc mappings; writes to them reach neither later results nor the objects those reuse."""
    kept = engine.run(full, range(4), copy=False)
    for i, a in enumerate(kept):
        assert type(a) is np.ndarray and get_handler_name(a) == "shmalloc"
        assert a.flags.owndata and a.flags.writeable
        a[: 10 * (i + 1)] = -1.0
    for k in range(3):  # later calls, while the written results live (a Pool recycles the objects of dropped ones)
        again = engine.run(full, [10 + k, 20 + k], copy=False)
        np.testing.assert_array_equal(again[0], full(10 + k))
        np.testing.assert_array_equal(again[1], full(20 + k))
        del again
        gc.collect()
    for i, a in enumerate(kept):
        assert (a[: 10 * (i + 1)] == -1.0).all() and (a[10 * (i + 1) :] == i).all()
    del kept, a
    gc.collect()
    (boxed,) = engine.run(value, [10], copy=False)  # a container: its arrays are views of one mapping
    large = [a for a in arrays_in(boxed) if a.nbytes >= PIPE_LIMIT]
    assert len(large) == 2 and all(get_handler_name(memory_of(a)) == "shmalloc" and a.flags.writeable for a in large)
    del boxed, large
    for _ in range(2):  # the written results are gone: their objects may be reused, without the writes
        got = engine.run(full, range(4), copy=False)
        for i, a in enumerate(got):
            np.testing.assert_array_equal(a, full(i))
        del got, a
        gc.collect()


# ---- errors ----


@pytest.mark.parametrize("engine", EVERY_METHOD, indirect=True)
def test_exception_in_func_is_reraised_with_its_type_and_the_workers_traceback(engine):
    """func's exception is raised in the parent with its type and message, a note naming the item with the worker's traceback; the engine serves the next call."""
    engine.run(full, range(2))  # a Pool then hands the failing call recycled objects
    with pytest.raises(ValueError, match="item 3 is bad") as info:
        engine.run(fail_on_three, range(6))
    notes = "\n".join(info.value.__notes__)
    assert engine.subject(3) in notes and "Traceback" in notes and "fail_on_three" in notes
    assert getattr(info.value, "shmalloc_index", None) == engine.index_of(3)
    assert engine.run(abs, [-1, -2]) == [1, 2]


@pytest.mark.parametrize("engine", FORK, indirect=True)
def test_exception_that_cannot_be_rebuilt_becomes_worker_error(engine):
    """An exception that cannot be unpickled in the parent arrives as WorkerError with its text, item and the worker's traceback."""
    with pytest.raises(shmalloc.WorkerError, match="UnpicklableError: 0-x") as info:
        engine.run(fail_unpicklable, [0])
    assert info.value.index == engine.index_of(0)
    assert "fail_unpicklable" in info.value.remote_traceback
    assert engine.run(abs, [-3]) == [3]


@pytest.mark.parametrize("engine", EVERY_METHOD, indirect=True)
def test_worker_killed_mid_item_is_reported_not_a_hang(engine):
    """A worker killed by SIGKILL while working raises (WorkerDiedError naming the item and signal; the executor: BrokenProcessPool); closing leaves no descriptor or worker."""
    fds = fds_once_warm(engine)
    engine.run(full, range(2))  # a Pool then hands the dying call recycled objects
    with pytest.raises(engine.died) as info:
        engine.run(kill_self_on_two, range(6))
    if engine.names_items:
        assert "item 2 was killed by signal SIGKILL" in str(info.value)
        assert (info.value.index, info.value.exitcode) == (2, -signal.SIGKILL)
    if engine.survives_dead_worker:
        np.testing.assert_array_equal(engine.run(full, [5])[0], full(5))
    else:  # concurrent.futures: a broken pool stays broken
        with pytest.raises(engine.died):
            engine.run(abs, [-1])
    engine.close()
    assert not wait_for_no_workers()
    assert wait_until(lambda: open_fds() <= fds), f"descriptors left open: {open_fds() - fds}"


# ---- ShmArrays returned by func ----


@pytest.mark.parametrize("engine", FORK_AND_SPAWN, indirect=True)
def test_returned_shmarray_arrives_over_the_same_memory_and_is_unlinked_when_dropped(engine):
    """A ShmArray made and returned by func arrives as a ShmArray owned here, over memory that workers see written; dropping it unlinks its name."""
    arrays = engine.run(make_shmarray, range(3))
    names = []
    for i, a in enumerate(arrays):
        assert type(a) is shmalloc.ShmArray and a.owner and a.flags.writeable
        np.testing.assert_array_equal(a, np.arange(100_000, dtype=np.float64) * i)
        assert os.path.exists("/dev/shm" + a.name)
        a[0] = -1.0 - i  # workers receive the array by reference: they must see this write
        names.append(a.name)
    assert engine.run(first_element, arrays) == [-1.0, -2.0, -3.0]
    del arrays, a
    gc.collect()
    assert not [name for name in names if os.path.exists("/dev/shm" + name)]


# ---- a full /dev/shm ----

_FULL_SHM_MB = 8
_FITS = 250_000  # int64s: 2 MB, two of them fit in 8 MB
_TOO_BIG = 1_250_000  # int64s: 10 MB, more than the whole /dev/shm

_FULL_SHM_SCRIPT = textwrap.dedent(
    f"""
    import json, os, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import shmalloc, engines, test_contract

    engine = engines.make(sys.argv[2], "fork")
    calls = []
    try:
        for n in ({_FITS}, {_TOO_BIG}):
            items = [n, 10, n, 20]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = engine.run(test_contract.ramp, items, copy=False)
            right = all(np.array_equal(g, test_contract.ramp(m)) for g, m in zip(got, items))
            fallbacks = [str(w.message) for w in caught if issubclass(w.category, shmalloc.ShmFallbackWarning)]
            calls.append({{"right": right, "fallback warnings": fallbacks}})
            del got
    finally:
        engine.close()
    workers = len(engines.wait_for_no_workers())
    print(json.dumps({{"calls": calls, "left": sorted(os.listdir("/dev/shm")), "workers": workers}}))
    """
)


def run_in_small_shm(kind: str) -> dict:
    """Run engine ``kind`` under fork over a private 8 MB tmpfs at /dev/shm (a mount namespace); its report."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    shell = f'mount -t tmpfs -o size={_FULL_SHM_MB}m tmpfs /dev/shm && exec "$0" -c "$1" "$2" "$3"'
    here = str(Path(__file__).resolve().parent)
    command = ["unshare", "-m", "sh", "-c", shell, sys.executable, _FULL_SHM_SCRIPT, here, kind]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("mount" in proc.stderr or "unshare" in proc.stderr) and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"the process failed (status {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_full_dev_shm_sends_results_through_the_pipe_with_one_warning(kind):
    """Results too large for a full /dev/shm come back right through the pipe with one ShmFallbackWarning; nothing is left."""
    report = run_in_small_shm(kind)
    fitting, too_big = report["calls"]
    assert fitting == {"right": True, "fallback warnings": []}, report
    assert too_big["right"] and len(too_big["fallback warnings"]) == 1, report
    assert report["left"] == [] and report["workers"] == 0, report


# ---- nothing left ----


@pytest.mark.parametrize("engine", EVERY_METHOD, indirect=True)
def test_nothing_is_left_after_the_engine_is_done(engine):
    """Once the engine is closed (map: once a call returns), its workers are reaped, no descriptor is left open and /dev/shm holds nothing of it."""
    fds = fds_once_warm(engine)
    got = engine.run(pid_and_value, range(KINDS_OF_VALUES), copy=False)  # copy=False: results keep mappings
    pids = {pid for pid, _ in got}
    if not engine.keeps_workers:  # map: reaped before the call returns, not merely soon after
        assert not mp.active_children() and all(gone(pid) for pid in pids)
    del got
    gc.collect()
    engine.close()
    assert not wait_for_no_workers()
    assert wait_until(lambda: all(gone(pid) for pid in pids)), "a worker was not reaped"
    assert wait_until(lambda: open_fds() <= fds), f"descriptors left open: {open_fds() - fds}"
    # the autouse leak check (tests/conftest.py) fails the test if anything is left in /dev/shm
