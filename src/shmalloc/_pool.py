"""shmalloc.Pool: persistent workers that return results through shared memory, on warm pages.

A :func:`shmalloc.map` call starts its workers, and each result lands in a
fresh segment whose pages the kernel must fault in one by one (about 4 us
per 4 KB page here, more than copying the page). A :class:`Pool` keeps its
workers across calls, and keeps the objects of consumed results as *spares*:
unlinked shared memory objects held only by a descriptor of the parent. The
next task gets a spare through its pipe (SCM_RIGHTS) and its worker writes
into pages that already exist: with pwrite the first time, then through a
shared mapping of the spare that the worker keeps, which is a plain memcpy
(about 2.5 times faster than pwrite here). Spares only grow, so such a
mapping never reaches past the end of its object; when the parent releases a
spare, the workers that map it unmap it at their next task.

A spare has no name, so nothing of it is ever in /dev/shm, and it is gone
with the parent's descriptor (at :meth:`Pool.close`, or when the process
dies). An object lent to a ``copy=False`` result becomes a spare only when
every array mapping it has been freed; a fork while it is lent retires it
for good, because a forked child keeps reading the object's pages through
its copy-on-write mapping.
"""
from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import pickle
import secrets
import signal
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any, Callable, Iterable

import numpy as np

from . import _answer, _names, _segment, _shmarray, codecs
from ._api import check_handle_matches
from ._errors import CorruptHandleError, ShmError
from ._handle import ShmObj
from ._map import (
    PIPE_LIMIT,
    Shipped,
    _Box,
    _is_pandas,
    _nbytes,
    _Options,
    _prepare,
    _progress_bar,
    _Run,
    _seed_item,
    _Worker,
    check_count,
    discard,
    ship,
    start_context,
    usable_cpus,
)

#: The label of spares in error messages (they have no name).
SPARE = _segment.SPARE_LABEL
#: Refill mappings a worker keeps at most (the oldest is dropped first).
WORKER_MAPPINGS = 8


# ----------------------------------------------------------------------------
# Spares of one pool


@dataclass(eq=False)
class _Spare:
    """A recycled object: held by the parent's descriptor; the workers that may map it."""

    fd: int
    size: int  # bytes of the object (it only grows)
    sid: int = field(default_factory=lambda: next(_sids))
    mappers: set[int] = field(default_factory=set)  # pids of workers that may keep a refill mapping
    addresses: list[int] = field(default_factory=list)  # while lent: the arrays' mappings


_sids = itertools.count(1)


class _Spares:
    """Recycled objects of one pool: free ones, and ones lent to ``copy=False`` results."""

    def __init__(self) -> None:
        self.free: list[_Spare] = []
        self.lent: list[_Spare] = []
        self.retired: list[_Spare] = []  # lent across a fork: never reused
        self.handed: set[_Spare] = set()  # taken for a task, not yet back
        self.dropped: dict[int, list[int]] = {}  # worker pid -> spare ids to unmap at its next task
        _all_spares.add(self)

    def release(self, spare: _Spare) -> None:
        """Close the parent's descriptor; tell the workers that map it to unmap it (their next task)."""
        self.handed.discard(spare)
        for pid in spare.mappers:
            self.dropped.setdefault(pid, []).append(spare.sid)
        _segment.release_fd(spare.fd, spare.size)

    def reclaim(self) -> None:
        """Release the retired; make spares of lent objects whose arrays are all gone."""
        for spare in self.retired:
            self.release(spare)
        self.retired = []
        still = []
        for spare in self.lent:
            (still if _segment.any_adopted(spare.addresses) else self.free).append(spare)
        self.lent = still

    def take(self, pid: int) -> _Spare | None:
        """A free spare for worker ``pid``: the largest it maps already, else the largest; None if none."""
        if not self.free:
            return None
        best = max(range(len(self.free)), key=lambda i: (pid in self.free[i].mappers, self.free[i].size))
        spare = self.free.pop(best)
        self.handed.add(spare)
        return spare

    def give(self, spare: _Spare) -> None:
        self.handed.discard(spare)
        spare.addresses = []
        self.free.append(spare)

    def lend(self, spare: _Spare, addresses: list[int]) -> None:
        self.handed.discard(spare)
        spare.addresses = addresses
        self.lent.append(spare)

    def trim(self, budget: int) -> None:
        """Keep free spares (largest first) up to ``budget`` bytes; release the others."""
        self.reclaim()
        self.free.sort(key=lambda spare: -spare.size)
        kept, total = [], 0
        for spare in self.free:
            if total + spare.size <= budget:
                kept.append(spare)
                total += spare.size
            else:
                self.release(spare)
        self.free = kept

    def close(self) -> None:
        """Release every spare (lent objects stay mapped by their arrays until those are freed)."""
        for spare in self.free + self.retired + self.lent:
            _segment.release_fd(spare.fd, spare.size)
        self.free, self.retired, self.lent, self.dropped = [], [], [], {}

    def _before_fork(self) -> None:
        # A child inherits the arrays' copy-on-write mappings: a later write into the
        # object would show through its untouched pages. Never reuse these objects;
        # those whose arrays are all freed already are safe to keep.
        for spare in self.lent:
            (self.retired if _segment.any_adopted(spare.addresses) else self.free).append(spare)
        self.lent = []

    def _in_child(self) -> None:
        # The child's copies of the descriptors: the parent's spares are not the child's to use
        # (a worker started in the middle of a run would otherwise pin the ones handed out).
        for spare in [*self.free, *self.retired, *self.lent, *self.handed]:
            try:
                os.close(spare.fd)
            except OSError:
                pass
        self.free, self.retired, self.lent, self.handed, self.dropped = [], [], [], set(), {}


