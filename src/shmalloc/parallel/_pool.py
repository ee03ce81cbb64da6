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
spare between calls, it tells the idle workers that map it to unmap it and
waits for their answer (a task with no item), so that its space is free.

A spare has no name, so nothing of it is in /dev/shm's listing (``df``
counts it), and it is gone with the parent's descriptor and the workers'
mappings (at :meth:`Pool.close`, or when the process dies). How many the
pool keeps, and how they give way to other writes: :mod:`._spares`. An object lent to a ``copy=False`` result becomes a spare only when
every array mapping it has been freed; a fork while it is lent retires it
for good, because a forked child keeps reading the object's pages through
its copy-on-write mapping.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import signal
import threading
import weakref
from multiprocessing import connection, reduction
from typing import Any, Callable, Iterable

import numpy as np

from .. import _names, _shmarray, _transfer
from . import _protocol as _answer
from ..errors import ShmError
from .._handle import ShmObj
from .._shared import SPARE_LABEL, RefillMapping
from ._spares import DEFAULT_LIMIT, Spare, Spares, check_limit, fork_stamp
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
SPARE = SPARE_LABEL
#: Refill mappings a worker keeps at most (the oldest is dropped first).
WORKER_MAPPINGS = 8


# ----------------------------------------------------------------------------
# Forks of the parent


# The parent's ends of every pool's pipes: a forked child must not keep them open, or a
# worker would never see EOF when the parent dies (its sibling holds its pipe).
_parent_ends: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _in_child() -> None:
    for conn in list(_parent_ends):
        try:
            conn.close()
        except OSError:
            pass
    _parent_ends.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)


# ----------------------------------------------------------------------------
# Workers


def ship_into(result: Any, fd: int, limit: int = PIPE_LIMIT, mapping: RefillMapping | None = None) -> Shipped:
    """In a worker: write a large ``result`` into the spare ``fd`` (a small one goes through the pipe).

    Through ``mapping`` (a refill mapping of ``fd``) if the result fits in
    it. A full /dev/shm (ENOSPC) sends the value through the pipe instead.
    """
    if _nbytes(result, limit) < limit:
        return Shipped(value=result)
    whole = isinstance(result, np.ndarray) or _is_pandas(result)
    try:
        handle = _transfer.write_held(result if whole else _Box(result), fd, mapping)
    except ShmError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return Shipped(value=result, fell_back=True)
    return Shipped(handle=handle, boxed=not whole)


class _Mappings:
    """A worker's refill mappings, by spare id, oldest first."""

    def __init__(self) -> None:
        self.maps: dict[int, RefillMapping] = {}

    def get(self, sid: int) -> RefillMapping | None:
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
            self.maps[sid] = RefillMapping(fd, length)
        except (OSError, ValueError):
            pass  # the next refill uses pwrite


