"""The background releaser: closes the descriptors of large consumed objects off the caller's path.

Closing the last descriptor of a large unlinked object frees its pages, which is
slow; a daemon thread does it instead, and is never alive at a fork.
"""
from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence

from . import _posix
from ._threads import wait_until_gone

#: (offset, length) ranges of an object.
Holes = Sequence[tuple[int, int]]

# Dropping the last reference to a large unlinked object frees its pages, which
# takes ~50 ms per 400 MB here; a background thread does that off the caller's path
# (copy=True of 400 MB: ~100 ms with it, ~160 ms without).
RELEASE_LATER_BYTES = 16 << 20
# How long a fork waits for the thread to finish the close it is in (~1 s per 8 GB).
STOP_TIMEOUT = 60.0
# How long a fork made by a signal handler inside close_later's Thread.start() waits for
# a thread that is not alive yet: if the OS thread exists it runs at once (we release the
# lock and the GIL); if the handler came before the OS thread was created, it never will.
START_GRACE = 1.0


class _Releaser:
    """A daemon thread that closes the descriptors of consumed objects, never alive at a fork.

    A library must not leave its user's process multi-threaded at a fork (Python
    3.12 warns, and a child of a multi-threaded process may deadlock). So, before
    every ``os.fork``, the thread finishes the close it is in and exits, and the
    forking thread closes what is still queued: the child inherits no descriptor
    waiting to be closed, and no thread of ours. The thread starts again at the
    next :meth:`close_later`.
    """

    def __init__(self) -> None:
        # Reentrant: a signal handler may fork while its thread is inside close_later.
        self._changed = threading.Condition(threading.RLock())
        self._queue: collections.deque[tuple[int, Holes]] = collections.deque()
        self._closing = 0  # descriptors the thread took and is closing
        self._thread: threading.Thread | None = None
        self._stop = False  # a fork is under way: the thread exits and no new one starts
        # True only while the lock's holder is inside Thread.start() of self._thread; seen
        # by _before_fork only when that holder is the forking thread (a signal handler).
        self._starting = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=self._before_fork,
                after_in_parent=self._after_fork_in_parent,
                after_in_child=self._after_fork_in_child,
            )

    def close_later(self, fd: int, holes: Holes = ()) -> None:
        """Free the ``holes`` of ``fd``'s object and close ``fd`` on the background thread."""
        with self._changed:
            self._queue.append((fd, holes))
            if self._thread is None and not self._stop:  # _stop: _before_fork closes the queue
                self._starting = True  # before _thread is set: see _before_fork
                self._thread = threading.Thread(target=self._run, name="shmalloc-release", daemon=True)
                try:
                    self._thread.start()
                except RuntimeError:
                    # A fork made by a signal handler inside start() may leave this Thread
                    # unstartable in the child (Python 3.13: "thread already started").
                    self._thread = None
                    self._close_queued()  # here, then: slower, never lost
                finally:
                    self._starting = False
            self._changed.notify_all()

    def wait(self) -> None:
        """Block until every submitted release has run."""
        with self._changed:
            while self._queue or self._closing:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._stop:
                    self._changed.wait()
                if self._stop:
                    self._thread = None
                    self._changed.notify_all()  # for _before_fork
                    return
                fd, holes = self._queue.popleft()
                self._closing += 1
            try:
                free_and_close(fd, holes)  # outside the lock: this is the slow part
            finally:
                with self._changed:
                    self._closing -= 1
                    self._changed.notify_all()

    def _close_queued(self) -> None:
        while self._queue:
            free_and_close(*self._queue.popleft())
        self._changed.notify_all()  # for wait()

    def _before_fork(self) -> None:
        self._changed.acquire()  # held across the fork: released in both after-fork hooks
        thread = self._thread
        if thread is not None:
            self._stop = True
            self._changed.notify_all()
            # wait() releases the lock however often this thread holds it (a signal handler
            # may fork inside close_later), so the thread can finish its close and exit.
            if not thread.is_alive() and self._starting:
                # This thread is inside thread.start() (the fork comes from a signal handler):
                # the OS thread may not exist yet, and cannot come to exist before the fork.
                self._changed.wait_for(lambda: self._thread is None, timeout=START_GRACE)
            if self._thread is not None and (thread.is_alive() or not self._starting):
                self._changed.wait_for(lambda: self._thread is None, timeout=STOP_TIMEOUT)
            if self._thread is None:
                thread.join()
                wait_until_gone([thread.native_id])
            # else: never started (its start() resumes after the fork, in parent and child
            # alike), or a close that takes minutes: fork with it rather than hang
        self._close_queued()  # rather here than pinning the objects' pages in the child

    def _after_fork_in_parent(self) -> None:
        self._stop = False
        self._close_queued()  # queued by a signal handler during the fork, if any
        self._changed.release()

    def _after_fork_in_child(self) -> None:
        # The same Condition: a close_later or wait() that the forking signal handler
        # interrupted carries on with it. Its RLock is owned by this (the forking) thread
        # only, as _before_fork acquired it: release that acquisition, keep the caller's.
        self._stop, self._closing = False, 0
        if not self._starting:
            self._thread = None  # no thread of the parent exists here
        # else: this thread is inside start() of self._thread, which runs here once start()
        # resumes (the OS thread did not exist at the fork).
        self._close_queued()
        self._changed.release()


_releaser = _Releaser()


def free_and_close(fd: int, holes: Holes = ()) -> None:
    """Free the pages of ``holes`` (offset, length) of ``fd``'s object, then close ``fd``, on this thread."""
    try:
        _posix.punch_parts(fd, "a released object", holes)
    except OSError:  # no hole punching here: the pages go when the last mapping does
        pass
    _posix.close(fd)


def release_fd(fd: int, size: int, holes: Holes = ()) -> None:
    """Close a descriptor; a large object's pages are freed on the background thread.

    ``holes``: (offset, length) ranges of the object whose pages to free first. Other mappings of
    the object keep all its pages until they go (a Pool worker's frozen arena, see
    :mod:`shmalloc.parallel._arena`): those no array reads can be freed at once.
    """
    if size >= RELEASE_LATER_BYTES:
        _releaser.close_later(fd, holes)
    else:
        free_and_close(fd, holes)


def wait_for_releases() -> None:
    """Block until descriptors handed to the background releaser are closed."""
    _releaser.wait()
