"""shmalloc.Pool: persistent workers, recycled (warm) segments that never mix users' data, no leaks."""
from __future__ import annotations

import errno
import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from numpy._core.multiarray import get_handler_name

import shmalloc
import shmalloc.parallel._call as call_module
import shmalloc.parallel._protocol as protocol_module
from shmalloc import _format, _names, _posix, _releaser, _transfer
from shmalloc.parallel import _arena, _spares

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
N = 100_000  # 800 kB an array: above the pipe limit


# Module-level functions: workers get them pickled.


def full(i: int) -> np.ndarray:
    return np.full(N, i, dtype=np.float64)


def frame(i: int) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(N, dtype=np.float64) + i, "y": np.arange(N) % 2 == 0, "z": np.full(N, i, np.int32)})


def sized(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.uint8)


def pid_of(i: int) -> int:
    return os.getpid()


BIG = 1 << 22  # 32 MB an array: enough to see in /proc/meminfo's Shmem
_returned_here: list[np.ndarray] = []  # in a worker: the arrays it returned, still referenced


def returned_and_kept(i: int) -> np.ndarray:
    """A new array, which the worker also keeps, to write into after returning it."""
    array = np.full(BIG, float(i))
    _returned_here.append(array)
    return array


def write_into_returned(_: int) -> list[float]:
    """Write into every array this worker returned; return what the first ten elements of each held before."""
    seen = [float(a[:10].min()) for a in _returned_here]
    for a in _returned_here:
        a[:] = -2.0
    return seen


def with_temporaries(i: int) -> np.ndarray:
    """A result, after large temporaries were made and dropped."""
    for _ in range(4):
        scratch = np.ones(BIG) * i
        del scratch
    return np.full(BIG, float(i))


def arena_counts(_: int) -> tuple[int, dict[str, int]]:
    """This worker's pid and what its arenas did."""
    time.sleep(0.05)  # so that every worker takes items
    return os.getpid(), dict(_arena.counts)


