"""shmalloc.map and shmalloc.imap: a parallel map whose workers, started for the call, return results through shared memory.

The parent owns every segment name: it chooses one per item before handing
the item to a worker, the worker places a large result under that name, and
the parent consumes it. The engine is the Pool's (:mod:`._call`,
:mod:`._workers`); what is particular to map: the workers are started for
the call (under fork they inherit ``func`` and the items, so lambdas work),
and each is told to exit with its last task, so that its exit overlaps with
the reading of the results.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import _serial
from ._call import Call, NamedResults, look_ahead
from ._options import PIPE_LIMIT, pick_chunksize, prepare, resolve_processes
from ._workers import Workers

#: How error notes name the calls.
LABEL = "shmalloc.map"
IMAP_LABEL = "shmalloc.imap"


def map(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    processes: int | None = None,
    copy: bool = True,
    start_method: str | None = None,
    chunksize: int | None = None,
    progress: bool = False,
    seed: int | np.random.SeedSequence | None = None,
    pipe_limit: int = PIPE_LIMIT,
    errors: str = "raise",
    retries: int = 0,
) -> list[Any]:
    """Apply ``func`` to each item in worker processes; return the results in input order.

    Large results (arrays, data frames, and containers holding them) come
    back through POSIX shared memory, small ones through a pipe.

    Parameters
    ----------
    func : callable
        Called as ``func(item)`` in a worker. Under fork it is inherited;
        under spawn and forkserver it travels by reference where the worker
        can import it, else by value (cloudpickle), so lambdas and closures
        work under every start method.
    iterable : iterable
        The items. Under fork they are inherited as well; otherwise each is
        pickled to its worker.
    processes : int, optional
        Number of worker processes (default: the usable CPUs, at most one
        per chunk). Negative counts back from the usable CPUs, as in joblib:
        -1 is all of them, -2 all but one.
    copy : bool, default True
        True: results are copied out of shared memory into regular memory.
        False: arrays in the results own private (copy-on-write) mappings of
        the segments: no copy, the memory is freed with the arrays.
    start_method : {"fork", "forkserver", "spawn"}, optional
        How workers start. None: fork on Linux (as bettermc's mclapply; also
        on Python 3.14, whose default became forkserver), the platform's
        default elsewhere. Fork inherits ``func``, the items and the
        parent's state without pickling; prefer forkserver when the parent
        runs threads of its own (fork copies only the calling thread, and
        a lock another thread held stays locked in the child).
    chunksize : int, optional
        Items handed to a worker at a time. By default about four chunks per
        process, as :meth:`multiprocessing.pool.Pool.map` does, and smaller
        ones towards the end, so that the workers finish together; 1
        balances items of very uneven cost best.
    progress : bool, default False
        Show a progress bar (``tqdm.auto``), if tqdm is installed.
    seed : int or numpy.random.SeedSequence, optional
        Item ``i`` runs with child ``i`` of ``SeedSequence(seed)``: numpy's
        and :mod:`random`'s global generators are seeded from it, and
        :func:`item_seed` returns it. Results then do not depend on the
        number of processes or on scheduling.
    pipe_limit : int, default 65536
        Results holding fewer bytes than this go through the pipe.
    errors : {"raise", "return"}, default "raise"
        What an item that failed (``func`` raised, its worker died, its
        result could not be rebuilt here) does once its retries are spent.
        "raise": the call stops dispatching, stops its workers and raises
        that item's exception. "return": the other items complete, the
        failed item's result is its exception (a
        :class:`WorkerDiedError` for a death), and one
        :class:`FailedItemsWarning` says how many failed.
    retries : int, default 0
        Run a failed item again up to this many times (in another worker if
        its worker died, with the same seed); a success counts as if it had
        succeeded the first time. Items the dead worker held but had not
        started are handed out again without counting a try, as are those
        it had finished but whose small results it still held back, to send
        them together with the next ones (only in a map, for items under
        5 ms that printed and warned nothing): they run again.

    Returns
    -------
    list
        ``[func(item) for item in iterable]``.

    Raises
    ------
    Exception
        With ``errors="raise"``: the exception ``func`` raised for the first
        failing item received (once its retries are spent),
        re-raised in the parent, with a note giving the item's index and the
        worker's traceback.
    WorkerError
        If that exception cannot be re-raised as it was (not picklable).
    WorkerDiedError
        If a worker ends while working on an item (killed, crashed, out of
        memory), naming the item.
    TypeError, ValueError
        For bad arguments, or a ``func`` that cannot be pickled under spawn
        or forkserver (e.g. it holds a lock).

    Warns
    -----
    ShmFallbackWarning
        Once per call, if /dev/shm was full and results came back through
        the pipe instead (they are still right).

    Notes
    -----
    Every segment made for the call is gone when ``map`` returns or raises,
    also after a killed worker or a KeyboardInterrupt. Its workers are
    reaped before ``map`` returns or raises: no descriptor or zombie of
    theirs is left. (A worker's last task tells it to exit once answered, so
    its exit overlaps with the reading of the results.)

    A :class:`shmalloc.ShmArray` that ``func`` makes and returns (also
    inside a container) arrives as a ShmArray over the same memory, and the
    parent takes over its name: it is unlinked when the parent's last
    reference dies. An error while rebuilding a result in the parent is
    raised as it is, with a note naming the item.

    Called inside a worker of shmalloc's (from ``func``), map runs the
    items in that worker, one after the other, with the same results.

    Each call starts its workers, and each result lands in a fresh segment
    whose pages the kernel must fault in (about as costly as copying them).
    For repeated calls, :class:`shmalloc.Pool` keeps its workers and reuses
    the memory of consumed results, which is several times faster for
    large results.

    Examples
    --------
    >>> import numpy as np, shmalloc
    >>> [a.sum() for a in shmalloc.map(np.ones, [100_000, 200_000], processes=2)]
    [np.float64(100000.0), np.float64(200000.0)]
    """
    ctx, items, options = prepare(
        func,
        iterable,
        processes=processes,
        copy=copy,
        start_method=start_method,
        chunksize=chunksize,
        seed=seed,
        pipe_limit=pipe_limit,
        workers_per_call=True,
        errors=errors,
        retries=retries,
    )
    if _serial.in_worker():  # a worker may not start workers of its own
        return _serial.run(func, items, seed=options.seed, errors=errors, retries=retries, label=LABEL)
    if not items:
        return []
    nproc = min(resolve_processes(processes), len(items))
    chunks = pick_chunksize(chunksize, len(items), nproc)
    nproc = min(nproc, math.ceil(len(items) / chunks))
    call = Call(
        Workers(ctx, inherited=options),
        items,
        options,
        nproc=nproc,
        chunksize=chunks,
        results=NamedResults(copy),
        progress=progress,
        label=LABEL,
        persistent=False,
        errors=errors,
        retries=retries,
        hold_answers=True,
        shrink_tail=chunksize is None,
    )
    return call.run()


def imap(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    ordered: bool = True,
    processes: int | None = None,
    copy: bool = True,
    start_method: str | None = None,
    chunksize: int = 1,
    progress: bool = False,
    seed: int | np.random.SeedSequence | None = None,
    pipe_limit: int = PIPE_LIMIT,
    errors: str = "raise",
    retries: int = 0,
) -> Iterator[Any]:
    """Apply ``func`` to each item in worker processes; yield the results as they come.

    Like :func:`map`, but the items are read as the work goes (at most a
    few chunks per worker ahead of the results taken), and each result is
    yielded as soon as it is ready: in input order, or (``ordered=False``)
    in the order the workers finish them.

    Parameters
    ----------
    ordered : bool, default True
        Yield in input order (a slow item holds back the later ones, which
        wait here), or in the order results are ready.
    chunksize : int, default 1
        Items handed to a worker at a time (as ``multiprocessing``'s imap).
    func, iterable, processes, copy, start_method, progress, seed, pipe_limit, errors, retries
        As for :func:`map`. ``processes`` is not capped by the number of
        items (unknown ahead); the items are pickled to the workers under
        every start method.

    Yields
    ------
    object
        ``func(item)`` for each item.

    Notes
    -----
    The workers start when the iteration does. Leaving the loop early
    (``break``, an exception, closing the generator) stops them and unlinks
    every segment of the call; so does the end of the iteration. Arguments
    are checked when ``imap`` is called. The input is read in the iterating
    thread, up to a few chunks per worker ahead of the results taken: an
    input that waits for results to be taken (a feedback loop) blocks; a
    slow input delays the first result by the time it takes to read that
    far. An exception raised by the input ends the loop once the results of
    the items read before it are out.

    Examples
    --------
    >>> import numpy as np, shmalloc
    >>> for total in shmalloc.imap(lambda n: np.ones(n).sum(), [10, 20], processes=2):
    ...     print(total)
    10.0
    20.0
    """
    ctx, items, options = prepare(
        func,
        iterable,
        processes=processes,
        copy=copy,
        start_method=start_method,
        chunksize=chunksize,
        seed=seed,
        pipe_limit=pipe_limit,
        workers_per_call=True,
        errors=errors,
        retries=retries,
        lazy=True,
    )
    if _serial.in_worker():
        return _serial.iterate(func, items, seed=options.seed, errors=errors, retries=retries, label=IMAP_LABEL)
    nproc = resolve_processes(processes)
    call = Call(
        Workers(ctx, inherited=options),
        items,
        options,
        nproc=nproc,
        chunksize=chunksize,
        results=NamedResults(copy),
        progress=progress,
        label=IMAP_LABEL,
        persistent=False,
        errors=errors,
        retries=retries,
        look_ahead=look_ahead(nproc, chunksize),
        fail_at_turn=True,
    )
    return call.iterate(ordered)
