"""shmalloc.map's own behaviour: lambdas under fork, exit codes, chunks, seeds, progress, Ctrl-C, bad arguments.

What map shares with Pool and the executor is in test_contract.py."""
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
from pathlib import Path

import numpy as np
import pytest

import shmalloc
import shmalloc.parallel._protocol as protocol_module

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


# Module-level functions: spawn and forkserver workers import them by name.


def make_array(i: int) -> np.ndarray:
    return np.arange(50_000, dtype=np.float64).reshape(-1, 10, order="F") * i


def exit_on_one(i: int) -> int:
    if i == 1:
        os._exit(7)
    return i


def draw(i: int) -> tuple[float, float, int]:
    import random

    return float(np.random.default_rng(shmalloc.item_seed()).random()), float(np.random.random()), random.randrange(10**9)


def pid_of(i: int) -> int:
    return os.getpid()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for_workers_to_exit(timeout: float = 10.0) -> None:
    """Workers that delivered everything exit on their own after map returns; they must do so soon."""
    deadline = time.monotonic() + timeout
    while mp.active_children() and time.monotonic() < deadline:  # active_children() also reaps
        time.sleep(0.01)
    assert not mp.active_children()


def test_lambdas_and_closures_under_fork():
    """Under fork the function is inherited, not pickled: lambdas and closures work."""
    offset = np.arange(30_000)
    got = shmalloc.map(lambda i: offset + i, range(4), processes=2, start_method="fork")
    for i, a in enumerate(got):
        np.testing.assert_array_equal(a, offset + i)
    # Items are inherited too: unpicklable ones work.
    funcs = [lambda: 1, lambda: 2]
    assert shmalloc.map(lambda f: f(), funcs, start_method="fork") == [1, 2]


@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_func_that_cannot_be_pickled_is_a_clear_type_error(method):
    """Without fork, a func that not even cloudpickle can send (it holds a lock) is a TypeError before any worker starts."""
    lock = threading.Lock()
    with pytest.raises(TypeError, match="func must be picklable to its workers"):
        shmalloc.map(lambda i: lock.locked() or i, range(3), start_method=method)


def test_os_exit_in_worker_names_the_item():
    """os._exit in func ends the worker: the error names the item and the exit code."""
    with pytest.raises(shmalloc.WorkerDiedError, match="item 1 exited with code 7"):
        shmalloc.map(exit_on_one, range(4), processes=2)


def test_worker_killed_after_writing_its_segment_leaves_nothing(monkeypatch):
    """A worker that dies right after creating its result's segment: the parent unlinks that segment."""
    real = protocol_module.copy2shm

    def copy_then_die(x, name=None, **kwargs):
        real(x, name=name, **kwargs)
        assert os.path.exists("/dev/shm" + name)
        os._exit(1)

    monkeypatch.setattr(protocol_module, "copy2shm", copy_then_die)  # inherited by forked workers
    with pytest.raises(shmalloc.WorkerDiedError):
        shmalloc.map(make_array, range(4), processes=2, start_method="fork")
    # The autouse fixture fails the test if a segment is left.


def test_many_items_and_chunks():
    """Thousands of items with chunks come back complete and in order; no descriptor is left open."""
    fds = _open_fds()
    assert shmalloc.map(abs, range(-1500, 1500), processes=2, chunksize=37) == [abs(i) for i in range(-1500, 1500)]
    got = shmalloc.map(make_array, range(60), processes=2, chunksize=4, copy=False)
    assert [float(a[1, 0]) for a in got] == [float(i) for i in range(60)]
    del got
    _wait_for_workers_to_exit()
    assert _open_fds() <= fds


def kill_self_on_four(i: int) -> np.ndarray:
    if i == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return make_array(i)


@pytest.mark.parametrize("engine", ["map", "pool"])
def test_a_death_in_a_chunk_names_its_item_while_the_next_chunk_waits(engine):
    """With chunks of 3 (items 3, 4, 5 in one worker's chunk, the next chunk already sent to it), a worker
    killed on item 4 is reported for item 4, after item 3's answer was taken."""
    with pytest.raises(shmalloc.WorkerDiedError) as info:
        if engine == "map":
            shmalloc.map(kill_self_on_four, range(12), processes=2, chunksize=3)
        else:
            with shmalloc.Pool(2) as pool:
                pool.map(kill_self_on_four, range(12), chunksize=3)
    assert (info.value.index, info.value.exitcode) == (4, -signal.SIGKILL)
    _wait_for_workers_to_exit()


