"""Spares of shmalloc.Pool stay within a share of /dev/shm, come back when results are freed, give way to writes, and are listed.

The space cases run in a child process inside its own mount namespace
(``unshare -m``) over a 64 MB tmpfs at /dev/shm (Docker's default), so that
``df`` figures and ENOSPC are this test's alone.
"""
from __future__ import annotations

import gc
import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from engines import wait_until

import shmalloc
import shmalloc.parallel._pool as pool_module
from shmalloc import _releaser
from shmalloc.parallel import _spares
from shmalloc.tools import _cleanup
from shmalloc.tools._cli import main

MB = 1 << 20


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.uint8)


def full(i: int) -> np.ndarray:
    return np.full(MB // 8, i, dtype=np.float64)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # exited and reaped
    return True


def run_in_small_shm(script: str, mb: int = 64) -> dict:
    """Run ``script`` over a private tmpfs of ``mb`` MB at /dev/shm; return its last line as JSON."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    shell = f'mount -t tmpfs -o size={mb}m tmpfs /dev/shm && exec "$0" -c "$1"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, sys.executable, script], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("mount" in proc.stderr or "unshare" in proc.stderr) and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"the process failed (status {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


_SPACE_SCRIPT = textwrap.dedent(
    """
    import json, os, numpy as np, shmalloc
    MB = 1 << 20

    def twenty(i):
        return np.full(20 * MB // 8, float(i))

    def used_mb():
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bavail) * st.f_frsize / MB

    def write_30mb(make):
        try:
            made = make()
        except shmalloc.ShmError as exc:
            return f"errno {exc.errno}"
        del made
        return "ok"

    def copy2shm_30mb():
        handle = shmalloc.copy2shm(np.ones(30 * MB // 8))
        shmalloc.unlink(handle)

    report = {}
    for label, limit in (("default", None), ("whole", 1.0)):
        kwargs = {} if limit is None else {"spare_limit": limit}
        with shmalloc.Pool(2, start_method="fork", **kwargs) as pool:
            for _ in range(2):  # the second call refills the spares: the workers map them
                results = pool.map(twenty, range(2))
                right = [float(r[0]) for r in results] == [0.0, 1.0]
                del results
            outcome = {"right": right, "idle_used_mb": used_mb(), "kept": len(pool._spares.free)}
            outcome["copy2shm"] = write_30mb(copy2shm_30mb)
            outcome["kept_after"] = len(pool._spares.free)
            again = pool.map(twenty, [5, 6])
            outcome["still_serves"] = [float(r[-1]) for r in again] == [5.0, 6.0]
            del again
            if limit is not None:  # spares again, then a ShmArray that needs their space
                pool.map(twenty, range(2))
                outcome["kept_again"] = len(pool._spares.free)
                outcome["shmarray"] = write_30mb(lambda: shmalloc.ShmArray.zeros(30 * MB // 8))
        report[label] = outcome
    report["left"] = os.listdir("/dev/shm")
    report["end_used_mb"] = used_mb()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def space_report() -> dict:
    return run_in_small_shm(_SPACE_SCRIPT)


def test_idle_pool_leaves_room_in_a_64mb_shm(space_report):
    """After a pool returned 2x20 MB twice in a 64 MB /dev/shm, its spares take at most a quarter and a 30 MB copy2shm succeeds."""
    outcome = space_report["default"]
    assert outcome["right"] and outcome["still_serves"], outcome
    assert outcome["idle_used_mb"] <= 16.5, outcome  # a quarter of 64 MB, and a page or two
    assert outcome["copy2shm"] == "ok", outcome


def test_full_shm_takes_the_space_of_spares(space_report):
    """With spare_limit=1.0 the spares fill /dev/shm; a 30 MB copy2shm or ShmArray then gets their space and succeeds."""
    outcome = space_report["whole"]
    assert outcome["right"] and outcome["kept"] == 2 and outcome["idle_used_mb"] >= 40, outcome
    assert outcome["copy2shm"] == "ok" and outcome["kept_after"] == 0, outcome
    assert outcome["still_serves"] and outcome["kept_again"] == 2, outcome
    assert outcome["shmarray"] == "ok", outcome


def test_nothing_left_after_the_pools(space_report):
    """Closed pools leave /dev/shm empty, and its space free."""
    assert space_report["left"] == [] and space_report["end_used_mb"] < 1, space_report


def test_dropped_copy_false_results_come_back_without_another_call():
    """Descriptors of dropped copy=False results beyond the budget are closed without waiting for the next call."""
    with shmalloc.Pool(2, start_method="fork") as pool:
        pool.map(full, range(4), copy=False)  # spares exist: later calls refill them
        _releaser.wait_for_releases()
        idle = _fd_count()
        kept = [pool.map(full, range(4), copy=False) for _ in range(5)]
        assert len(pool._spares.lent) == 20 and _fd_count() >= idle + 16
        assert all(float(r[0]) == i for results in kept for i, r in enumerate(results))
        del kept
        gc.collect()
        # The last call returned 4 results: 1.25 times their bytes allows 5 objects like theirs.
        wait_until(lambda: _fd_count() <= idle + 1 and not pool._spares.lent, "the descriptors were kept")
        budget = 1.25 * pool._spares.call_bytes
        assert sum(spare.size for spare in pool._spares.free) <= budget
        again = pool.map(full, [7, 8], copy=False)
        assert [float(a[-1]) for a in again] == [7.0, 8.0]


@pytest.mark.allow_fork_with_threads  # the test's own threads run while workers start
def test_results_freed_in_another_thread_while_the_pool_maps():
    """copy=False results freed by another thread while the pool maps never corrupt later results or leak."""
    handoff: queue.Queue = queue.Queue()

    def drop_them() -> None:
        while (results := handoff.get()) is not None:
            del results
            gc.collect()

    dropper = threading.Thread(target=drop_them)
    dropper.start()
    try:
        with shmalloc.Pool(2, start_method="fork") as pool:
            for k in range(30):
                results = pool.map(full, [k, k + 1, k + 2], copy=False)
                assert [(float(r.min()), float(r.max())) for r in results] == [(k + i, k + i) for i in range(3)]
                handoff.put(results)
                del results
    finally:
        handoff.put(None)
        dropper.join(60)
    assert not dropper.is_alive()


def test_spare_limit_in_bytes_bounds_the_spares():
    """spare_limit=<bytes> caps the free spares at that many bytes; 0 keeps none between calls."""
    with shmalloc.Pool(2, start_method="fork", spare_limit=3 * MB) as pool:
        pool.map(ones, [MB] * 4)
        kept = [spare.size for spare in pool._spares.free]
        assert 0 < sum(kept) <= 3 * MB and len(kept) == 2  # each object holds 1 MB and a page or two
    with shmalloc.Pool(2, start_method="fork", spare_limit=0) as pool:
        assert [a.size for a in pool.map(ones, [MB] * 3)] == [MB] * 3
        assert not pool._spares.free


@pytest.mark.parametrize(
    "limit, error",
    [(True, TypeError), ("25%", TypeError), (None, TypeError), (1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (-1, ValueError)],
)
def test_bad_spare_limit(limit, error):
    """A spare_limit that is neither a share in [0, 1] nor a number of bytes >= 0 is refused, naming the parameter."""
    with pytest.raises(error, match="spare_limit"):
        shmalloc.Pool(1, start_method="fork", spare_limit=limit)


def test_default_share_is_a_quarter():
    """By default the spares may take a quarter of what is free in /dev/shm."""
    assert _spares.DEFAULT_LIMIT == 0.25


# ---- listing the space spares hold ----

_CHILD_WITH_SPARES = textwrap.dedent(
    """
    import sys, numpy as np, shmalloc
    def ones(n):
        return np.ones(n, dtype=np.uint8)
    with shmalloc.Pool(1, start_method="fork") as pool:
        pool.map(ones, [3 << 20])
        print(sum(spare.size for spare in pool._spares.free), flush=True)
        sys.stdin.read()
    """
)


def test_ls_shows_spares_held_in_this_process_and_in_a_child(capsys):
    """held_objects() and `ls` list the unlinked spares of a pool here and in a child, with size, pid and command."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_WITH_SPARES], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child_bytes = int(child.stdout.readline())
        with shmalloc.Pool(1, start_method="fork") as pool:
            pool.map(ones, [2 << 20])
            mine = {os.fstat(spare.fd).st_ino: spare.size for spare in pool._spares.free}
            held = shmalloc.held_objects()
            assert list(held.columns) == ["name", "size", "pid", "command", "fds", "maps", "inode"]
            here = held[(held["pid"] == os.getpid()) & held["inode"].isin(mine)]  # earlier tests' objects may still close
            there = held[held["pid"] == child.pid]
            assert dict(zip(here["inode"], here["size"], strict=True)) == mine and list(there["size"]) == [child_bytes]
            assert there["command"].iloc[0].startswith(sys.executable) and (here["fds"] == 1).all()
            assert all(name.startswith("/shmalloc_") for name in [*here["name"], *there["name"]])
            assert not set(here["name"]) & set(shmalloc.segments()["name"])  # not in /dev/shm's listing

            assert main(["ls"]) == 0
            out = capsys.readouterr().out
            assert "held open after unlink" in out
            lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("/shmalloc_")}
            for name, pid in [(here["name"].iloc[0], os.getpid()), (there["name"].iloc[0], child.pid)]:
                assert lines[name][3] == str(pid) and "python" in lines[name][6]  # NAME SIZE(2) PID FDS MAPS COMMAND

            listing = subprocess.run(
                [sys.executable, "-m", "shmalloc", "ls", "--json"], capture_output=True, text=True, timeout=120
            )
            assert listing.returncode == 0, listing.stderr
            rows = [row for row in json.loads(listing.stdout) if row["linked"] is False]
            assert {(row["pid"], row["size"]) for row in rows} >= {(os.getpid(), size) for size in mine.values()} | {(child.pid, child_bytes)}
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    _releaser.wait_for_releases()
    gone = shmalloc.held_objects()
    assert not gone["inode"].isin(mine).any() and not (gone["pid"] == child.pid).any()


def test_held_objects_lists_the_object_under_a_copy_false_result():
    """An object mapped only by the arrays of a copy=False result is listed with its mapping, until the arrays are freed."""
    handle = shmalloc.copy2shm(np.arange(MB, dtype=np.int64))
    array = shmalloc.allocate_from_shm(handle, copy=False)
    held = shmalloc.held_objects()
    row = held[(held["pid"] == os.getpid()) & (held["name"] == handle.name)]
    assert len(row) == 1 and row["fds"].iloc[0] == 0 and row["maps"].iloc[0] >= 1
    assert row["size"].iloc[0] == handle.size
    del array
    held = shmalloc.held_objects()
    assert handle.name not in set(held[held["pid"] == os.getpid()]["name"])


def test_held_objects_without_proc(monkeypatch):
    """Without /dev/shm (macOS) the listing of held objects is empty, not an error."""
    monkeypatch.setattr(_cleanup, "SHM_DIR", _cleanup.SHM_DIR / "does-not-exist")
    assert shmalloc.held_objects().empty


def test_pool_dropped_while_its_spares_are_held_closes_later():
    """A pool finalized in a thread that holds its spares' lock (a GC inside a locked section) closes later instead of deadlocking."""
    pool = shmalloc.Pool(1, start_method="fork")
    pool.map(full, [1])
    spares, worker_pid = pool._spares, pool._workers[0].process.pid
    with spares.held():
        del pool
        gc.collect()  # Pool.__del__ runs here
        assert not spares.closed
    wait_until(lambda: spares.closed and not spares.free, "the pool was never closed")
    wait_until(lambda: not _alive(worker_pid), "its worker was not stopped and reaped")


def test_interrupt_while_workers_unmap_leaves_the_pool_usable(monkeypatch):
    """A KeyboardInterrupt while waiting for the workers to unmap released spares leaves no stray answer: the next call is right."""
    with shmalloc.Pool(2, start_method="fork") as pool:
        pool.map(ones, [4 * MB] * 2)
        pool.map(ones, [4 * MB] * 2)  # the workers now map the two spares
        for _ in range(_spares.RECENT_CALLS - 1):  # the next small call is the last calls' largest
            pool.map(ones, [MB // 2])
        real_wait = pool_module.connection.wait

        def interrupted(*args, **kwargs):
            if sys._getframe(1).f_code.co_name == "_unmap_released":  # not the call's own waits
                monkeypatch.setattr(pool_module.connection, "wait", real_wait)
                raise KeyboardInterrupt
            return real_wait(*args, **kwargs)

        monkeypatch.setattr(pool_module.connection, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.map(ones, [MB // 2])  # releases both 4 MB spares, then waits for the workers
        assert not pool._spares.free
        got = pool.map(ones, [MB, 2 * MB, 3 * MB])
        assert [a.size for a in got] == [MB, 2 * MB, 3 * MB] and all((a == 1).all() for a in got)


def test_copy_false_results_come_back_at_once_and_start_no_thread():
    """Taking back the objects of freed copy=False results starts no thread (a later fork sees none of ours) and is done when the last array is freed."""
    before = set(threading.enumerate())
    with shmalloc.Pool(2, start_method="fork") as pool:
        kept = pool.map(full, range(4), copy=False)
        assert len(pool._spares.lent) == 4
        del kept
        gc.collect()
        assert pool._spares.lent == [] and len(pool._spares.free) == 4  # no waiting: the finalizers took them back
        assert set(threading.enumerate()) <= before
        again = pool.map(full, [5, 6], copy=False)
        with shmalloc.Pool(1, start_method="fork") as other:  # forks while objects are lent
            assert [float(a[0]) for a in other.map(full, [7], copy=False)] == [7.0]
        assert [float(a[0]) for a in again] == [5.0, 6.0]
        assert set(threading.enumerate()) <= before


def test_results_freed_while_the_lock_is_held_come_back_when_it_is_released():
    """An object freed while its pool's lock is held (here by this very thread) is taken back as the lock is released, not at a later call."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        kept = pool.map(full, range(3), copy=False)
        with pool._spares.held():
            del kept
            gc.collect()  # the finalizers cannot take the lock: they queue
            assert len(pool._spares.lent) == 3
        assert pool._spares.lent == [] and len(pool._spares.free) == 3


def _free_in_thread(results: list) -> None:
    del results[:]
    gc.collect()


def test_results_freed_in_another_thread_during_a_call_come_back_at_its_end():
    """Objects freed by another thread while a call holds the pool come back when that call ends, and the call's results are right."""
    with shmalloc.Pool(1, start_method="fork") as pool:
        kept = pool.map(full, range(3), copy=False)
        freer = threading.Thread(target=_free_in_thread, args=(kept,))
        with pool._spares.held():  # as a running call does
            del kept
            freer.start()
            freer.join(60)
            assert not freer.is_alive() and len(pool._spares.lent) == 3
        assert pool._spares.lent == [] and len(pool._spares.free) == 3
        assert [float(a[0]) for a in pool.map(full, range(3), copy=False)] == [0.0, 1.0, 2.0]


def test_terminate_and_map_where_this_thread_holds_the_spares_do_not_hang():
    """terminate() (as from a signal handler) in a thread that holds the spares' lock stops the pool when the lock is released; map() there is refused instead of hanging."""
    pool = shmalloc.Pool(2, start_method="fork")
    kept = pool.map(full, range(2), copy=False)
    pids = [worker.process.pid for worker in pool._workers]
    outcome: dict = {}

    def interrupted_take_back() -> None:
        with pool._spares.held():  # where a finalizer takes back freed results' objects
            try:
                pool.map(full, [1])
            except RuntimeError as exc:
                outcome["map"] = str(exc)
            pool.terminate()  # what a signal handler arriving here would call
            outcome["terminated"] = pool._closed
        outcome["workers"] = pool._workers

    runner = threading.Thread(target=interrupted_take_back, daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "terminate or map waited for the lock this thread holds"
    assert "works on the pool's spares" in outcome["map"] and outcome["terminated"] and len(outcome["workers"]) == 0
    wait_until(lambda: not any(_alive(pid) for pid in pids), "the workers were not stopped and reaped")
    assert [float(a[0]) for a in kept] == [0.0, 1.0]  # results stay readable
    del kept
    gc.collect()
    assert pool._spares.closed and not pool._spares.free


# A fork by another thread lands while Pool.map's thread is inside Spares.reclaim (between two
# bytecodes): a trace function makes that thread switch happen at one chosen line. Run in a
# separate interpreter: the bug closes and reuses descriptor numbers.
_FORK_DURING_RECLAIM = textwrap.dedent(
    """
    import inspect, os, sys, tempfile, threading
    import numpy as np
    import shmalloc
    from shmalloc.parallel import _spares

    def make(i):
        return np.full(200_000, float(i))

    src, first = inspect.getsourcelines(_spares.Spares.reclaim)
    line = first + next(k for k, text in enumerate(src) if "self.lent = still" in text)
    go, done = threading.Event(), threading.Event()

    def forker():
        go.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        done.set()

    threading.Thread(target=forker, daemon=True).start()
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not _spares.Spares.reclaim.__code__:
            return None
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not fired and frame.f_locals["still"]:
                fired.append(1)
                go.set()
                done.wait()
            return local
        return local

    with shmalloc.Pool(2, start_method="fork", pipe_limit=0) as pool:
        first_results = pool.map(make, [1, 2], copy=False)
        sys.settrace(tracer)
        second_results = pool.map(make, [3, 4], copy=False)
        sys.settrace(None)
        assert fired
        closed = []
        for spare in pool._spares.lent:
            try:
                os.fstat(spare.fd)
            except OSError:
                closed.append(spare.fd)
        user_files, keep = [], []
        for number in closed:  # the user's files take the freed descriptor numbers
            f = tempfile.TemporaryFile()
            while f.fileno() != number:
                keep.append(f)
                f = tempfile.TemporaryFile()
            f.write(b"user data " * 100)
            f.flush()
            user_files.append(f)
        del first_results
        pool.map(make, [5, 6], copy=True)
        for f in user_files:
            f.seek(0)
            assert f.read(10) == b"user data ", "a Pool result was written into the user's file"
        print("ok")
    """
)


def test_fork_by_another_thread_during_reclaim_never_writes_into_other_files():
    """A fork in another thread while a Pool call reclaims spares never makes a later call write into a descriptor the pool closed."""
    proc = subprocess.run([sys.executable, "-c", _FORK_DURING_RECLAIM], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


_EXECUTOR_FULL_SCRIPT = textwrap.dedent(
    """
    import json, os, warnings, numpy as np, shmalloc
    MB = 1 << 20

    def full(mb):
        return np.full(mb * MB // 8, 1.0)

    def free_bytes():
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize

    report = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shmalloc.ProcessPoolExecutor(1) as pool:
            pool.submit(full, 8).result()
            (spare,) = pool._spares.free
            report["before"] = os.fstat(spare.fd).st_size
            fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR, 0o600)
            os.posix_fallocate(fd, 0, free_bytes() - 4 * MB)  # 4 MB left: the spare cannot grow to 20 MB
            big = pool.submit(full, 20).result()
            report["right"] = big.size == 20 * MB // 8 and bool((big == 1.0).all())
            report["after"] = os.fstat(spare.fd).st_size
            report["recorded"] = [s.size for s in pool._spares.free]
            os.close(fd)
            os.unlink("/dev/shm/filler")
            report["used_mb"] = (os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize - free_bytes()) / MB
    report["warned"] = sum(issubclass(w.category, shmalloc.ShmFallbackWarning) for w in caught)
    report["left"] = os.listdir("/dev/shm")
    print(json.dumps(report))
    """
)


def test_an_executor_spare_that_cannot_grow_keeps_its_size():
    """A large result that does not fit into /dev/shm while growing an executor's spare comes back through the
    pipe (one ShmFallbackWarning), and the spare is cut back to its size: it takes no space its budget does not count."""
    report = run_in_small_shm(_EXECUTOR_FULL_SCRIPT)
    assert report["right"] and report["warned"] == 1
    assert report["after"] == report["before"] and report["recorded"] == [report["before"]]
    assert report["used_mb"] < 10 and report["left"] == []


_KEPT_ARRAYS_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, numpy as np, shmalloc
    from shmalloc import _releaser
    MB = 1 << 20
    KEPT = []

    def keeps(i):
        import __main__  # the worker's (fork): what it keeps lasts across tasks
        scratch = np.ones(4 * MB // 8)  # temporaries, made in the task's spare (it grows to at most twice the result)
        kept = np.full(MB // 8, 7.0)
        del scratch
        __main__.KEPT.append(kept)  # kept by the worker: its arena is frozen before the answer leaves
        return np.full(4 * MB // 8, float(i))

    def kept_values(_):
        import __main__
        return sorted({float(v) for k in __main__.KEPT for v in (k.min(), k.max())}), len(__main__.KEPT)

    def used_mb():
        _releaser.wait_for_releases()  # large objects are closed on its thread
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bavail) * st.f_frsize / MB

    report = {"right": True}
    pool = shmalloc.Pool(2, start_method="fork")
    for _ in range(5):  # the spares grow to what the tasks allocate; every region is frozen
        got = pool.map(keeps, range(4), copy=False)
        report["right"] &= [float(a[-1]) for a in got] == [0.0, 1.0, 2.0, 3.0]
        del got
        gc.collect()
    report["spares_mb"] = sum(spare.size for spare in pool._spares.free) / MB
    for _ in range(4):
        pool.map(abs, range(4))  # tiny results: the budget falls, and the spares are released
    report["released_used_mb"] = used_mb()
    report["kept"] = [seen for seen in pool.map(kept_values, range(4), chunksize=1)]
    for _ in range(3):  # spares again
        del pool.map(keeps, range(4), copy=False)[:]
        gc.collect()
    results = pool.map(keeps, range(4), copy=False)
    pool.close()
    report["closed_used_mb"] = used_mb()
    report["right"] &= [float(a[0]) for a in results] == [0.0, 1.0, 2.0, 3.0]
    del results
    gc.collect()
    report["end_used_mb"] = used_mb()
    print(json.dumps(report))
    """
)


def test_released_spares_and_kept_results_leave_their_space_though_workers_keep_arrays():
    """Workers keep arrays their tasks made in their spares (frozen arenas, which map those objects): once the pool
    releases the spares, their space is free all the same, and the kept arrays keep their values; copy=False results
    alive at close() keep only their own pages, not their spares'."""
    report = run_in_small_shm(_KEPT_ARRAYS_SCRIPT, mb=2048)
    assert report["right"], report
    assert report["spares_mb"] >= 4 * 5, report  # larger than the results: the temporaries were made in the spares
    # The pool holds nothing; the workers' kept arrays (1 MB a task) are their private memory.
    assert report["released_used_mb"] < 8, report
    for values, count in report["kept"]:
        assert values == [7.0] and count >= 1, report
    assert report["closed_used_mb"] <= 4 * 4 + 1, report  # the 4 results of 4 MB, and their headers
    assert report["end_used_mb"] < 1, report
