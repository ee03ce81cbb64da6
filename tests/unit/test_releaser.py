"""The background releaser: large consumed objects are closed off the caller's path, and no thread of
shmalloc is alive when the process forks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import shmalloc
from shmalloc import _posix, _releaser

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

LARGE = _releaser.RELEASE_LATER_BYTES  # consumed objects this large are closed by the releaser


def _consume_large(count: int = 1) -> None:
    for _ in range(count):
        shmalloc.allocate_from_shm(shmalloc.copy2shm(np.zeros(LARGE, np.uint8)), copy=True)


def _releaser_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shmalloc-release"]


def _fork_and_report(child_report) -> tuple[str, list[warnings.WarningMessage]]:
    """Fork; the child writes ``child_report()`` to a pipe and exits. Returns it and the parent's warnings."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.write(write_end, child_report().encode())
            finally:
                os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    return report, list(caught)


def _held_consumed_objects() -> str:
    """The shared memory objects this process holds open (deleted ones: consumed), one a line."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/shmalloc_"):
            held.append(target)
    return "\n".join(held)


# The parent's thread count right after each fork (after shmalloc's after-fork hook, which starts nothing).
_threads_after_fork: list[int] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=lambda: _threads_after_fork.append(len(os.listdir("/proc/self/task"))))


def test_no_thread_of_shmalloc_is_alive_at_a_fork():
    """With the releaser busy, a fork finds no other thread in the process (so Python 3.12+ does not warn),
    and the releaser comes back for the next large object."""
    _consume_large(3)
    assert _releaser_threads(), "the releaser did not start: the test proves nothing"
    report, caught = _fork_and_report(lambda: "ran")
    assert report == "ran" and _threads_after_fork[-1] == 1
    assert not [w for w in caught if "multi-threaded" in str(w.message)]
    assert not _releaser_threads()
    _consume_large()
    assert _releaser_threads()
    _releaser.wait_for_releases()


def test_a_child_inherits_no_descriptor_waiting_to_be_closed(monkeypatch):
    """Descriptors queued for the background close when the process forks are closed before the fork
    (even while the releaser is slow in a close): the child holds no consumed object."""
    real_lib = _posix.lib

    class SlowClose:  # the background close takes a while, so that more stay queued
        def __getattr__(self, attr):
            return getattr(real_lib, attr)

        def shmalloc_close(self, fd):
            if threading.current_thread().name == "shmalloc-release":
                time.sleep(0.2)
            return real_lib.shmalloc_close(fd)

    monkeypatch.setattr(_posix, "lib", SlowClose())
    _consume_large(3)
    report, caught = _fork_and_report(_held_consumed_objects)
    assert report == ""
    assert not [w for w in caught if "multi-threaded" in str(w.message)]
    monkeypatch.undo()
    assert _held_consumed_objects() == ""  # the parent closed them too: nothing was lost


@pytest.mark.allow_fork_with_threads
def test_forks_while_another_thread_hands_over_descriptors_never_deadlock():
    """Forks from one thread while another consumes large objects (and so calls close_later) all
    complete, every child runs, and every descriptor is closed in the end."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            while not stop.is_set():
                _consume_large()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        for _ in range(30):
            report, _ = _fork_and_report(lambda: "ran")
            assert report == "ran"
    finally:
        stop.set()
        consumer.join(60)
    assert not consumer.is_alive() and not errors, errors
    _releaser.wait_for_releases()
    assert _held_consumed_objects() == ""


@pytest.mark.allow_fork_with_threads
@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python warns about forks with threads since 3.12")
def test_the_fork_warning_is_seen_where_the_suite_looks_for_it():
    """A fork while a thread runs gives the warning that tests/conftest.py turns into a failure, and
    recording warnings around the fork catches it (proof that the check can fail)."""
    release = threading.Event()
    sleeper = threading.Thread(target=release.wait)
    sleeper.start()
    try:
        _, caught = _fork_and_report(lambda: "")
    finally:
        release.set()
        sleeper.join()
    assert [w for w in caught if "is multi-threaded, use of fork()" in str(w.message)]


def test_wait_for_releases_returns_once_all_are_closed():
    """wait_for_releases blocks until every queued descriptor is closed, also across a fork."""
    _consume_large(2)
    _releaser.wait_for_releases()
    assert _held_consumed_objects() == ""
    _consume_large(2)
    _fork_and_report(lambda: "")
    _releaser.wait_for_releases()  # must not hang: the fork took over the queue
    assert _held_consumed_objects() == ""


# A signal handler forks while the main thread is inside _Releaser.close_later (starting the
# releaser thread); the child carries on where the main thread was. The placeholder names the
# line of Thread.start() where the signal arrives.
_FORK_IN_HANDLER_DURING_START = textwrap.dedent(
    """
    import inspect, os, signal, sys, threading
    import numpy as np
    import shmalloc
    from shmalloc import _releaser

    _releaser.STOP_TIMEOUT = 3600.0  # a fork that waits for it fails the test's deadline
    child = []
    thread_at_fork = []

    def handler(*args):
        thread = _releaser._releaser._thread
        thread_at_fork.append(thread is not None and thread.is_alive())
        pid = os.fork()
        if pid == 0:
            child.append(1)
            return
        os.waitpid(pid, 0)

    signal.signal(signal.SIGUSR1, handler)
    src, first = inspect.getsourcelines(threading.Thread.start)
    line = first + next(k for k, text in enumerate(src) if LINE in text)
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not threading.Thread.start.__code__ or frame.f_locals["self"].name != "shmalloc-release":
            return None
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGUSR1)
            return local
        return local

    handle = shmalloc.copy2shm(np.ones(3_000_000))  # large: consuming it hands the descriptor to the releaser
    sys.settrace(tracer)
    try:
        result = repr(bool((shmalloc.allocate_from_shm(handle) == 1).all()))
        _releaser.wait_for_releases()  # every queued close runs (no descriptor stranded)
    except BaseException as exc:
        result = repr(exc)
    sys.settrace(None)
    result += f" fired={bool(fired)} alive_at_fork={thread_at_fork}"
    if child:
        with open(sys.argv[1], "w") as out:
            out.write(result)
        os._exit(0)
    print(result)
    """
)


def _run_fork_in_handler_during_start(tmp_path, line: str) -> tuple[str, str]:
    report = tmp_path / "child.txt"
    script = _FORK_IN_HANDLER_DURING_START.replace("LINE", repr(line))
    proc = subprocess.run([sys.executable, "-c", script, str(report)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip(), report.read_text()


def test_child_of_a_fork_in_a_signal_handler_during_close_later_consumes_normally(tmp_path):
    """The child of a fork made by a signal handler while the releaser thread was being started finishes its allocate_from_shm."""
    parent, child = _run_fork_in_handler_during_start(tmp_path, "self._started.wait()")
    assert parent.startswith("True fired=True") and child.startswith("True fired=True"), (parent, child)


def test_fork_in_a_signal_handler_before_the_releaser_thread_exists_does_not_wait_for_it(tmp_path):
    """A fork made by a signal handler inside Thread.start() before the OS thread exists goes ahead, and both sides then consume normally."""
    parent, child = _run_fork_in_handler_during_start(tmp_path, "_limbo[self] = self")
    # Not alive at the fork: the old code waited STOP_TIMEOUT (here an hour) for it.
    assert parent == child == "True fired=True alive_at_fork=[False]", (parent, child)