def _shmem_bytes() -> int:
    """Shared memory in use on this machine (tmpfs, memfd, shared mappings), from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def _fds() -> set[str]:
    """Open descriptors, once closed workers are reaped and background closes are done."""
    deadline = time.monotonic() + 10
    while mp.active_children() and time.monotonic() < deadline:  # active_children() also reaps
        time.sleep(0.01)
    _releaser.wait_for_releases()
    return set(os.listdir("/proc/self/fd"))


def _count_fresh_names(monkeypatch) -> list[str]:
    """Record the fresh segment names the parent hands out (recycled objects need none)."""
    made: list[str] = []
    generate = call_module._names.generate

    def counting(*args):
        made.append(generate(*args))
        return made[-1]

    monkeypatch.setattr(call_module._names, "generate", counting)
    return made


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", START_METHODS)
def test_results_in_order_from_every_start_method(method, copy):
    """Frames come back equal and in order, in several calls on the same workers; close leaves no descriptor."""
    shmalloc.map(abs, [1], start_method=method)  # starts the forkserver or resource tracker, once
    fds = _fds()
    with shmalloc.Pool(2, start_method=method) as pool:
        pids = set(pool.map(pid_of, range(4)))
        for _ in range(3):
            got = pool.map(frame, range(5), copy=copy)
            for i, df in enumerate(got):
                pd.testing.assert_frame_equal(df, frame(i))
            del got
            gc.collect()
        assert set(pool.map(pid_of, range(4))) == pids  # the same workers all along
    assert _fds() == fds


@pytest.mark.parametrize("copy", [True, False])
def test_second_call_reuses_the_objects_of_the_first(monkeypatch, copy):
    """Once the first results are consumed (copy=True) or freed (copy=False), no fresh segment is made."""
    made = _count_fresh_names(monkeypatch)
    with shmalloc.Pool(2, start_method="fork") as pool:
        first = pool.map(full, range(2), copy=copy)
        assert len(made) == 2
        del first
        gc.collect()
        second = pool.map(full, [5, 6], copy=copy)
        assert len(made) == 2
        np.testing.assert_array_equal(second[0], full(5))
        np.testing.assert_array_equal(second[1], full(6))


def test_live_copy_false_results_are_never_overwritten(monkeypatch):
    """While a copy=False result lives, its object is not handed to a worker; writes to it stay private."""
    made = _count_fresh_names(monkeypatch)
    with shmalloc.Pool(2, start_method="fork") as pool:
        kept = pool.map(full, range(2), copy=False)
        assert kept[0].flags.writeable and kept[0].flags.owndata
        kept[0][:10] = -1.0  # a private write
        for k in range(3):
            again = pool.map(full, [10 + k, 20 + k], copy=False)
            np.testing.assert_array_equal(again[0], full(10 + k))
            del again
            gc.collect()
        assert len(made) == 4  # the two live results' objects were never reused
        np.testing.assert_array_equal(kept[1], full(1))
        assert (kept[0][:10] == -1).all() and (kept[0][10:] == 0).all()


def _child_reads(conn, array) -> None:
    conn.recv()  # wait until the parent has freed its results and run the pool again
    conn.send(float(array.sum()))


def test_fork_while_lent_retires_the_object(monkeypatch):
    """A child forked while a copy=False result lives keeps seeing that result after the parent freed it."""
    made = _count_fresh_names(monkeypatch)
    ctx = mp.get_context("fork")
    with shmalloc.Pool(1, start_method="fork") as pool:
        (result,) = pool.map(full, [7], copy=False)
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_child_reads, args=(child_end, result))
        child.start()
        try:
            del result
            gc.collect()
            np.testing.assert_array_equal(pool.map(full, [9], copy=False)[0], full(9))
            assert len(made) == 2  # not reused: the child still maps it
            parent_end.send("read")
            assert parent_end.recv() == 7.0 * N
        finally:
            child.join(10)
            if child.exitcode is None:
                child.kill()
                child.join()


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Shmem is read from /proc/meminfo")
@pytest.mark.parametrize("method", START_METHODS)
def test_copy_false_results_are_writable_private_and_freed_under_every_start_method(method):
    """A copy=False result is writable; the parent's writes reach no worker, and a worker's later writes into the
    array it returned (and kept) never reach the parent; a child forked while it lives keeps its view; dropped, its
    object serves again; temporaries do not pile up; after close() Shmem is back at its level."""
    shmem_before = _shmem_bytes()
    ctx = mp.get_context("fork")
    with shmalloc.Pool(2, start_method=method) as pool:
        for _ in range(3):  # the workers' spares grow to what the tasks want: results are made in them
            assert [a[0] for a in pool.map(with_temporaries, range(4), copy=False)] == [0, 1, 2, 3]
            gc.collect()
        results = pool.map(returned_and_kept, range(4), copy=False)
        for a in results:
            assert a.flags.writeable and a.flags.owndata and get_handler_name(a) == "shmalloc"
            a[:10] = -1.0  # the parent's writes
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_child_reads, args=(child_end, results[1]))
        child.start()
        try:
            seen = [v for worker_seen in pool.map(write_into_returned, range(8)) for v in worker_seen]
            assert seen and set(seen) <= {0.0, 1.0, 2.0, 3.0, -2.0}  # never the parent's -1
            for i, a in enumerate(results):  # never the workers' -2
                assert (a[:10] == -1.0).all() and (a[10:] == i).all()
            del results, a
            gc.collect()
            for _ in range(3):  # the objects come back and serve again; the temporaries stay in the workers
                again = pool.map(with_temporaries, range(4), copy=False)
                for i, a in enumerate(again):
                    assert a[0] == i and a[-1] == i
                del again, a
                gc.collect()
            # The child's result (32 MB) and the spares live, each the size of its task's arena (4 x about 128 MB);
            # 48 temporaries of 32 MB piling up in shared memory would add 1.5 GB.
            assert _shmem_bytes() - shmem_before < 800 << 20
            parent_end.send("read")
            assert parent_end.recv() == float(BIG - 10 - 10)  # what results[1] held when the child was forked
            counts: Counter = Counter()
            for counted in dict(pool.map(arena_counts, range(8), chunksize=1)).values():
                counts.update(counted)
            assert counts["in place"] and counts["frozen"]  # results made where they were shipped, and kept
        finally:
            child.join(10)
            if child.exitcode is None:
                child.kill()
                child.join()
    _releaser.wait_for_releases()
    held = shmalloc.held_objects()
    ours = held[(held["pid"] == os.getpid()) & held["name"].str.startswith(_names.PREFIX)]  # not multiprocessing's semaphores
    assert ours.empty, ours  # no descriptor or mapping of an object of shmalloc's is left here
    # 4 results x 32 MB lived, and up to that much in spares: all of it is gone. Shmem is the machine's:
    # give what other programs hold a moment to go.
    deadline = time.monotonic() + 10
    while _shmem_bytes() - shmem_before >= 16 << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _shmem_bytes() - shmem_before < 16 << 20


def test_spares_are_bounded_by_the_last_three_calls():
    """Between calls the pool keeps at most 1.25 times the bytes of the largest of its last three calls in free
    spares: a small call between large ones keeps their spares, three small ones give them back."""
    with shmalloc.Pool(2, start_method="fork") as pool:
        pool.map(sized, [4 << 20] * 4)
        big = sum(spare.size for spare in pool._spares.free)
        assert big >= 8 << 20
        pool.map(sized, [1 << 20])
        assert sum(spare.size for spare in pool._spares.free) == big  # kept for the next large call
        pool.map(sized, [1 << 20])
        pool.map(sized, [1 << 20])
        kept = sum(spare.size for spare in pool._spares.free)
        assert kept <= 1.25 * 2 * ((1 << 20) + 2 * _format.PAGE)  # a result made in its spare counts up to twice


def test_a_spare_is_shrunk_for_a_small_result_only_if_the_result_outlives_two_calls():
    """A copy=False result much smaller than its spare leaves the spare's pages alone during its call and the next
    (a loop that rebinds its results frees them then); still alive when the call after begins, it has the pages
    past it freed, and they are filled in again before a task gets the spare."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(sized, [16 << 20])
        [spare] = pool._spares.free

        def allocated() -> int:
            return os.fstat(spare.fd).st_blocks * 512

        assert allocated() >= 16 << 20
        small = pool.map(sized, [1 << 20], copy=False)
        assert pool._spares.lent == [spare] and allocated() >= 16 << 20
        # Results kept alive, each in a new object (the spare is lent), which keep the budget at 16 MB.
        kept = [pool.map(sized, [16 << 20], copy=False)]  # the small result outlives its call
        assert allocated() >= 16 << 20
        kept.append(pool.map(sized, [16 << 20], copy=False))  # ... and the next: it is kept for long
        assert allocated() < 4 << 20 and spare.size >= 16 << 20
        assert int(small[0].sum()) == 1 << 20
        del small
        gc.collect()
        assert list(pool._spares.free) == [spare]
        big = pool.map(sized, [16 << 20], copy=False)
        assert allocated() >= 16 << 20 and int(big[0].sum()) == 16 << 20 and spare in pool._spares.lent