_all_spares: "weakref.WeakSet[_Spares]" = weakref.WeakSet()
# The parent's ends of every pool's pipes: a forked child must not keep them open, or a
# worker would never see EOF when the parent dies (its sibling holds its pipe).
_parent_ends: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _before_fork() -> None:
    for spares in list(_all_spares):
        spares._before_fork()


def _in_child() -> None:
    for spares in list(_all_spares):
        spares._in_child()
    for conn in list(_parent_ends):
        try:
            conn.close()
        except OSError:
            pass
    _parent_ends.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)


# ----------------------------------------------------------------------------
# Workers


def ship_into(result: Any, fd: int, limit: int = PIPE_LIMIT, mapping: _segment.RefillMapping | None = None) -> Shipped:
    """In a worker: write a large ``result`` into the spare ``fd`` (a small one goes through the pipe).

    Through ``mapping`` (a refill mapping of ``fd``) if the result fits in
    it. A full /dev/shm (ENOSPC) sends the value through the pipe instead.
    """
    if _nbytes(result, limit) < limit:
        return Shipped(value=result)
    whole = isinstance(result, np.ndarray) or _is_pandas(result)
    encoded = codecs.encode(result if whole else _Box(result))
    token = secrets.token_bytes(_segment.TOKEN_BYTES)
    recipe = {"type": encoded.type, "length": encoded.length, "attributes": encoded.attributes}
    try:
        size = mapping.fill(fd, SPARE, token, recipe, encoded.buffers) if mapping is not None else None
        if size is None:
            size = _segment.fill(fd, SPARE, token, recipe, encoded.buffers)
    except ShmError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return Shipped(value=result, fell_back=True)
    handle = ShmObj(SPARE, encoded.type, encoded.length, size, encoded.attributes, True, token)
    return Shipped(handle=handle, boxed=not whole)


class _Mappings:
    """A worker's refill mappings, by spare id, oldest first."""

    def __init__(self) -> None:
        self.maps: dict[int, _segment.RefillMapping] = {}

    def get(self, sid: int) -> _segment.RefillMapping | None:
        return self.maps.get(sid)

    def drop(self, sids: Iterable[int]) -> None:
        for sid in sids:
            mapping = self.maps.pop(sid, None)
            if mapping is not None:
                mapping.close()

    def remember(self, sid: int, fd: int, length: int) -> None:
        """Map the first ``length`` bytes of ``fd`` (just written) for the next refill."""
        current = self.maps.get(sid)
        if current is not None and current.length >= length:
            return
        self.drop([sid])
        while len(self.maps) >= WORKER_MAPPINGS:
            self.drop([next(iter(self.maps))])
        try:
            self.maps[sid] = _segment.RefillMapping(fd, length)
        except (OSError, ValueError):
            pass  # the next refill uses pwrite


