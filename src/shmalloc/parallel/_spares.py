"""Spares of a Pool: recycled shared memory objects, held by descriptor, within a budget of /dev/shm.

A spare is an unlinked object: nothing of it is in /dev/shm's listing, yet
its pages take space there until its last descriptor and mapping are gone.
So spares are bounded:

- by the last calls: free spares of at most 1.25 times the bytes the
  largest of the last three returned (objects only grow: the slack keeps a
  slightly larger one; a workload alternating large and small calls keeps
  the large ones' spares);
- by the space left: at most ``limit`` (by default a quarter) of what is
  free in /dev/shm, counting the free spares' own space as free, or a fixed
  number of bytes. Other programs always keep the rest.

The budget is applied at the end of every call, whenever the objects of
freed ``copy=False`` results come back, and when a write of this process finds /dev/shm full
(:mod:`._space`), which then releases every free spare. Releasing a spare
closes the parent's descriptor and has the workers unmap it at once (they
keep refill mappings), so that its space really is free when that returns.

No thread of ours does any of this: a library must not make its user's
process multi-threaded and then fork it (Python 3.12 warns; the child may
deadlock), and pools fork workers at any call. An array's finalizer, which
runs at any bytecode in any thread, queues the object it frees and takes it
back at once if the spares' lock is free; if not, whoever holds the lock
takes it back when releasing the lock (see :meth:`Spares.held`).
"""
from __future__ import annotations

import bisect
import collections
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .. import _posix, _releaser, _space
from .._posix import SHM_DIR
from .._shared import SPARE_LABEL

#: Default share of /dev/shm's free space that the free spares of a pool may take.
DEFAULT_LIMIT = 0.25
#: Free spares may exceed the bytes of the last calls by this share (objects only grow).
SLACK = 0.25
#: The budget follows the largest of this many last calls: a workload that alternates large and small
#: calls keeps the spares of its large ones (else every large call would fault in new objects).
RECENT_CALLS = 3
#: A spare lent to a copy=False result that takes less than 1/OVERSIZE of it is shrunk (:meth:`Spares.shrink_lent`)
#: when the SHRINK_AFTER-th call (or burst) since it was lent begins.
OVERSIZE = 2
SHRINK_AFTER = 2
# How long a write that found /dev/shm full waits for a pool busy in another thread.
_BUSY_WAIT = 1.0


def check_limit(limit: object) -> int | float:
    """``limit`` if it is a share of /dev/shm (float in [0, 1]) or a number of bytes (int >= 0); else raise."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"spare_limit must be a float share of /dev/shm or an int of bytes, not {type(limit).__name__}")
    if isinstance(limit, float) and not 0.0 <= limit <= 1.0:
        raise ValueError(f"spare_limit as a share of /dev/shm must be between 0.0 and 1.0, not {limit!r}")
    if isinstance(limit, int) and limit < 0:
        raise ValueError(f"spare_limit in bytes must be >= 0, not {limit}")
    return limit


def shm_free_bytes() -> int | None:
    """Bytes free in /dev/shm for this user, or None where it cannot be measured (no /dev/shm)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass(eq=False)
class Spare:
    """A recycled object: held by the parent's descriptor; the workers that may map it."""

    fd: int
    size: int  # bytes of the object (it only grows)
    sid: int = field(default_factory=lambda: next(_SIDS))
    mappers: set[int] = field(default_factory=set)  # pids of workers that may keep a refill mapping
    addresses: list[int] = field(default_factory=list)  # while lent: the arrays' mappings
    unfreed: set[int] = field(default_factory=set)  # while lent: those whose array is not yet finalized
    stamp: int | None = None  # while lent: fork_stamp() taken before its arrays were made
    used: list[tuple[int, int]] | None = None  # while lent: (offset, length) of the pages its result takes
    holes: int = 0  # bytes of its pages punched out (see Spares.shrink_lent): refilled before a task gets it
    lent_starts: int = 0  # while lent: the calls (or bursts) begun since (see Spares.shrink_lent)


