"""shmalloc.ProcessPoolExecutor: a concurrent.futures executor whose results travel through shared memory.

It wraps the standard ProcessPoolExecutor (persistent workers, BrokenProcessPool
when a worker dies) and adds the transport of :mod:`._protocol`: each task
gets a segment name chosen here, a large result is placed under it in the
worker and consumed here as soon as the task is done, whether or not anybody
asks for the result. Names left unconsumed (failed or cancelled tasks, a
worker killed while writing) are unlinked then, and once more at shutdown,
after the workers are gone.

As in :class:`shmalloc.Pool`, consumed objects are kept as spares
(:mod:`._spares`): a task also gets a free spare if there is one, and the
worker writes a large result into it, onto pages that are already there (a
fresh object's pages cost about five times the write); the task computes its
large arrays in it too, as a Pool's do (:mod:`._arena`). The standard pool's
queues carry no descriptors, so the worker opens the spare through
``/proc/<this pid>/fd/<n>``; where it cannot, the name serves. A worker keeps
a mapping of its last few spares; the parent frees a spare's pages when it
releases it, so such a mapping never keeps them. A spare handed to a task
whose pool broke is released, never reused: a worker of that pool may still
be writing into it.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import os
import signal
import stat
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .. import _names, _ownership
from .._shared import RefillMapping
from .._threads import native_ids, wait_until_gone
from ..errors import ShmFallbackWarning
from . import _protocol, _relay, _serial
from ._arena import Arena
from ._failures import rebuild_error, remote_error, warning_error
from ._options import PIPE_LIMIT, check_copy, check_count
from ._protocol import Shipped, check_answered_name, discard, ship, ship_in_place, ship_into
from ._recycling import Kept, read_result
from ._spares import DEFAULT_LIMIT, Spare, Spares, check_limit

_LABEL = "shmalloc.ProcessPoolExecutor"
#: Tasks submitted within this many seconds of the pool's last task settling belong to its burst.
BURST_GAP = 0.1

# In a worker: the handover of the last answer, completed at the next task (by then the
# answer has been sent). Until then the worker keeps the ShmArrays alive.
_unsent: _ownership.Handover | None = None


#: Spare mappings a worker keeps for its next tasks (see _spare_mapping).
SPARE_MAPPINGS = 16
# In a worker: its kept spare mappings and the paths it opened them by, by the object's (st_dev, st_ino).
_spare_maps: dict[tuple[int, int], tuple[str, RefillMapping]] = {}

# Where a worker finds a spare: /proc/<parent pid>/fd/<n>, and the object's (st_dev, st_ino).
SpareAddress = tuple[str, int, int]


def _spare_address(spare: Spare) -> SpareAddress:
    st = os.fstat(spare.fd)
    return f"/proc/{os.getpid()}/fd/{spare.fd}", st.st_dev, st.st_ino


def _call_and_ship(
    fn: Callable[..., Any], name: str, limit: int, receiver: int, args: tuple, kwargs: dict, spare: SpareAddress | None = None
) -> bytes:
    """Runs in a worker: call ``fn``; return the answer for the parent (result or error, see :mod:`._protocol`).

    The answer is pickled here, so that rebuilding it happens in
    :meth:`ProcessPoolExecutor._settle` (an error there is the task's, not a
    broken pool) and fn's exceptions are described safely. ``receiver``:
    the parent's pid. ``spare``: where to find a spare to write a large
    result into (its pages are warm), else it goes under ``name``.
    """
    global _unsent
    if signal.getsignal(signal.SIGTERM) is not _ownership.unlink_owned_and_die:
        # A broken pool terminates its workers (SIGTERM): unlink the ShmArrays' names this
        # worker owns (they carry the parent's pid) before dying of it, as map's workers do.
        signal.signal(signal.SIGTERM, _ownership.unlink_owned_and_die)
    _complete_unsent()
    _serial.enter_worker()
    _ownership.name_for_receiver(receiver)
    message, handover, _ = _protocol.answer(0, lambda: _ship(lambda: fn(*args, **kwargs), name, limit, spare))
    if handover is not None and handover.names:
        # Spawn and forkserver workers exit through sys.exit, whose finalisers would unlink these
        # names; the answer has been sent by then (before the worker read its stop message).
        handover.keep_at_exit()
        _unsent = handover
    return message


def _ship(produce: Callable[[], Any], name: str, limit: int, spare: SpareAddress | None) -> Shipped:
    """Run the task ``produce``; its result goes into the spare at ``spare`` if it can be opened (the task
    computing in it, see :mod:`._arena`), else under ``name``."""
    fd = _open_spare(spare)
    if fd < 0:
        return ship(produce(), name, limit)
    assert spare is not None, "a spare was opened"
    try:
        mapping = _spare_mapping(fd, spare[0])
        if mapping is None or not Arena.fits(mapping, fd):
            return ship_into(produce(), fd, limit, mapping)
        arena = Arena(mapping, fd)
        try:
            shipped = ship_in_place(produce, fd, limit, arena)
        finally:
            if arena.frozen:  # the region owns the mapping now
                _forget_mapping(mapping)
        arena.grow_spare(shipped.segment_size)  # before the answer leaves; the next task with this spare maps it again
        return shipped
    finally:
        os.close(fd)


def _spare_mapping(fd: int, path: str) -> RefillMapping | None:
    """This worker's mapping of the whole spare ``fd`` (opened through ``path``), kept for its next tasks
    with it; None if it cannot be mapped.

    A new mapping would fault every page in again. The parent frees a free spare's pages when it releases
    it, so a mapping kept of it holds no memory; one of a spare the parent no longer holds is unmapped here
    (a released spare lent to a result across a fork keeps the result's pages), and the oldest beyond
    :data:`SPARE_MAPPINGS`.
    """
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)  # no other object gets this inode while the mapping holds it
    for other, (other_path, kept) in list(_spare_maps.items()):
        if other != key and _object_key(other_path) != other:  # the parent closed that descriptor
            del _spare_maps[other]
            kept.close()
    _, mapping = _spare_maps.pop(key, (path, None))
    if mapping is not None and (mapping.address is None or mapping.length != st.st_size):
        mapping.close()  # the spare grew (or was cut back after a failed write)
        mapping = None
    if mapping is None:
        try:
            mapping = RefillMapping(fd, st.st_size, st.st_size)  # all its pages are there: written or allocated
        except (OSError, ValueError):
            return None
    _spare_maps[key] = (path, mapping)  # the most recently used last
    while len(_spare_maps) > SPARE_MAPPINGS:
        _spare_maps.pop(next(iter(_spare_maps)))[1].close()
    return mapping


def _object_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _forget_mapping(mapping: RefillMapping) -> None:
    """Drop ``mapping`` from the kept ones without unmapping it (a frozen arena owns its range)."""
    for key, (_, kept) in list(_spare_maps.items()):
        if kept is mapping:
            del _spare_maps[key]
    mapping.detach()


def _open_spare(spare: SpareAddress | None) -> int:
    """A writable descriptor of the spare the parent named, or -1.

    The object is checked to be that spare (an unlinked regular file with its device and inode): a
    write into whatever the parent's descriptor number names at the time would corrupt it.
    """
    if spare is None:
        return -1
    path, device, inode = spare
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # /proc hidden or not mounted, or the parent's descriptor closed: the name serves
        return -1
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or (st.st_dev, st.st_ino, st.st_nlink) != (device, inode, 0) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return -1
    return fd


def _call_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> list[Any]:
    """Runs in a worker: ``fn`` applied to each argument tuple of ``chunk``."""
    return [fn(*args) for args in chunk]


def _chunks(size: int, iterables: tuple[Iterable[Any], ...]) -> Iterator[list[tuple]]:
    """The argument tuples of ``zip(*iterables)``, in lists of ``size``."""
    arguments = zip(*iterables, strict=False)  # as map() does: the shortest iterable ends it
    while chunk := list(itertools.islice(arguments, size)):
        yield chunk


def _complete_unsent() -> None:
    """In a worker: the last answer has been sent (a new task came, or the worker exits)."""
    global _unsent
    if _unsent is not None:
        _unsent.complete()
        _unsent = None


# Python 3.11's pool dies (its manager thread ends, leaving the other workers running) if a task it
# still holds was cancelled when a worker dies; 3.12 ignores such a task. So there, a cancelled future
# leaves its task to run, and the result is dropped.
_CANCEL_TASKS = sys.version_info >= (3, 12)


class _Future(cf.Future):
    """The caller's future; cancelling it cancels the task in the pool (Python 3.11: drops its result).

    ``shm_bytes``: the size of the segment the result came through, 0 if it came through the pipe (set
    before the result).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shm_bytes = 0
        self._task: cf.Future | None = None
        self._notify = threading.Lock()
        self._notified = False

    def cancel(self) -> bool:
        task = self._task
        if task is not None:
            if _CANCEL_TASKS:
                if not task.cancel():
                    return False
            elif task.running() or task.done():
                return False  # what cancelling the task would answer: it has started
        if not super().cancel():  # runs the done callbacks, which may cancel this future again
            return False
        with self._notify:  # once, whoever cancels: what an executor does, so that cf.wait and as_completed see it
            if not self._notified:
                self._notified = True
                self.set_running_or_notify_cancel()
        return True


def _nothing_to_unmap() -> None:
    """The workers keep no mapping of a spare."""


def _close_spares(spares: Spares) -> None:
    """Release every spare (lent ones stay mapped by their results' arrays); those handed out are released
    as they come back. Safe in a finalizer: waits for nothing if this thread holds the spares' lock."""

    def close() -> None:
        with spares.held():
            spares.close()

    spares.when_free(close)


class ProcessPoolExecutor(cf.Executor):
    """A process pool whose results come back through POSIX shared memory.

    Use it like :class:`concurrent.futures.ProcessPoolExecutor`; large
    results (arrays, data frames, containers holding them) are returned
    through :func:`shmalloc.copy2shm` / :func:`shmalloc.allocate_from_shm`,
    small ones through the pool's pipes.

    Parameters
    ----------
    max_workers : int, optional
        Number of worker processes (default: the usable CPUs).
    mp_context : multiprocessing context, optional
        How workers start (default: the platform's default).
    initializer, initargs
        Called in each worker when it starts, as in the standard executor.
    copy : bool, default True
        True: results are copied into regular memory. False: arrays in the
        results own private mappings of their segments (no copy).
    pipe_limit : int, default 65536
        Results holding fewer bytes than this go through the pipe.
    spare_limit : float or int, default 0.25
        The objects of consumed results are kept as spares, whose warm
        pages the next large results are written into (a fresh object's
        pages cost about five times the write): at most about the bytes of
        the large results of a recent burst of tasks (tasks submitted
        without the pool being idle for 0.1 s, such as a joblib call) or of
        the last ``2 * max_workers``, whichever is more, and at most this
        share of the free space of /dev/shm (float), or this many bytes
        (int). 0 keeps none.
    **kwargs
        Passed on to :class:`concurrent.futures.ProcessPoolExecutor`
        (e.g. ``max_tasks_per_child``).

    Notes
    -----
    Functions and arguments are pickled, as in the standard executor (so no
    lambdas; :func:`shmalloc.map` and :class:`shmalloc.Pool` take them). A worker that dies
    breaks the pool: pending futures raise
    :class:`concurrent.futures.process.BrokenProcessPool`. On Python 3.11 a
    cancelled future's task still runs (its result is dropped): cancelling
    a task the standard pool holds can cost that pool its manager thread
    there. A full /dev/shm
    sends results through the pipe, with one :class:`ShmFallbackWarning`.
    Every segment made for the pool is gone once :meth:`shutdown` (with
    ``wait=True``, as the ``with`` statement does) returns. A future of
    this pool has ``shm_bytes``: the size of the segment its result came
    through, 0 if it came through the pipe.

    An exception raised by ``fn`` is re-raised with a note giving the
    worker's traceback (a :class:`shmalloc.WorkerError` if it cannot be
    rebuilt); an error while rebuilding a result here fails that future
    only, with a note saying so. A :class:`shmalloc.ShmArray` that ``fn``
    makes and returns is taken over by this process.

    Examples
    --------
    >>> import numpy as np, shmalloc
    >>> with shmalloc.ProcessPoolExecutor(2) as pool:
    ...     pool.submit(np.ones, 100_000).result().sum()
    np.float64(100000.0)
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        *,
        copy: bool = True,
        pipe_limit: int = PIPE_LIMIT,
        spare_limit: float | int = DEFAULT_LIMIT,
        **kwargs: Any,
    ) -> None:
        check_copy(copy)
        check_count("pipe_limit", pipe_limit, 0)
        check_limit(spare_limit)
        self._pool = cf.ProcessPoolExecutor(max_workers, mp_context, initializer, initargs, **kwargs)
        self._copy = copy
        self._limit = pipe_limit
        # Workers open a spare through /proc/<this pid>/fd: the standard pool's queues cannot carry
        # descriptors. The mappings they keep need no unmapping: a released spare's pages are freed here.
        self._spares = Spares(spare_limit, _nothing_to_unmap)
        self._recent: deque[int] = deque(maxlen=2 * (max_workers or os.cpu_count() or 1))  # large results' bytes
        # A burst: tasks submitted until the pool has been idle for BURST_GAP (a joblib call, a map).
        # As a Pool's call, a recent burst's results may keep their objects: it is likely to come again.
        self._unsettled = 0  # tasks submitted and not settled
        self._idle_since: float | None = None  # when the last task settled, if none is left
        self._burst_bytes = 0  # large results' bytes in the current burst
        self._bursts: deque[int] = deque(maxlen=2)  # ... and in the two before it
        weakref.finalize(self, _close_spares, self._spares).atexit = False  # dropped without shutdown()
        # Reentrant: on Python 3.12 a finalizer that cancels a future (at any bytecode, also while this
        # thread holds the lock) settles its task at once, in this thread.
        self._lock = threading.RLock()
        self._names: set[str] = set()  # handed out, not yet consumed or discarded
        self._warned = False
        self._broken = False  # a worker died: the standard pool serves no more tasks
        # OS thread ids of the threads the standard executor ran for this pool (its manager and
        # queue feeder threads): shutdown waits until they are gone, also those that ended before.
        self._pool_threads: set[int | None] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; return a future of its result."""
        name = _names.generate()
        with self._lock:
            self._names.add(name)
        future = _Future()
        spare = self._take_spare()
        where = None if spare is None else _spare_address(spare)
        try:
            self._unsettle()
            task = self._pool.submit(_call_and_ship, fn, name, self._limit, os.getpid(), args, kwargs, where)
        except BaseException:
            # The standard pool may have queued the task before raising (a worker or its manager
            # thread failed to start), and then it still runs: its name waits for the sweep in
            # shutdown(), and its spare is released, never reused. Should the task run, the
            # worker either finds the spare gone (another object, or none, under that number:
            # it uses the name) or writes into an object nobody reads.
            self._spare_back(spare, reusable=False)
            self._settled()
            raise
        future._task = task
        task.add_done_callback(lambda done: self._settle(done, future, name, spare))
        return future

    def _take_spare(self) -> Spare | None:
        if self._spares.held_here():  # a signal handler or finalizer interrupted this thread in there
            return None
        with self._spares.held():
            # Lent spares come back through their arrays' finalizers (no reclaim() here: it visits
            # every lent spare, and a submit must not cost more the more results are alive).
            if self._spares.closed:
                return None
            with self._lock:  # taken inside the spares' lock only (never the other way round)
                idle = self._idle_since
            if idle is not None and time.monotonic() - idle > BURST_GAP:
                # A new burst: results of earlier ones still alive keep only their own pages (as at the start
                # of a Pool's call). A result freed before costs its spare nothing.
                self._spares.shrink_lent()
            return self._spares.take(0)

    def _spare_back(self, spare: Spare | None, reusable: bool, kept: Kept | None = None) -> None:
        """A task is over: make its ``spare`` free again (``reusable``: nobody writes into it any more) or
        release it, and keep ``kept`` (the object a result was read from) as a spare."""
        if spare is None and kept is None:
            return
        if self._spares.held_here():  # a finalizer cancelled a future while this thread moves spares
            self._spares.when_free(lambda: self._spare_back(spare, reusable, kept))
            return
        with self._spares.held():
            spares = self._spares
            if spare is not None and (kept is None or kept.spare is not spare):
                if reusable and not spares.closed:
                    spares.give(spare)
                else:
                    spares.release(spare)
            if kept is not None:
                if spares.closed:
                    spares.release(kept.spare)
                    return
                kept.return_to(spares)
                self._recent.append(kept.spare.size)
                with self._lock:  # taken inside the spares' lock only (never the other way round)
                    self._burst_bytes += kept.spare.size
                    burst_bytes = max(self._burst_bytes, *self._bursts, 0)
                spares.call_bytes = max(sum(self._recent), burst_bytes)
                spares.trim()

    def _unsettle(self) -> None:
        """A task is submitted: it belongs to the current burst, or starts one if the pool has been idle."""
        with self._lock:
            idle = self._idle_since
            if idle is not None and time.monotonic() - idle > BURST_GAP:
                self._bursts.append(self._burst_bytes)
                self._burst_bytes = 0
            self._unsettled += 1
            self._idle_since = None

    def _settled(self) -> None:
        """A task is over; if it was the last one, the pool is idle from now (see ``_bursts``)."""
        with self._lock:
            self._unsettled -= 1
            if self._unsettled == 0:
                self._idle_since = time.monotonic()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """As :meth:`concurrent.futures.ProcessPoolExecutor.map`: each task runs ``chunksize`` calls of
        ``fn`` and returns their results together (one segment for a large chunk). Other keywords
        (``buffersize`` from Python 3.14) go to :meth:`concurrent.futures.Executor.map`."""
        check_count("chunksize", chunksize, 1)
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout, **kwargs)
        calls = functools.partial(_call_chunk, fn)
        chunks = super().map(calls, _chunks(chunksize, iterables), timeout=timeout, **kwargs)
        return itertools.chain.from_iterable(chunks)

    def _settle(self, task: cf.Future, future: _Future, name: str, spare: Spare | None) -> None:
        """Consume the task's result at once; hand the result (or error) to the caller's future."""
        settled = True  # no worker will write under the name any more
        reusable = True  # nor into the spare, which was not found damaged
        kept: Kept | None = None
        with self._lock:
            # This runs on the pool's manager thread, while its queue feeder thread lives too: either
            # may end before shutdown (a broken pool).
            self._pool_threads |= native_ids()
        try:
            if task.cancelled():
                future._task = None  # so that cancel() does not ask the task, which is done (Python 3.11 refuses)
                future.cancel()
                return
            error = task.exception()
            if error is not None:
                # In a broken pool another worker may still be writing under this name (or into
                # this spare): keep the name for the sweep in shutdown(), never reuse the spare.
                settled = reusable = not isinstance(error, BrokenProcessPool)
                self._broken = self._broken or not settled
                future.set_exception(error)
                return
            header, stream = _protocol.read_header(task.result())
            try:
                try:
                    _relay.replay(header.said, "a task")
                except Exception as exc:  # a warning this process's filters make an error: the task's
                    future.set_exception(warning_error(None, exc, _LABEL))
                    return
                try:
                    payload = _protocol.read_payload(stream)
                    if header.kind == _protocol.ERROR:
                        future.set_exception(remote_error(None, payload, _LABEL))
                        return
                    shipped = _protocol.as_shipped(header, payload)
                    value, kept = self._receive(shipped, name, spare)
                    future.shm_bytes = 0 if shipped.handle is None else shipped.handle.size
                except Exception as exc:
                    reusable = False  # whatever is in the spare, it is of no use
                    future.set_exception(rebuild_error(None, exc, _LABEL))
                    return
            finally:
                _protocol.forget(header.names)
            if shipped.fell_back:
                try:
                    self._warn_fallback()
                except Exception as exc:  # the filters make the warning an error: the task's
                    future.set_exception(warning_error(None, exc, _LABEL))
                    return
            # The spare first: a caller that submits its next task once it has this result finds it free.
            self._spare_back(spare, reusable, kept)
            spare = kept = None
            if not future.cancelled():
                future.set_result(value)
        except cf.InvalidStateError:
            pass  # the caller cancelled meanwhile: the result is dropped
        finally:
            # The task's done callback holds the caller's future, which held the task: a cycle that
            # would keep the result (and a copy=False result's spare) until the garbage collector runs.
            future._task = None
            self._settled()
            discard(name)
            self._spare_back(spare, reusable, kept)
            if settled:
                with self._lock:
                    self._names.discard(name)

    def _receive(self, shipped: Shipped, name: str, spare: Spare | None) -> tuple[Any, Kept | None]:
        """The result, from the spare or from the segment ``name``, and the object to keep as a spare."""
        handle = shipped.handle
        if handle is None:
            return shipped.value, None
        if spare is None or handle.name != _protocol.SPARE:  # the worker could not open the spare
            check_answered_name(handle, name)
            spare = None
        value, kept = read_result(handle, self._copy, spare, name, recycle=True)
        return shipped.unboxed(value), kept

    def _warn_fallback(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn("/dev/shm was full: results come back through the pipe instead", ShmFallbackWarning, stacklevel=1)

    @property
    def broken(self) -> bool:
        """Whether a worker died, so that the pool serves no more tasks (known once a future said so)."""
        return self._broken

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers; with ``wait=True`` also remove every segment left unconsumed."""
        threads_before = native_ids()
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            # The standard executor's threads are joined (a broken pool's manager thread may have
            # ended earlier), but their OS threads may live a moment longer: a fork right after
            # shutdown would then fork a multi-threaded process.
            with self._lock:
                ours = threads_before | self._pool_threads
            wait_until_gone(ours - native_ids())
            # The workers are gone: nothing can create these names any more.
            with self._lock:
                left, self._names = self._names, set()
            for name in left:
                discard(name)
        # Spares still handed out are released as their tasks end.
        _close_spares(self._spares)


__all__ = ["ProcessPoolExecutor"]