def test_recycle_false_makes_fresh_objects(monkeypatch):
    """recycle=False: every result gets its own fresh segment, nothing is kept."""
    made = _count_fresh_names(monkeypatch)
    with shmalloc.Pool(2, start_method="fork", recycle=False) as pool:
        for _ in range(2):
            assert [a[0] for a in pool.map(full, range(2))] == [0.0, 1.0]
        assert len(made) == 4 and not pool._spares.free


def test_simulated_enospc_falls_back_to_the_pipe(monkeypatch):
    """A full /dev/shm while filling a recycled object: the result comes through the pipe, with a warning."""

    write = _posix.write

    def no_space(fd, name, *args):
        if name != protocol_module.SPARE:  # fresh segments (copy2shm) still fill
            return write(fd, name, *args)
        raise shmalloc.ShmError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(full, [0])  # a spare now exists; the next worker is forked with the patch
        pool.terminate()
    monkeypatch.setattr(_posix, "write", no_space)
    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(full, [0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = pool.map(full, [3])
        np.testing.assert_array_equal(got[0], full(3))
        assert [w.category for w in caught] == [shmalloc.ShmFallbackWarning]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"processes": 0}, ValueError),
        ({"processes": 1.5}, ValueError),
        ({"pipe_limit": -1}, ValueError),
        ({"recycle": 1}, TypeError),
        ({"start_method": "teleport"}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        shmalloc.Pool(**kwargs)


def test_closed_pool_and_bad_map_arguments():
    """Clear errors: an unpicklable item, a closed pool, bad arguments."""
    pool = shmalloc.Pool(1, start_method="fork")
    with pytest.raises(ValueError):
        pool.map(full, range(2), chunksize=0)
    with pytest.raises(TypeError):
        pool.map(full, range(2), copy="yes")
    assert pool.map(full, []) == []
    with pytest.raises(TypeError, match="could not be pickled"):
        pool.map(full, [threading.Lock()])
    assert pool.map(full, [2])[0][0] == 2.0  # usable after each error
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.map(full, range(2))


def test_killed_parent_leaves_nothing_in_dev_shm(tmp_path):
    """A killed parent leaves no segment (spares have no name), and its workers exit (they see EOF).

    subprocess.run returns only once every holder of the child's stdout, its workers too, is gone.
    """
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            import numpy as np, shmalloc
            sys.path.insert(0, sys.argv[1])
            from test_pool import full
            pool = shmalloc.Pool(2, start_method="fork")
            pool.map(full, range(4))
            kept = pool.map(full, range(4), copy=False)
            print(os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = done.stdout.strip()
    assert pid and not [n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{pid}_")]


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_whose_parent_was_killed_mid_task_exit_quietly_and_leave_nothing(tmp_path, method):
    """Workers that finish their task after their parent was killed find no one to answer: they exit, remove
    the segments they wrote their results into (under names the parent gave, in a pool's first call), and
    print no traceback of the broken pipe into the terminal they share with it."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys, threading, time
            import numpy as np, shmalloc

            def work(i):
                time.sleep(1.5)
                return np.full(1 << 17, float(i))  # 1 MB: into a segment

            def kill_parent():
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGKILL)

            if __name__ == "__main__":
                print(os.getpid(), flush=True)
                with shmalloc.Pool(2, start_method=sys.argv[1]) as pool:
                    threading.Thread(target=kill_parent, daemon=True).start()
                    pool.map(work, range(2), chunksize=1)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
    pid = done.stdout.strip()
    assert pid and not [n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{pid}_")]


def test_idle_worker_killed_between_calls_is_replaced():
    """A worker that dies while idle costs nothing: the next call starts a new one and succeeds."""
    with shmalloc.Pool(2, start_method="fork") as pool:
        pids = set(pool.map(pid_of, range(4)))
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(w.process.pid == victim and w.process.is_alive() for w in pool._workers):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        got = pool.map(full, range(6))
        assert [a[0] for a in got] == [float(i) for i in range(6)]
        assert victim not in set(pool.map(pid_of, range(4)))


def draw(i: int) -> tuple[float, float]:
    return float(np.random.default_rng(shmalloc.item_seed()).random()), float(np.random.random())


def test_seed_gives_the_same_draws_as_map():
    """With a seed, item i draws the same numbers in a Pool as in shmalloc.map, whatever the chunking."""
    want = shmalloc.map(draw, range(6), processes=2, seed=5)
    with shmalloc.Pool(2, start_method="fork") as pool:
        assert pool.map(draw, range(6), seed=5, chunksize=4) == want
        assert pool.map(draw, range(6), seed=6) != want


def test_progress_bar(capsys):
    """progress=True shows a bar that reaches the number of items."""
    pytest.importorskip("tqdm")
    with shmalloc.Pool(2, start_method="fork") as pool:
        assert len(pool.map(full, range(3), progress=True)) == 3
    assert "3/3" in capsys.readouterr().err


def _shm_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("/dev/shm/" in line for line in maps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_workers_refill_through_mappings_and_unmap_released_spares():
    """Workers keep a mapping of the spares they fill; when the parent releases a spare, they unmap it before the call returns."""
    with shmalloc.Pool(2, start_method="fork") as pool:
        pids = [w.process.pid for w in pool._workers]
        inherited = [_shm_mappings(pid) for pid in pids]  # the parent's, at fork
        for _ in range(3):  # from the second call on, refills go through the workers' mappings
            got = pool.map(sized, [4 << 20] * 2)
            assert all(a.sum() == 4 << 20 for a in got)
        assert [_shm_mappings(pid) - n for pid, n in zip(pids, inherited, strict=True)] == [1, 1]
        for _ in range(_spares.RECENT_CALLS):
            pool.map(sized, [1 << 20] * 2)  # the spares exceed what the last calls returned: released
        assert not pool._spares.free and not pool._spares.dropped
        assert [_shm_mappings(pid) - n for pid, n in zip(pids, inherited, strict=True)] == [0, 0]
        assert [a.sum() for a in pool.map(sized, [1 << 20] * 2)] == [1 << 20] * 2  # the workers still serve


def ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 7 + n


def test_growing_and_shrinking_results_through_recycled_objects():
    """Results of changing sizes, through objects that only grow and mappings that may be too small, stay exact."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        for n in [300_000, 300_000, 600_000, 100_000, 600_000, 150_000, 800_000, 700_000, 800_000, 750_000]:
            for copy in (True, False):
                (got,) = pool.map(ramp, [n], copy=copy)
                np.testing.assert_array_equal(got, ramp(n))


def test_close_in_a_forked_child_leaves_the_parents_workers_alone():
    """A forked child that closes the Pool it inherited does not kill the parent's workers, and the parent's next call works."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        worker_pid = pool._workers[0].process.pid
        child = os.fork()
        if child == 0:
            try:
                pool.close()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        # WNOWAIT: look without reaping (the pool must still reap its worker itself)
        ended = os.waitid(os.P_PID, worker_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert ended is None, f"the parent's worker was killed by the child's close(): {ended}"
        assert pool.map(abs, [-1, -2]) == [1, 2]


def test_forked_child_leaving_a_with_block_or_dropping_the_pool_leaves_the_parents_workers_alone():
    """A forked child whose with block ends, or that drops the Pool, neither stops the parent's workers nor may map on them."""
    pool = shmalloc.Pool(1, start_method="fork")
    try:
        worker_pid = pool._workers[0].process.pid
        child = os.fork()
        if child == 0:
            code = 1
            try:
                with pool:
                    try:
                        pool.map(abs, [1])
                    except RuntimeError as exc:
                        code = 0 if "forked child" in str(exc) else 2
                pool.__del__()  # what the garbage collector calls
                pool.terminate()
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "map in the child was not refused with a RuntimeError"
        ended = os.waitid(os.P_PID, worker_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert ended is None, f"the parent's worker was stopped by the child: {ended}"
        assert pool.map(abs, [-1, -2]) == [1, 2]
    finally:
        pool.close()


def test_fork_between_mapping_a_result_and_lending_its_object_retires_the_object(monkeypatch):
    """A child forked after a copy=False result's arrays were mapped but before its object was lent keeps seeing that result."""
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    consume = _transfer.read
    forked: list[int] = []

    def consume_then_fork(segment, handle, copy):
        read = consume(segment, handle, copy)
        value = read.value
        if not forked:
            pid = os.fork()
            if pid == 0:  # the child reads the result it inherited once the parent reused its spares
                try:
                    child_end.recv()
                    child_end.send(float(value.sum()) if isinstance(value, np.ndarray) else -1.0)
                finally:
                    os._exit(0)
            forked.append(pid)
        return read

    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(full, [1], copy=True)  # the next call gets a spare
        monkeypatch.setattr(_transfer, "read", consume_then_fork)
        (result,) = pool.map(full, [7], copy=False)
        monkeypatch.setattr(_transfer, "read", consume)
        try:
            assert forked
            del result
            gc.collect()
            np.testing.assert_array_equal(pool.map(full, [9], copy=False)[0], full(9))
            parent_end.send("read")
            assert parent_end.poll(30) and parent_end.recv() == 7.0 * N
        finally:
            os.kill(forked[0], signal.SIGKILL)  # it answered already, or waits for a message that never comes
            os.waitpid(forked[0], 0)


_UNSENDABLE_SPARE = textwrap.dedent(
    """
    import errno, sys
    import numpy as np
    import shmalloc
    from shmalloc.parallel import _protocol

    def refuse(conn, fd, pid):
        raise OSError(errno.EMFILE, "Too many open files")

    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(np.ones, [100_000])  # its object becomes the spare of the next call
        real, _protocol.send_descriptor = _protocol.send_descriptor, refuse
        try:
            pool.map(np.ones, [100_000])
        except shmalloc.WorkerDiedError as exc:
            print("WorkerDiedError", exc.index)
        _protocol.send_descriptor = real
        print(float(pool.map(np.ones, [100_000])[0].sum()))
    """
)


def test_a_spare_that_cannot_be_sent_to_a_live_worker_is_an_error_not_a_hang():
    """If a spare's descriptor cannot be sent (EMFILE) the waiting worker is ended and the item reported, and the pool goes on."""
    proc = subprocess.run([sys.executable, "-c", _UNSENDABLE_SPARE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["WorkerDiedError", "0", "100000.0"]