_SIDS: Iterator[int] = itertools.count(1)


# Forks of this process. The at-fork hooks only count (a fork may come from any thread, or a
# signal handler, while another thread moves spares: the hooks must change no list).
_fork_numbers = itertools.count(1)  # next() is atomic: two forking threads never get the same number
_last_fork = 0  # the number of the latest fork begun
_forks_under_way: list[int] = []  # one entry per fork begun and not yet returned in this process


def fork_stamp() -> int | None:
    """A mark to take before mapping an object: :func:`forked_since` tells whether a fork came after.

    None if a fork is under way (its child may get what is mapped from now on).
    """
    last = _last_fork  # read before looking for a fork under way: one begun in between shows there
    return None if _forks_under_way else last


def forked_since(stamp: int | None) -> bool:
    """Whether this process may have forked since ``stamp`` was taken by :func:`fork_stamp`."""
    return stamp is None or _last_fork != stamp


def _unused_parts(spare: Spare, whole: bool) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``spare`` that no array maps: all of it if ``whole`` (a free spare),
    else all but the pages of the result it is lent to; none if it is neither (handed out, or its result
    failed to be read: arrays may map any of it)."""
    size = max(spare.size, os.fstat(spare.fd).st_size)  # a worker may have grown it
    if whole:
        return [(0, size)]
    if spare.used is None:
        return []
    holes, end = [], 0
    for offset, length in sorted(spare.used):
        if offset > end:
            holes.append((end, offset - end))
        end = max(end, offset + length)
    if size > end:
        holes.append((end, size - end))
    return holes


def _larger_first(spare: Spare) -> int:
    return -spare.size


class FreeSpares:
    """The free spares, largest first, and their bytes and punched bytes in all, kept up to date as spares
    come and go (a pool's call frees hundreds of results one at a time: each must not walk them all).
    A spare's size and holes do not change while it is here."""

    def __init__(self) -> None:
        self._spares: list[Spare] = []
        self.size = 0
        self.holes = 0

    def add(self, spare: Spare) -> None:
        bisect.insort(self._spares, spare, key=_larger_first)
        self.size += spare.size
        self.holes += spare.holes

    def pop(self, index: int) -> Spare:
        spare = self._spares.pop(index)
        self.size -= spare.size
        self.holes -= spare.holes
        return spare

    def take_all(self) -> list[Spare]:
        """Remove every spare; return them, largest first."""
        spares, self._spares, self.size, self.holes = self._spares, [], 0, 0
        return spares

    def __len__(self) -> int:
        return len(self._spares)

    def __iter__(self) -> Iterator[Spare]:
        return iter(self._spares)

    def __getitem__(self, index: int) -> Spare:
        return self._spares[index]


class Spares:
    """Recycled objects of one pool: free ones, and ones lent to ``copy=False`` results.

    Every change happens under :meth:`held` (the pool holds it for a whole
    call). What finalizers hand in while the lock is taken waits in a queue
    that the holder works off right after releasing it. A fork (by any
    thread, at any bytecode) changes nothing here: a lent object whose
    arrays lived across a fork is released instead of reused when it comes
    back (see :func:`forked_since`).

    Parameters
    ----------
    limit : float or int
        Share of /dev/shm's free space (float), or bytes (int), that free
        spares may take (see :func:`check_limit`).
    unmap : callable
        Called under the lock with no argument after spares were released
        outside a call: has the idle workers unmap them, and returns once
        they have. Held weakly (a bound method of the pool).
    """

    def __init__(self, limit: int | float, unmap: Callable[[], None]) -> None:
        self.limit = check_limit(limit)
        self.free = FreeSpares()
        self.lent: list[Spare] = []
        self.handed: set[Spare] = set()  # taken for a task, not yet back
        self.dropped: dict[int, list[int]] = {}  # worker pid -> spare ids to unmap at its next task
        self.call_bytes = 0  # bytes the largest of the last calls returned
        self._recent_calls: collections.deque[int] = collections.deque(maxlen=RECENT_CALLS)
        self.closed = False
        self._unmap = weakref.WeakMethod(unmap) if hasattr(unmap, "__self__") else (lambda: unmap)
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread holding the lock
        # Objects of freed copy=False results (Spare) and deferred actions (callables), queued
        # by finalizers; deque.append and popleft are atomic, so safe at any bytecode.
        self._queued: collections.deque[Spare | Callable[[], None]] = collections.deque()
        _all_spares.add(self)
        _space.register(self)

    # -- locking

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the spares (and the workers' pipes) for a call, or for stopping the workers."""
        if self.held_here():
            # The lock is not reentrant: a signal handler (or finalizer) would wait for itself.
            raise RuntimeError("the pool is in use by this very thread (called from a signal handler or finalizer?)")
        self._lock.acquire()
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            self._unlock()

    def held_here(self) -> bool:
        """Whether this thread holds the lock (then it was interrupted inside, e.g. by a signal handler)."""
        return self._holder == threading.get_ident()

    def _unlock(self) -> None:
        """Release the lock, then work off what finalizers queued while it was taken.

        A finalizer queues first and then tries the lock; the holder looks at the queue
        after releasing it. So whatever is queued is worked off by one or the other, at
        once, and never waits for a later call.
        """
        self._holder = None
        self._lock.release()
        while self._queued and self._lock.acquire(blocking=False):
            self._holder = threading.get_ident()
            pool_refs: list = []
            try:
                actions = self._settle_queued(pool_refs)
            finally:
                self._holder = None
                self._lock.release()
            del pool_refs  # outside the lock: were it the pool's last reference, its close takes it
            for action in actions:
                try:
                    action()
                except Exception:  # a finalizer's action: nobody to report to
                    pass

    def when_free(self, action: Callable[[], None]) -> None:
        """Run ``action`` (which takes the lock) now, or when the lock's holder releases it.

        For a pool's finalizer: it may run in a thread that holds this lock (garbage
        collection inside a locked section), where taking it again would deadlock.
        """
        self._queued.append(action)
        self._work_off()

    def _work_off(self) -> None:
        # Called from finalizers: never wait for the lock (this thread may hold it).
        if self._lock.acquire(blocking=False):
            self._holder = threading.get_ident()
            self._unlock()

    # -- moving spares

    def release(self, spare: Spare, now: bool = False, whole: bool = False) -> None:
        """Close the parent's descriptor; tell the workers that map it to unmap it (their next task).

        ``now``: close it on this thread (the budget wants the space free when it returns);
        else a large object is closed on the background thread. Its pages no array maps are freed
        first (``whole``: a free spare, all of them), so that no worker's mapping keeps them (a
        frozen arena, see _arena, or an executor worker's kept mapping).
        """
        self.handed.discard(spare)
        for pid in spare.mappers:
            self.dropped.setdefault(pid, []).append(spare.sid)
        holes = _unused_parts(spare, whole)
        if now:
            _releaser.free_and_close(spare.fd, holes)
        else:
            _releaser.release_fd(spare.fd, spare.size, holes)

    def reclaim(self) -> None:
        """Make spares of lent objects whose arrays are all gone; release those lent across a fork."""
        still = []
        for spare in self.lent:
            if forked_since(spare.stamp):
                # A forked child may read the object through its copy-on-write view of the
                # arrays: never write it again. Their mappings keep it while they live.
                self.release(spare)
            elif spare.unfreed and _posix.any_adopted(spare.addresses):
                still.append(spare)
            else:
                self.give(spare)
        self.lent = still

    def take(self, pid: int) -> Spare | None:
        """A free spare for worker ``pid``: the largest it maps already, else the largest; None if none."""
        if not self.free:
            return None
        # The first that pid maps is the largest it maps (free spares are largest first).
        best = next((i for i, spare in enumerate(self.free) if pid in spare.mappers), 0)
        spare = self.free.pop(best)
        if spare.holes:
            # Every page there before a worker writes into it: a full /dev/shm is an error here, not a SIGBUS.
            try:
                _posix.fallocate(spare.fd, SPARE_LABEL, spare.size)
            except OSError:
                self.release(spare, whole=True)
                return None
            spare.holes = 0
        self.handed.add(spare)
        return spare

    def give(self, spare: Spare) -> None:
        """Make ``spare`` free for the next tasks (no array maps it)."""
        self.handed.discard(spare)
        spare.addresses, spare.unfreed, spare.stamp, spare.used, spare.lent_starts = [], set(), None, None, 0
        spare.size = max(spare.size, os.fstat(spare.fd).st_size)  # a Pool's worker may have grown it (see _arena)
        self.free.add(spare)

    def lend(self, spare: Spare, arrays: Sequence[np.ndarray], stamp: int | None, used: list[tuple[int, int]]) -> None:
        """Lend ``spare`` to a result that takes the pages ``used`` (offset, length) of it, whose ``arrays``
        own mappings of it; it comes back when they are freed.

        ``stamp``: :func:`fork_stamp` taken before the arrays were made. If the process
        forked since, the spare is released at once (a child may read the arrays).
        """
        self.handed.discard(spare)
        spare.used = used
        spare.addresses = [_posix.data_address(a) for a in arrays]
        spare.unfreed = set(spare.addresses)
        spare.stamp = stamp
        if forked_since(stamp):
            self.release(spare)
            return
        # A fork from here on changes _last_fork, which reclaim and the finalizer path look at.
        self.lent.append(spare)
        for array, address in zip(arrays, spare.addresses, strict=True):
            weakref.finalize(array, self._array_freed, spare, address).atexit = False

    def shrink_lent(self) -> None:
        """At the start of a call (or burst): free the pages of the lent spares that their results do not
        take, where those take less than 1/:data:`OVERSIZE` of them, once the results have lived through
        :data:`SHRINK_AFTER` starts: a small result kept for long must not keep a large object (outside
        the budget). The size stays (a cut would take the copied private pages of a worker's frozen arena,
        see :mod:`._arena`); :meth:`take` allocates the pages again.

        A loop that rebinds its results (``r = pool.map(...)``) frees each call's results during the next
        call: those are never shrunk, and their spares keep their warm pages.
        """
        for spare in self.lent:
            spare.lent_starts += 1
            if spare.lent_starts != SHRINK_AFTER:
                continue
            holes = _unused_parts(spare, whole=False)
            unused = sum(length for _, length in holes)
            if OVERSIZE * (spare.size - unused) < spare.size:
                spare.holes = unused  # first: take() refills whatever was punched, should a punch fail midway
                try:
                    _posix.punch_parts(spare.fd, SPARE_LABEL, holes)
                except OSError:  # no hole punching here: the spare keeps its pages until the result is freed
                    continue

    def _array_freed(self, spare: Spare, address: int) -> None:
        """Finalizer of an array that owns a mapping of a lent spare: the last one gives it back."""
        spare.unfreed.discard(address)
        if not spare.unfreed:
            self._queued.append(spare)
            self._work_off()

    # -- the budget

    def budget(self) -> int:
        """Bytes of free spares to keep: within the last calls' bytes, and ``limit`` of /dev/shm."""
        budget = int(self.call_bytes * (1 + SLACK))
        if isinstance(self.limit, int):
            return min(budget, self.limit)
        free = shm_free_bytes()
        if free is None:
            return budget  # nothing to measure (macOS): the last calls bound them
        # A free spare's punched pages are free space already.
        return min(budget, int(self.limit * (free + self.free.size - self.free.holes)))

    def trim(self) -> bool:
        """Keep free spares (largest first) within :meth:`budget`; release the others; whether any was."""
        budget = self.budget()
        if self.free.size <= budget:
            return False
        total = 0
        for spare in self.free.take_all():
            if total + spare.size <= budget:
                self.free.add(spare)
                total += spare.size
            else:
                self.release(spare, now=True, whole=True)
        return True

    def end_call(self, call_bytes: int) -> None:
        """At the end of a call that returned ``call_bytes``: trim, and have the workers unmap what was released."""
        self._recent_calls.append(call_bytes)
        self.call_bytes = max(self._recent_calls)
        self.reclaim()
        released = self.trim()
        self._unmap_released([])
        if released:
            # The call's consumed segments may still be closing on the background thread,
            # and a released spare made from one is free only once that is done too.
            _releaser.wait_for_releases()

    def _unmap_released(self, pool_refs: list) -> None:
        # The pool's strong reference goes into ``pool_refs``, which the caller drops after
        # releasing the lock: were it the last one, the pool's close would take the lock.
        if self.dropped:
            unmap = self._unmap()
            if unmap is not None:
                pool_refs.append(unmap)
                unmap()

    def _settle_queued(self, pool_refs: list) -> list[Callable[[], None]]:
        """Under the lock: take back the queued spares, apply the budget; return the queued actions.

        Runs in finalizers too, at any bytecode: nothing here waits for another lock
        (released spares are closed on this thread, not handed to the releaser).
        """
        actions, returned = [], False
        while self._queued:
            job = self._queued.popleft()
            if isinstance(job, Spare):
                # Not released by reclaim or close since its last array was freed.
                if not self.closed and job in self.lent and not job.unfreed:
                    self.lent.remove(job)
                    if forked_since(job.stamp):
                        self.release(job, now=True)  # on this thread: no waiting for the releaser's lock
                    else:
                        self.give(job)
                        returned = True
            else:
                actions.append(job)
        if returned:
            self.trim()
            self._unmap_released(pool_refs)
        return actions

    def give_back_space(self) -> int:
        """Release every free spare (a write found /dev/shm full); return their bytes. 0 if the pool is busy."""
        if self.held_here() or not self._lock.acquire(timeout=_BUSY_WAIT):
            return 0
        self._holder = threading.get_ident()
        pool_refs: list = []
        try:
            # Freed copy=False results' objects too; queued actions wait for _unlock (they take the lock).
            self._queued.extend(self._settle_queued(pool_refs))
            if self.closed:
                return 0
            self.reclaim()
            given = self.free.size
            for spare in self.free.take_all():
                self.release(spare, now=True, whole=True)
            self._unmap_released(pool_refs)
            _releaser.wait_for_releases()  # those lent across a fork, closed on the background thread
            return given
        finally:
            self._unlock()
            del pool_refs

    def close(self) -> None:
        """Release every spare (lent objects stay mapped by their arrays until those are freed)."""
        self.closed = True
        for spare in [*self.free.take_all(), *self.lent]:
            _releaser.release_fd(spare.fd, spare.size, _unused_parts(spare, whole=spare.used is None))
        self.lent, self.dropped = [], {}

    # -- fork

    def _in_child(self) -> None:
        # The child's copies of the descriptors: the parent's spares are not the child's to use
        # (a worker started in the middle of a run would otherwise pin the ones handed out).
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._holder = None
        self._queued = collections.deque()  # objects of the parent's results, actions on the parent's pool
        for spare in [*self.free, *self.lent, *self.handed]:
            try:
                os.close(spare.fd)
            except OSError:
                pass
        self.free, self.lent, self.handed, self.dropped = FreeSpares(), [], set(), {}


_all_spares: "weakref.WeakSet[Spares]" = weakref.WeakSet()


def _before_fork() -> None:
    global _last_fork
    # Under way first: a fork_stamp() that read the old number then sees this fork begun.
    _forks_under_way.append(0)  # list.append and pop are atomic
    _last_fork = next(_fork_numbers)


def _after_fork_in_parent() -> None:
    _forks_under_way.pop()


def _in_child() -> None:
    _forks_under_way.clear()  # the parent's forks under way are not the child's
    for spares in list(_all_spares):
        spares._in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_in_child)