def _pool_worker(conn: Any, receiver: int) -> None:
    """Worker main loop: receive (options, chunk, drops) and the chunk's spares; answer one message per item.

    ``receiver``: the parent's pid.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    _shmarray.name_for_receiver(receiver)
    # The parent terminates a worker whose results it no longer wants (SIGTERM): unlink the
    # ShmArrays' names this worker owns (they carry the parent's pid) before dying of it.
    signal.signal(signal.SIGTERM, _shmarray.unlink_owned_and_die)
    mappings = _Mappings()
    try:
        while True:
            try:
                task = conn.recv()
                if task is None:
                    return
                options, entries, drops = task
                mappings.drop(drops)
                if not entries:  # only unmapping was asked: say it is done (then the space is free)
                    conn.send_bytes(_answer.unmapped())
                    continue
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


def _consume(segment: _transfer.Segment, handle: ShmObj, copy: bool) -> tuple[Any, list[np.ndarray]]:
    """Rebuild the object in ``segment``; also return the arrays that own mappings of it."""
    return _transfer.read(segment, handle, copy)


class _PoolRun(_Run):
    """One :meth:`Pool.map` call on the pool's persistent workers."""

    LABEL = "shmalloc.Pool.map"

    def __init__(self, pool: "Pool", items: list, options: _Options, chunksize: int, copy: bool, progress: bool):
        super().__init__(pool._ctx, items, options, pool._processes, chunksize, copy, progress)
        self.pool = pool
        self.workers = pool._workers
        self.spares: dict[int, Spare] = {}  # index -> spare handed out with it
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
        pool._spares.end_call(self.consumed_bytes)
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
        stamp = fork_stamp()  # before the result's arrays map the object: a fork from now on retires it
        if handle is None:
            if spare is not None:
                self.pool._spares.give(spare)
            else:
                del self.names[index]
            return shipped.value
        if spare is not None:
            try:
                with _transfer.open_held(spare.fd, SPARE, handle.size) as segment:
                    value, owners = _consume(segment, handle, self.copy)
            except BaseException:
                self.pool._spares.release(spare)
                raise
            spare.size = max(spare.size, handle.size)
        else:
            name = self.names[index]
            if handle.name != name:
                raise ShmError(errno.EINVAL, f"a worker answered with segment {handle.name!r}", name)
            del self.names[index]
            with _transfer.open_named(name, handle.size) as segment:  # opens and unlinks the name
                value, owners = _consume(segment, handle, self.copy)
                fd = segment.reopen_writable() if self.pool._recycle else -1
            spare = Spare(fd, handle.size) if fd >= 0 else None
        self.consumed_bytes += handle.size
        if spare is not None and owners:
            self.pool._spares.lend(spare, owners, stamp)
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
        returned, and within ``spare_limit`` (objects of ``copy=False``
        results join them once those results are freed), and each worker
        keeps a mapping of the spares it filled, so that refilling them is a
        plain memory copy. False: every result gets a fresh object, freed
        with it.
    spare_limit : float or int, default 0.25
        How much of /dev/shm free spares may take. A float between 0.0 and
        1.0: that share of the space free in /dev/shm, counting the spares'
        own space as free (so by default the spares never take more than a
        quarter of what other programs leave, and never more than a quarter
        of /dev/shm). An int: that many bytes. 0 keeps no spare between
        calls.

    Notes
    -----
    Spares have no name (nothing of them appears in /dev/shm, but ``df``
    counts them; ``python -m shmalloc ls`` shows them with the process that
    holds them) and are freed by :meth:`close`, or at the latest when this
    process ends. The budget is applied at the end of every call and
    whenever the objects of freed ``copy=False`` results come back; when a
    write of this process (``copy2shm``, ``ShmArray``) finds /dev/shm full,
    every free spare is released and the write is tried once more. A
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
        spare_limit: float | int = DEFAULT_LIMIT,
    ) -> None:
        if processes is not None:
            check_count("processes", processes, 1)
        check_count("pipe_limit", pipe_limit, 0)
        if not isinstance(recycle, bool):
            raise TypeError("recycle must be bool")
        check_limit(spare_limit)
        self._ctx = start_context(start_method)
        self._processes = processes or usable_cpus()
        self._limit = pipe_limit
        self._recycle = recycle
        self._workers: list[_Worker] = []
        self._spares = Spares(spare_limit, self._unmap_released)
        self._closed = False
        self._pid = os.getpid()  # the workers and spares are this process's: a forked child's close leaves them
        # One call at a time: a run owns the workers, their pipes and the spares it hands out.
        # Taken before the spares' own lock (which their other users take alone). Reentrant:
        # terminate() from a signal handler that interrupted this thread holding it must not
        # wait for itself; the interrupted map or close then finds the pool shut.
        self._lock = threading.RLock()
        self._terminating = False  # set by terminate(), read by a run in another thread
        self._runner: int | None = None  # the thread running a call (a signal handler may interrupt it)
        with self._spares.held():
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
        self._refuse_other_process("map")
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
                with self._spares.held():  # spares come back from other threads only between calls
                    if self._closed:  # by a signal handler of this thread, before _runner was set
                        raise ValueError("the pool was closed while this map was starting")
                    return _PoolRun(self, items, options, chunksize, copy, progress).run()
            finally:
                self._runner = None
                if self._terminating:  # terminate() was called by this thread (a signal handler) meanwhile
                    self._shut(graceful=False)

    def close(self) -> None:
        """Let a running :meth:`map` (of another thread) finish, stop and reap the workers, release the spares."""
        if os.getpid() != self._pid:
            self._forget()
            return
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
        if os.getpid() != self._pid:
            self._forget()
            return
        self._terminating = True
        for worker in list(self._workers):  # a copy: a running map may change the list
            try:
                worker.process.terminate()
            except (ValueError, AttributeError):
                pass  # closed or not yet started by the running map: it stops on _terminating
        if self._runner == threading.get_ident():
            self._closed = True  # the interrupted call raises when it resumes, and then cleans up
            return
        if self._spares.held_here():
            # A signal handler interrupted this thread's own work on the spares (taking back
            # freed results' objects): finish the shutdown once that releases them.
            self._closed = True
            self._spares.when_free(self._shut_unless_busy)
            return
        with self._lock:
            self._closed = True
            self._shut(graceful=False)

    def _forget(self) -> None:
        # In a forked child: the workers are the parent's (no signal, join or message to them;
        # their pipes' ends were closed at the fork) and so are the spares (closed at the fork too).
        # Only drop them; the pool's locks may have been held by a thread that the child lacks.
        self._closed = True
        self._workers = []

    def _refuse_other_process(self, what: str) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"Pool.{what}() called in a forked child (pid {os.getpid()}) of the process that made the pool"
                f" (pid {self._pid}): its workers are that process's; make a new Pool here"
            )

    def _shut_unless_busy(self) -> None:
        # After terminate() from a signal handler: the pool's lock is reentrant, so on the thread
        # that holds it this shuts the pool at once; a call holding it in another thread sees
        # _terminating and shuts the pool when it ends.
        if self._lock.acquire(blocking=False):
            try:
                self._shut(graceful=False)
            finally:
                self._lock.release()

    def _refuse_reentry(self, what: str) -> None:
        # On the thread running a call, map or close would run inside that call; on the thread
        # holding the spares' lock (not reentrant), they would wait for it forever.
        if self._runner == threading.get_ident() or self._spares.held_here():
            if self._runner == threading.get_ident():
                raise RuntimeError(f"Pool.{what}() called while this thread runs Pool.map (from a signal handler or callback?)")
            raise RuntimeError(f"Pool.{what}() called while this thread works on the pool's spares (from a signal handler or finalizer?)")

    def _shut(self, graceful: bool) -> None:
        with self._spares.held():
            run = _PoolRun(self, [], _Options(abs, None, None, self._limit), 1, True, False)
            run._stop(graceful=graceful)
            self._workers = []
            self._spares.close()

    def _unmap_released(self) -> None:
        """Have the idle workers unmap the spares released since their last task; return once they have.

        Only then is the space of those spares free. Called with the spares held, between calls
        (or at the end of one, when every worker has answered every item), so the pipes are idle.
        """
        asked = []
        for worker in self._workers:
            drops = self._spares.dropped.pop(worker.process.pid, None)
            if drops and worker.process.exitcode is None:
                try:
                    worker.conn.send((None, [], drops))
                except OSError:
                    continue  # gone: its mappings went with it
                asked.append(worker)
        try:
            while asked:
                worker = asked[0]
                try:
                    connection.wait([worker.conn, worker.process.sentinel])
                    if worker.conn.poll() and not _answer.read_unmapped(worker.conn.recv_bytes()):
                        # Out of step: a later call would read the rest as results. Replace it.
                        worker.process.kill()
                        worker.process.join()
                except (EOFError, OSError):
                    pass  # it died: so did its mappings
                asked.pop(0)
        except BaseException:
            # Interrupted (Ctrl-C): an answer left in a pipe would be taken for a result by
            # the next call. Stop the workers that still owe one; the next call replaces them.
            for worker in asked:
                worker.process.kill()
                worker.process.join()
            raise

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.terminate()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) not in (None, os.getpid()):
            self._forget()  # a forked child's copy: the parent's workers are not its to stop
            return
        if not getattr(self, "_closed", True):
            try:
                self._spares.when_free(self.close)  # this thread may hold the spares' lock: then it closes the pool on release
            except Exception:
                pass


__all__ = ["Pool"]