_LARGE_CHUNKS_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import shmalloc

    def zeros(item):
        return np.zeros(7000)

    if __name__ == "__main__":
        # chunks far larger than a pipe holds: tiny entries by the ten thousand, and items of 100 KB
        assert shmalloc.map(abs, range(-100_000, 0), processes=2, start_method="fork") == list(range(100_000, 0, -1))
        got = shmalloc.map(zeros, [b"x" * 100_000] * 80, processes=2, start_method="forkserver")
        assert len(got) == 80 and all(a.shape == (7000,) for a in got)
        with shmalloc.Pool(2) as pool:
            assert len(pool.map(zeros, [b"x" * 100_000] * 80)) == 80
            assert pool.map(abs, range(-30_000, 0)) == list(range(30_000, 0, -1))
        print("done")
    """
)


def test_chunks_larger_than_a_pipe_do_not_deadlock(tmp_path):
    """A chunk sent ahead to a busy worker must fit in its pipe: one that does not waits until the worker has
    answered, else both would block for good (the parent sending, the worker answering)."""
    script = tmp_path / "large_chunks.py"
    script.write_text(_LARGE_CHUNKS_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]


def test_default_chunks_are_about_four_per_process():
    """Without chunksize, items go out in about four chunks per process (each worker sees runs of items),
    smaller towards the end."""
    pids = shmalloc.map(pid_of, range(80), processes=2)
    runs = 1 + sum(a != b for a, b in itertools.pairwise(pids))
    assert len(set(pids[:10])) == 1  # the first chunk: 10 items
    assert 2 <= runs <= 20  # 80 items one by one could make 80


def test_generators_empty_inputs_and_more_processes_than_items():
    """Any iterable works; an empty one gives []; surplus processes are not started."""
    assert shmalloc.map(abs, (i for i in range(-3, 0))) == [3, 2, 1]
    assert shmalloc.map(abs, []) == []
    assert len(set(shmalloc.map(pid_of, [1], processes=8))) == 1


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"processes": 0}, ValueError),
        ({"processes": 1.5}, ValueError),
        ({"chunksize": 0}, ValueError),
        ({"start_method": "thread"}, ValueError),
        ({"copy": "yes"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    """Bad arguments give clear exceptions before any worker starts."""
    with pytest.raises(error):
        shmalloc.map(abs, [1], **kwargs)
    with pytest.raises(TypeError, match="callable"):
        shmalloc.map(42, [1])


def test_seed_makes_results_independent_of_processes_and_chunks():
    """With a seed, each item's random numbers depend only on the seed and its index."""
    one = shmalloc.map(draw, range(12), processes=1, seed=2024)
    two = shmalloc.map(draw, range(12), processes=2, chunksize=5, seed=2024)
    assert one == two
    assert len({r[0] for r in one}) == 12  # each item has its own stream
    assert shmalloc.map(draw, range(3), seed=7) != one[:3]
    assert shmalloc.item_seed() is None


def test_progress_bar(capsys):
    """progress=True draws a tqdm bar that reaches the total, and changes no result."""
    pytest.importorskip("tqdm")
    assert shmalloc.map(abs, range(-5, 0), progress=True) == [5, 4, 3, 2, 1]
    assert "5/5" in capsys.readouterr().err


_INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    import shmalloc

    # Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow(i):
        if i >= 2:
            time.sleep(60)
        return np.full(100_000, i)

    print(os.getpid(), flush=True)
    shmalloc.map(slow, range(6), processes=2, chunksize=1)
    """
)


def test_keyboard_interrupt_stops_workers_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the process group) during map: KeyboardInterrupt, workers gone, no segment left."""
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPT_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    pid = int(child.stdout.readline())
    deadline = time.monotonic() + 30
    while len(_children_of(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children_of(pid)
    assert len(workers) == 2
    time.sleep(0.5)  # let items 0 and 1 come back through shared memory
    os.killpg(pid, signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{pid}_")]


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def unpicklable_result(i: int):
    if i > 1:
        return i
    gen = (x for x in range(3))
    if i == 0:
        return gen  # not measurable: goes the shared memory way, where pickling fails
    holder = np.empty(1, dtype=object)
    holder[0] = gen
    return holder  # measured as small: goes the pipe way, where pickling fails


@pytest.mark.parametrize("kind", [0, 1])
def test_unpicklable_result_is_an_error_naming_the_item(kind):
    """A result that cannot be pickled fails with the item's index, through shared memory or the pipe."""
    with pytest.raises(TypeError, match="generator") as info:
        shmalloc.map(unpicklable_result, [7, 7, kind], processes=1)
    assert info.value.shmalloc_index == 2


def test_arguments_are_checked_func_first():
    """With several bad arguments, map names func first, then processes, then the start method."""
    with pytest.raises(TypeError, match="func must be callable"):
        shmalloc.map(None, [1], processes=0, start_method="nope")
    with pytest.raises(ValueError, match="processes"):
        shmalloc.map(abs, [1], processes=0, start_method="nope")
    with pytest.raises(ValueError, match="start_method"):
        shmalloc.map(abs, [1], start_method="nope")


@pytest.mark.parametrize(
    ("shrink_tail", "nproc", "seconds_per_item"),
    [(True, 2, 2**-6), (True, 3, 2**-6), (True, 2, 2**-10), (True, 3, 2**-10), (False, 2, 2**-6)],  # 16 and 1 ms
)
def test_chunks_shrink_towards_the_end_only_when_the_chunksize_was_left_to_choose(
    shrink_tail, nproc, seconds_per_item, monkeypatch
):
    """With shrink_tail (map's default chunksize), a chunk is at most the items left shared among the
    chunks the workers may hold, but no smaller than takes MIN_CHUNK_SECONDS at the pace so far: slow
    items shrink to single ones, fast ones stop shrinking earlier. Every item goes out once, in order.
    A chunksize the caller chose stays as it is."""
    from types import SimpleNamespace

    from shmalloc.parallel import _call
    from shmalloc.parallel._call import CHUNKS_AHEAD, MIN_CHUNK_SECONDS, Call, NamedResults
    from shmalloc.parallel._options import Options, pick_chunksize

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(_call, "time", SimpleNamespace(monotonic=lambda: clock.now))  # the pace, exactly

    items = list(range(200))
    chunksize = pick_chunksize(None, len(items), nproc)
    options = Options(abs, None, None, 1 << 20)
    call = Call(
        None,  # type: ignore[arg-type]  # no worker is needed to hand out chunks
        items,
        options,
        nproc=nproc,
        chunksize=chunksize,
        results=NamedResults(True),
        progress=False,
        label="test",
        persistent=False,
        shrink_tail=shrink_tail,
    )
    chunks = []
    while (chunk := call._next_chunk()) is not None:
        chunks.append(chunk)
        for index in chunk:  # answered at once, at the pace of seconds_per_item on each worker
            del call.items[index]
        clock.now = call.started + seconds_per_item * (chunk[-1] + 1) / nproc
    assert [i for chunk in chunks for i in chunk] == items
    sizes = [len(chunk) for chunk in chunks]
    if not shrink_tail:
        assert set(sizes[:-1]) == {chunksize}
        return
    assert sizes[0] == chunksize and sizes == sorted(sizes, reverse=True)
    smallest = -(-MIN_CHUNK_SECONDS // seconds_per_item)
    assert sizes[-2] == min(smallest, chunksize)  # the last may hold what was left
    left = len(items)
    for size in sizes:
        assert size <= max(smallest, -(-left // (nproc * CHUNKS_AHEAD)))
        left -= size


def _two_ms(i: int) -> int:
    time.sleep(0.002)
    return i


def test_a_worker_never_holds_more_than_chunks_ahead_chunks_even_small_ones(monkeypatch):
    """Small chunks (the tail's) must not pile up unread in a busy worker's pipe: a worker is given a
    chunk only while it holds fewer than CHUNKS_AHEAD chunks not fully answered (counted here from what
    was sent and what it still owes, not from the call's own count)."""
    from shmalloc.parallel import _call

    sent: dict[int, list[range]] = {}
    most: list[int] = []
    real_send = _call.Call._send

    def counting_send(self, worker, chunk):
        pid = worker.process.pid
        owed = set(worker.pending)
        given = sent.setdefault(pid, [])
        given.append(range(worker.pending[-chunk.items], worker.pending[-1] + 1))
        most.append(sum(1 for items in given if owed.intersection(items)))
        return real_send(self, worker, chunk)

    monkeypatch.setattr(_call.Call, "_send", counting_send)
    with shmalloc.Pool(2, start_method="fork") as pool:
        assert pool.map(_two_ms, range(300)) == list(range(300))
    assert sum(len(items) for chunks in sent.values() for items in chunks) == 300
    assert max(most) <= _call.CHUNKS_AHEAD


def test_chunk_size_takes_a_clock_that_has_not_moved(monkeypatch):
    """On a clock of coarse ticks no time may have passed since the call began: no division by zero."""
    from types import SimpleNamespace

    from shmalloc.parallel import _call
    from shmalloc.parallel._call import Call, NamedResults
    from shmalloc.parallel._options import Options

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(_call, "time", SimpleNamespace(monotonic=lambda: clock.now))

    options = Options(abs, None, None, 1 << 20)
    call = Call(
        None,  # type: ignore[arg-type]  # no worker is needed to hand out chunks
        list(range(100)),
        options,
        nproc=2,
        chunksize=13,
        results=NamedResults(True),
        progress=False,
        label="test",
        persistent=False,
        shrink_tail=True,
    )
    sizes = []
    while (chunk := call._next_chunk()) is not None:
        sizes.append(len(chunk))
        for index in chunk:
            del call.items[index]
        clock.now = call.started  # not a moment has passed, as a clock of coarse ticks tells
    assert sum(sizes) == 100 and set(sizes[:-1]) == {13}