def _pool_worker(conn: Any, receiver: int) -> None:
    """Worker main loop: receive (options, chunk, drops) and the chunk's spares; answer one message per item.

    ``receiver``: the parent's pid.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    _shmarray.name_for_receiver(receiver)
    mappings = _Mappings()
    try:
        while True:
            try:
                task = conn.recv()
                if task is None:
                    return
                options, entries, drops = task
                mappings.drop(drops)
                fds = {index: reduction.recv_handle(conn) for index, _, _, sid in entries if sid is not None}
            except (EOFError, OSError):
                return
            for index, item, name, sid in entries:
                fd = fds.pop(index, -1)
                try:
                    shipped: list[Shipped] = []

                    def produce() -> Shipped:
                        if options.seed is not None:
                            _seed_item(options.seed, index)
                        result = options.func(item)
                        if fd >= 0:
                            shipped.append(ship_into(result, fd, options.limit, mappings.get(sid)))
                        else:
                            shipped.append(ship(result, name, options.limit))
                        return shipped[0]

                    message, handover = _answer.answer(index, produce)
                    conn.send_bytes(message)
                    if handover is not None:
                        handover.complete()
                    # Off the result's path: map what was just written, for the next refill.
                    if fd >= 0 and handover is not None and shipped[0].handle is not None:
                        mappings.remember(sid, fd, shipped[0].handle.size)
                finally:
                    if fd >= 0:
                        os.close(fd)
    finally:
        _shmarray.unlink_owned()  # the process leaves through os._exit, which skips finalisers


# ----------------------------------------------------------------------------
# The parent


def _consume(segment: _segment.OpenSegment, handle: ShmObj, copy: bool) -> tuple[Any, list[int]]:
    """Rebuild the object in ``segment``; also return the addresses of its arrays' mappings."""
    if not isinstance(handle.token, bytes):
        raise CorruptHandleError(f"{segment.name}: damaged token")
    recipe = segment.read_recipe(handle.token)
    check_handle_matches(handle, recipe)
    buffers = segment.arrays(copy or not _segment.ZERO_COPY)
    addresses = [] if copy else [b.__array_interface__["data"][0] for b in buffers if b.nbytes]
    return codecs.decode(recipe["attributes"], buffers), addresses


