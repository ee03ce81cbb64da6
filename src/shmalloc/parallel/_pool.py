"""shmalloc.Pool: persistent workers that return results through shared memory, on warm pages.

A :func:`shmalloc.map` call starts its workers, and each result lands in a
fresh segment whose pages the kernel must fault in one by one (about 4 us
per 4 KB page here, more than copying the page). A :class:`Pool` keeps its
workers across calls, and keeps the objects of consumed results as *spares*:
unlinked shared memory objects held only by a descriptor of the parent. The
next task gets a spare through its pipe (SCM_RIGHTS) and its worker writes
into pages that already exist: with pwrite the first time, then through a
shared mapping of the spare that the worker keeps, which is a plain memcpy
(about 2.5 times faster than pwrite here). A spare may be cut below such a
mapping (a small ``copy=False`` result read from a large spare, see
:func:`._recycling.read_result`): a write through it checks the object's
size first and uses pwrite if the result does not fit. When the parent releases a
spare between calls, it tells the idle workers that map it to unmap it and
waits for their answer (a task with no item), so that its space is free.

A spare has no name, so nothing of it is in /dev/shm's listing (``df``
counts it), and it is gone with the parent's descriptor and the workers'
mappings (at :meth:`Pool.close`, or when the process dies). How many the
pool keeps, and how they give way to other writes: :mod:`._spares`. An
object lent to a ``copy=False`` result becomes a spare only when every
array mapping it has been freed; a fork while it is lent retires it
for good, because a forked child keeps reading the object's pages through
its copy-on-write mapping.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from multiprocessing import connection
from typing import Any

import numpy as np

from . import _protocol, _serial
from ._call import Call, look_ahead
from ._options import (
    PIPE_LIMIT,
    Options,
    check_count,
    pick_chunksize,
    portable,
    prepare,
    resolve_processes,
    start_context,
)
from ._recycling import SpareResults
from ._spares import DEFAULT_LIMIT, Spares, check_limit
from ._workers import Workers

#: How error notes name the call.
LABEL = "shmalloc.Pool.map"


class Pool:
    """Persistent worker processes whose results come back through warm shared memory.

    Parameters
    ----------
    processes : int, optional
        Number of worker processes (default: the usable CPUs). Negative
        counts back from the usable CPUs, as in joblib: -1 is all of them.
    start_method : {"fork", "forkserver", "spawn"}, optional
        How workers start. None: fork on Linux, the platform's default
        elsewhere (see :func:`shmalloc.map`). Workers start when the pool is
        made, and again after a call failed: under fork they see the
        parent's state as it is then.
    initializer : callable, optional
        Called as ``initializer(*initargs)`` in each worker when it starts.
        If it raises, the next :meth:`map` raises its exception (with the
        worker's traceback in a note) instead of starting workers forever,
        as :class:`multiprocessing.pool.Pool` would.
    initargs : tuple
        Arguments for ``initializer``.
    pipe_limit : int, default 65536
        Results holding fewer bytes than this go through the pipe.
    recycle : bool, default True
        Keep the shared memory objects of consumed results as spares for the
        next results, whose pages then need no faulting in. Between calls the
        pool keeps free spares of at most 1.25 times the bytes the largest of
        its last three calls returned, and within ``spare_limit`` (objects of ``copy=False``
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
    the new data). ``func`` and ``initializer`` travel to the workers by
    reference where a worker can import them, else by value (cloudpickle),
    so lambdas and closures work; the items are pickled.

    Results are made where they are shipped: while ``func`` runs, numpy's
    allocations of 1 MiB or more in its thread come from the warm shared
    memory of the spare its result will go into (once the worker has
    filled that spare), and a result whose arrays lie there goes to the
    parent without a copy. Arrays ``func`` keeps (in a global, a cache)
    stay valid and the worker's own: before the answer leaves, their pages
    are copied into private memory of the worker (a fork does the same).
    The spare then grows to what the tasks want; a ``copy=False`` result
    made in place keeps the spare's pages until the second call after it
    begins (or :meth:`close`), then only its own if it takes less than half
    of them.
    See the design notes, "Results made where they are shipped".

    A pool made inside a worker of shmalloc's (from ``func``) starts no
    workers: its calls run their items in that worker, one after the other.

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
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        processes = resolve_processes(processes)
        check_count("pipe_limit", pipe_limit, 0)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        if not isinstance(recycle, bool):
            raise TypeError("recycle must be bool")
        check_limit(spare_limit)
        self._ctx = start_context(start_method)
        self._processes = processes
        self._limit = pipe_limit
        self._recycle = recycle
        start = None if initializer is None else (portable(initializer, "initializer"), initargs)
        self._workers = Workers(self._ctx, initializer=start)
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
        self._imap: weakref.ref | None = None  # the last imap's generator
        self._imap_holds = False  # it holds the pool (a call of it runs, or waits between two results)
        # Made inside a worker (from func): no workers of its own, its calls run serially there.
        self._serial = _serial.in_worker()
        with self._spares.held():
            try:
                while len(self._workers) < self._processes and not self._serial:
                    self._workers.start()
            except BaseException:
                self._workers.stop(graceful=False)
                raise

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        copy: bool = True,
        chunksize: int | None = None,
        progress: bool = False,
        seed: int | np.random.SeedSequence | None = None,
        errors: str = "raise",
        retries: int = 0,
    ) -> list[Any]:
        """Apply ``func`` to each item in the pool's workers; return the results in input order.

        Parameters and errors are those of :func:`shmalloc.map` (under every
        start method ``func`` travels by reference or by value, and the items
        are pickled).
        After an error that stops the call (``errors="raise"``) the pool's
        workers are stopped; the next call starts new ones. A worker that
        died while the call goes on (a retry, ``errors="return"``) is
        replaced at once.

        Returns
        -------
        list
            ``[func(item) for item in iterable]``.
        """
        items, options = self._arguments("map", func, iterable, copy, chunksize, seed, errors, retries, lazy=False)
        if self._serial:
            return _serial.run(options.func, items, seed=options.seed, errors=errors, retries=retries, label=LABEL)
        if not items:
            self._refuse_reentry("map")
            return []
        chunks = pick_chunksize(chunksize, len(items), self._processes)
        shrink_tail = chunksize is None
        results = self._results("map", items, options, copy, chunks, progress, errors, retries, True, False, shrink_tail)
        return list(results)

    def imap(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        ordered: bool = True,
        copy: bool = True,
        chunksize: int = 1,
        progress: bool = False,
        seed: int | np.random.SeedSequence | None = None,
        errors: str = "raise",
        retries: int = 0,
    ) -> Iterator[Any]:
        """Apply ``func`` to each item in the pool's workers; yield the results as they come.

        As :func:`shmalloc.imap`, on the pool's workers. The pool serves one
        call at a time: the iteration holds it from its first result until
        it ends (a call of another thread waits; one of this thread inside
        the loop is refused), so finish the loop, ``break`` out of it, or
        close the iterator (:func:`contextlib.closing`). :meth:`close` and
        :meth:`terminate` called by the iterating thread stop it first.
        Leave an unfinished iterator to the thread that iterates it: closed
        by the garbage collector in another thread, it cannot give the pool
        back.

        Yields
        ------
        object
            ``func(item)`` for each item: in input order, or (``ordered=False``)
            in the order they are ready.
        """
        items, options = self._arguments("imap", func, iterable, copy, chunksize, seed, errors, retries, lazy=True)
        if self._serial:
            return _serial.iterate(options.func, items, seed=options.seed, errors=errors, retries=retries, label=LABEL)
        results = self._results("imap", items, options, copy, chunksize, progress, errors, retries, ordered=ordered, lazy=True)
        self._imap = weakref.ref(results)
        return results

    def _arguments(
        self,
        what: str,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        copy: bool,
        chunksize: int | None,
        seed: int | np.random.SeedSequence | None,
        errors: str,
        retries: int,
        lazy: bool,
    ) -> tuple[Any, Options]:
        """Check a call's arguments; return its items (a list, or the iterable itself if ``lazy``) and options."""
        self._refuse_other_process(what)
        if self._closed:
            raise ValueError("the pool is closed")
        _, items, options = prepare(
            func,
            iterable,
            processes=None,
            copy=copy,
            start_method=self._ctx.get_start_method(),
            chunksize=chunksize,
            seed=seed,
            pipe_limit=self._limit,
            workers_per_call=False,
            errors=errors,
            retries=retries,
            lazy=lazy,
        )
        return items, options

    def _results(
        self,
        what: str,
        items: Iterable[Any],
        options: Options,
        copy: bool,
        chunksize: int,
        progress: bool,
        errors: str,
        retries: int,
        ordered: bool,
        lazy: bool,
        shrink_tail: bool = False,
    ) -> Generator[Any, None, None]:
        """Run a call on the pool's workers, holding the pool; yield its results."""
        self._refuse_reentry(what)
        with self._lock:
            if self._closed:
                raise ValueError("the pool is closed")
            self._runner = threading.get_ident()
            self._imap_holds = lazy
            try:
                with self._spares.held():  # spares come back from other threads only between calls
                    if self._closed:  # by a signal handler of this thread, before _runner was set
                        raise ValueError(f"the pool was closed while this {what} was starting")
                    call = Call(
                        self._workers,
                        items,
                        options,
                        nproc=self._processes,
                        chunksize=chunksize,
                        results=SpareResults(copy, self._spares, self._recycle),
                        progress=progress,
                        label=f"shmalloc.Pool.{what}",
                        persistent=True,
                        interrupted=self._interrupted,
                        errors=errors,
                        retries=retries,
                        look_ahead=look_ahead(self._processes, chunksize) if lazy else None,
                        fail_at_turn=lazy,
                        hold_answers=not lazy,
                        shrink_tail=shrink_tail,
                    )
                    yield from call.iterate(ordered)
            finally:
                self._runner = None
                self._imap_holds = False
                if self._terminating:  # terminate() was called by this thread (a signal handler) meanwhile
                    self._shut(graceful=False)

    def _interrupted(self) -> str | None:
        return "Pool.terminate() was called while a call of this pool was running" if self._terminating else None

    def close(self) -> None:
        """Let a running :meth:`map` (of another thread) finish, stop and reap the workers, release the spares.

        An :meth:`imap` of this thread that has not ended is stopped first.
        """
        if os.getpid() != self._pid:
            self._forget()
            return
        self._end_own_imap()
        self._refuse_reentry("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shut(graceful=True)

    def terminate(self) -> None:
        """Kill the workers at once, reap them, release the spares.

        Also while a :meth:`map` runs, in another thread or in this one (a
        signal handler): that call then raises RuntimeError. An :meth:`imap`
        of this thread that has not ended is stopped; one of another thread,
        waiting between two of its results, raises RuntimeError when it goes
        on, and shuts the pool then.
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
        self._end_own_imap()
        if self._suspended_imap() is not None:  # another thread's, between two results: it shuts the pool
            self._closed = True
            return
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

    def _suspended_imap(self) -> Generator[Any, None, None] | None:
        """The imap that holds the pool between two of its results (its thread runs other code), if any."""
        generator = self._imap() if self._imap is not None else None
        if generator is None or generator.gi_running or generator.gi_frame is None or not self._imap_holds:
            return None
        return generator

    def _end_own_imap(self) -> None:
        """Stop this thread's imap that holds the pool between two of its results (closing it cleans up here)."""
        generator = self._suspended_imap()
        if generator is not None and self._runner == threading.get_ident():
            generator.close()

    def _forget(self) -> None:
        # In a forked child: the workers are the parent's (no signal, join or message to them;
        # their pipes' ends were closed at the fork) and so are the spares (closed at the fork too).
        # Only drop them; the pool's locks may have been held by a thread that the child lacks.
        self._closed = True
        self._workers = Workers(self._ctx, initializer=self._workers.initializer)

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
                raise RuntimeError(
                    f"Pool.{what}() called while this thread runs a call of this pool (from a signal handler or callback,"
                    " or in the loop over its imap?)"
                )
            raise RuntimeError(
                f"Pool.{what}() called while this thread works on the pool's spares (from a signal handler or finalizer?)"
            )

    def _shut(self, graceful: bool) -> None:
        with self._spares.held():
            self._workers.stop(graceful=graceful)
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
                    worker.conn.send(_protocol.Unmap(tuple(drops)))
                except OSError:
                    continue  # gone: its mappings went with it
                asked.append(worker)
        try:
            while asked:
                worker = asked[0]
                try:
                    connection.wait([worker.conn, worker.process.sentinel])
                    if worker.conn.poll() and not _protocol.read_unmapped(worker.conn.recv_bytes()):
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