class _PoolRun(_Run):
    """One :meth:`Pool.map` call on the pool's persistent workers."""

    LABEL = "shmalloc.Pool.map"

    def __init__(self, pool: "Pool", items: list, options: _Options, chunksize: int, copy: bool, progress: bool):
        super().__init__(pool._ctx, items, options, pool._processes, chunksize, copy, progress)
        self.pool = pool
        self.workers = pool._workers
        self.spares: dict[int, _Spare] = {}  # index -> spare handed out with it
        self.consumed_bytes = 0

    def run(self) -> list[Any]:
        pool = self.pool
        pool._spares.reclaim()
        try:
            for worker in [w for w in self.workers if w.process.exitcode is not None]:
                self.workers.remove(worker)  # died while idle: costs nothing, is replaced below
                pool._spares.dropped.pop(worker.process.pid, None)
                worker.conn.close()
                worker.process.close()
            while len(self.workers) < self.nproc:
                self._start_worker()
            if self.progress:
                self.bar = _progress_bar(len(self.items))
            for worker in list(self.workers):
                self._dispatch(worker)
            while self.done < len(self.items):
                self._step()
        except BaseException:
            self._stop(graceful=False)  # also stops workers still writing into spares
            pool._spares.dropped.clear()  # their mappings died with them
            raise
        finally:
            pool._workers = self.workers
            for name in self.names.values():
                discard(name)
            self.names.clear()
            for spare in self.spares.values():  # handed out, not used: still good spares
                pool._spares.give(spare)
            self.spares.clear()
            if self.bar is not None:
                self.bar.close()
        pool._spares.trim(self.consumed_bytes + self.consumed_bytes // 4)  # slack: objects only grow
        self._warn_fallbacks()
        return self.results

    def _start_worker(self) -> None:
        if self.pool._terminating:
            raise RuntimeError("Pool.terminate() was called while this map was running")
        super()._start_worker()

    def _buried(self, worker: _Worker) -> None:
        if self.pool._terminating:
            raise RuntimeError("Pool.terminate() was called while this map was running")
        super()._buried(worker)

    def _new_process(self, parent_end: Any, child_end: Any) -> multiprocessing.process.BaseProcess:
        _parent_ends.add(parent_end)  # before the fork: the child closes its copy of it too
        return self.ctx.Process(target=_pool_worker, args=(child_end, os.getpid()), daemon=True)

    def _dispatch(self, worker: _Worker) -> None:
        if self.next_chunk >= len(self.chunks):
            return
        chunk = self.chunks[self.next_chunk]
        self.next_chunk += 1
        entries, fds = [], []
        pid = worker.process.pid
        for index in chunk:
            spare = self.pool._spares.take(pid) if self.pool._recycle else None
            if spare is None:
                self.names[index] = _names.generate()
                entries.append((index, self.items[index], self.names[index], None))
            else:
                self.spares[index] = spare
                spare.mappers.add(pid)  # the worker maps it after filling it
                fds.append(spare.fd)
                entries.append((index, self.items[index], None, spare.sid))
        worker.pending = list(chunk)
        drops = self.pool._spares.dropped.pop(pid, [])
        try:
            worker.conn.send((self.options, entries, drops))
            for fd in fds:
                reduction.send_handle(worker.conn, fd, worker.process.pid)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"item {chunk[0]}..{chunk[-1]} could not be pickled to its worker: {exc}") from exc
        except OSError:
            pass  # the worker is gone: _step sees its sentinel and names the item

    def _receive(self, index: int, shipped: Shipped) -> Any:
        handle = shipped.handle
        spare = self.spares.pop(index, None)
        if handle is None:
            if spare is not None:
                self.pool._spares.give(spare)
            else:
                del self.names[index]
            return shipped.value
        if spare is not None:
            try:
                with _segment.HeldSegment(spare.fd, SPARE, handle.size) as segment:
                    value, addresses = _consume(segment, handle, self.copy)
            except BaseException:
                self.pool._spares.release(spare)
                raise
            spare.size = max(spare.size, handle.size)
        else:
            name = self.names[index]
            if handle.name != name:
                raise ShmError(errno.EINVAL, f"a worker answered with segment {handle.name!r}", name)
            del self.names[index]
            with _segment.OpenSegment(name, handle.size) as segment:  # opens and unlinks the name
                value, addresses = _consume(segment, handle, self.copy)
                fd = _segment.reopen_writable(segment) if self.pool._recycle else -1
            spare = _Spare(fd, handle.size) if fd >= 0 else None
        self.consumed_bytes += handle.size
        if spare is not None and addresses:
            self.pool._spares.lend(spare, addresses)
        elif spare is not None:
            self.pool._spares.give(spare)
        return value.value if shipped.boxed else value


class Pool:
    """Persistent worker processes whose results come back through warm shared memory.

    Parameters
    ----------
    processes : int, optional
        Number of worker processes (default: the usable CPUs).
    start_method : {"fork", "forkserver", "spawn"}, optional
        How workers start; None: the platform's default. Workers start when
        the pool is made: under fork they see the parent's state as it is then.
    pipe_limit : int, default 65536
        Results holding fewer bytes than this go through the pipe.
    recycle : bool, default True
        Keep the shared memory objects of consumed results as spares for the
        next results, whose pages then need no faulting in. Between calls the
        pool keeps free spares of at most 1.25 times the bytes its last call
        returned (objects of ``copy=False`` results join them once those
        results are freed), and each worker keeps a mapping of the spares it
        filled, so that refilling them is a plain memory copy. False: every result gets a fresh object, freed
        with it.

    Notes
    -----
    Spares have no name (nothing of them appears in /dev/shm) and are freed
    by :meth:`close`, or at the latest when this process ends. A
    ``copy=False`` result never shares pages with a later result: its object
    is reused only after all its arrays are freed, and never if the process
    forked while they were alive (the child's copy-on-write view would see
    the new data). Functions and items are pickled to the workers, so
    ``func`` must be picklable (a module-level function) under every start
    method; :func:`shmalloc.map` takes lambdas under fork.

    A pool may be shared by threads: their :meth:`map` calls run one after
    the other (as :class:`multiprocessing.pool.Pool` users expect), and
    :meth:`close` waits for a running call. :meth:`terminate` stops the
    workers at once; a call running in another thread then raises
    :class:`RuntimeError` saying so.

    Examples
    --------
    >>> import numpy as np, shmalloc
    >>> with shmalloc.Pool(2) as pool:
    ...     [a.sum() for a in pool.map(np.ones, [100_000, 200_000])]
    [np.float64(100000.0), np.float64(200000.0)]
    """

    def __init__(
        self,
        processes: int | None = None,
        start_method: str | None = None,
        *,
        pipe_limit: int = PIPE_LIMIT,
        recycle: bool = True,
    ) -> None:
        if processes is not None:
            check_count("processes", processes, 1)
        check_count("pipe_limit", pipe_limit, 0)
        if not isinstance(recycle, bool):
            raise TypeError("recycle must be bool")
        self._ctx = start_context(start_method)
        self._processes = processes or usable_cpus()
        self._limit = pipe_limit
        self._recycle = recycle
        self._spares = _Spares()
        self._workers: list[_Worker] = []
        self._closed = False
        # One call at a time: a run owns the workers, their pipes and the spares it hands out.
        self._lock = threading.Lock()
        self._terminating = False  # set by terminate(), read by a run in another thread
        self._runner: int | None = None  # the thread running a call (a signal handler may interrupt it)
        _PoolRun(self, [], _Options(abs, None, None, pipe_limit), 1, True, False).run()  # start the workers

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        copy: bool = True,
        chunksize: int = 1,
        progress: bool = False,
        seed: int | np.random.SeedSequence | None = None,
    ) -> list[Any]:
        """Apply ``func`` to each item in the pool's workers; return the results in input order.

        Parameters and errors are those of :func:`shmalloc.map` (``func``
        and the items are pickled to the workers under every start method).
        After an error the pool's workers are stopped; the next call starts
        new ones.

        Returns
        -------
        list
            ``[func(item) for item in iterable]``.
        """
        if self._closed:
            raise ValueError("the pool is closed")
        ctx_method = self._ctx.get_start_method()
        _, items, options = _prepare(func, iterable, None, copy, ctx_method, chunksize, seed, self._limit)
        if ctx_method == "fork":
            try:
                pickle.dumps(func)
            except Exception as exc:
                raise TypeError(f"Pool.map pickles func to its running workers (use a module-level function): {exc}") from exc
        options = _Options(options.func, None, options.seed, options.limit)
        self._refuse_reentry("map")
        with self._lock:
            if self._closed:
                raise ValueError("the pool is closed")
            if not items:
                return []
            self._runner = threading.get_ident()
            try:
                return _PoolRun(self, items, options, chunksize, copy, progress).run()
            finally:
                self._runner = None
                if self._terminating:  # terminate() was called by this thread (a signal handler) meanwhile
                    self._shut(graceful=False)

    def close(self) -> None:
        """Let a running :meth:`map` (of another thread) finish, stop and reap the workers, release the spares."""
        self._refuse_reentry("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shut(graceful=True)

    def terminate(self) -> None:
        """Kill the workers at once, reap them, release the spares.

        Also while a :meth:`map` runs, in another thread or in this one (a
        signal handler): that call then raises RuntimeError.
        """
        self._terminating = True
        for worker in list(self._workers):  # a copy: a running map may change the list
            try:
                worker.process.terminate()
            except (ValueError, AttributeError):
                pass  # closed or not yet started by the running map: it stops on _terminating
        if self._runner == threading.get_ident():
            self._closed = True  # the interrupted call raises when it resumes, and then cleans up
            return
        with self._lock:
            self._closed = True
            self._shut(graceful=False)

    def _refuse_reentry(self, what: str) -> None:
        # The lock is not reentrant: waiting for it in the thread that holds it would hang.
        if self._runner == threading.get_ident():
            raise RuntimeError(f"Pool.{what}() called while this thread runs Pool.map (from a signal handler or callback?)")

    def _shut(self, graceful: bool) -> None:
        run = _PoolRun(self, [], _Options(abs, None, None, self._limit), 1, True, False)
        run._stop(graceful=graceful)
        self._workers = []
        self._spares.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.terminate()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


__all__ = ["Pool"]
