"""shmalloc.map: a parallel map whose workers return results through shared memory.

The parent owns every segment name: it chooses one per item before handing
the item to a worker, the worker places a large result under that name with
:func:`copy2shm`, and the parent consumes it with :func:`allocate_from_shm`.
Whatever goes wrong, the parent stops its workers and unlinks each name it
handed out and did not consume, so nothing is left in /dev/shm.

Workers are plain processes, each with its own pipe; the parent waits on the
pipes and on the process sentinels together, so a worker that dies is noticed
at once (``multiprocessing.Pool`` waits forever in that case).
"""
from __future__ import annotations

import errno
import math
import multiprocessing
import os
import pickle
import signal
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable

import numpy as np

from .. import _names, _shmarray
from . import _protocol as _answer
from .._api import allocate_from_shm, copy2shm, unlink
from ..errors import ShmError, ShmFallbackWarning, WorkerDiedError, WorkerError
from .._handle import ShmObj

#: Results whose data take fewer bytes than this go through the pipe.
PIPE_LIMIT = 64 * 1024
# Seconds a worker gets to exit after SIGTERM before SIGKILL.
_TERMINATE_GRACE = 2.0


# ----------------------------------------------------------------------------
# The transport of one result (used by map and by the executor)


@dataclass(frozen=True)
class Shipped:
    """A result on its way to the parent: the value itself, or a handle to it in shared memory."""

    value: Any = None
    handle: ShmObj | None = None
    boxed: bool = False  # the handle holds a _Box around the value
    fell_back: bool = False  # /dev/shm was full: the value travels through the pipe


@dataclass
class _Box:
    """Keeps containers and scalars as they are: copy2shm would turn a list of numbers into an array."""

    value: Any


def ship(result: Any, name: str, limit: int = PIPE_LIMIT) -> Shipped:
    """In a worker: make ``result`` ready for the parent, in shared memory under ``name`` if large.

    A full /dev/shm (ENOSPC) sends the value through the pipe instead; then
    nothing is left under ``name``.
    """
    if _nbytes(result, limit) < limit:
        return Shipped(value=result)
    whole = isinstance(result, np.ndarray) or _is_pandas(result)
    try:
        handle = copy2shm(result if whole else _Box(result), name=name)
    except ShmError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return Shipped(value=result, fell_back=True)
    return Shipped(handle=handle, boxed=not whole)


def receive(shipped: Shipped, name: str, copy: bool) -> Any:
    """In the parent: rebuild the result a worker shipped (consuming its segment)."""
    if shipped.handle is None:
        return shipped.value
    if shipped.handle.name != name:
        raise ShmError(errno.EINVAL, f"a worker answered with segment {shipped.handle.name!r}", name)
    value = allocate_from_shm(shipped.handle, copy=copy)
    return value.value if shipped.boxed else value


def discard(name: str) -> None:
    """Unlink ``name`` if it exists: a result nobody will consume."""
    try:
        unlink(name)
    except FileNotFoundError:
        pass


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".", 1)[0] == "pandas" and hasattr(obj, "memory_usage")


def _nbytes(obj: Any, limit: int) -> int:
    """Roughly how many bytes ``obj`` holds; counting may stop once ``limit`` is reached."""
    if isinstance(obj, _shmarray.ShmArray) and obj.shared:
        return 256  # pickled by reference (name and layout)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray, str, memoryview)):
        return len(obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, np.generic)):
        return 32
    if _is_pandas(obj):
        usage = obj.memory_usage(deep=False)
        return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
    if isinstance(obj, (list, tuple, set, frozenset, dict)):
        total = 64
        for part in obj.items() if isinstance(obj, dict) else obj:
            total += _nbytes(part, limit - total)
            if total >= limit:
                break
        return total
    # Anything else: measure its pickle; out-of-band buffers are counted, not copied.
    sizes: list[int] = []
    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=lambda b: sizes.append(b.raw().nbytes))
    except Exception:
        return limit  # let copy2shm report what cannot be pickled
    return len(stream) + sum(sizes)


# ----------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class _Options:
    func: Callable[[Any], Any]
    items: list[Any] | None  # inherited under fork; otherwise sent with each task
    seed: np.random.SeedSequence | None
    limit: int


_current_seed: np.random.SeedSequence | None = None


def item_seed() -> np.random.SeedSequence | None:
    """The :class:`numpy.random.SeedSequence` of the item being processed, inside :func:`map`.

    With ``map(..., seed=s)``, item ``i`` gets the child ``i`` of
    ``SeedSequence(s)``, whichever worker runs it; outside such a call this
    returns None. Use it as ``np.random.default_rng(shmalloc.item_seed())``.
    """
    return _current_seed


def _seed_item(seed: np.random.SeedSequence, index: int) -> None:
    """Give item ``index`` its own child of ``seed``; also seed the global generators from it."""
    global _current_seed
    import random

    child = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, index), pool_size=seed.pool_size)
    _current_seed = child
    state = child.generate_state(4)
    np.random.seed(state)
    random.seed(int.from_bytes(state.tobytes(), "little"))


def _worker(conn: Connection, options: _Options, receiver: int) -> None:
    """Worker main loop: receive (chunk of (index, item, name), last), answer one message per item.

    ``last``: no more chunks will come; exit right after answering (the exit
    overlaps with the parent's reading of the results). ``receiver``: the
    parent's pid.
    """
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _shmarray.name_for_receiver(receiver)
    # The parent terminates a worker whose results it no longer wants (SIGTERM): unlink the
    # ShmArrays' names this worker owns (they carry the parent's pid) before dying of it.
    signal.signal(signal.SIGTERM, _shmarray.unlink_owned_and_die)
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            entries, last = task
            for index, item, name in entries:
                if options.items is not None:
                    item = options.items[index]
                message, handover = _answer.answer(index, lambda: _run_one(options, index, item, name))
                conn.send_bytes(message)
                if handover is not None:
                    handover.complete()
            if last:
                return
    finally:
        _shmarray.unlink_owned()  # the process leaves through os._exit, which skips finalisers


def _run_one(options: _Options, index: int, item: Any, name: str) -> Shipped:
    if options.seed is not None:
        _seed_item(options.seed, index)
    return ship(options.func(item), name, options.limit)


def exit_text(code: int | None) -> str:
    """How a process ended, from its exit code (``-N``: killed by signal N), e.g. "was killed by signal SIGKILL (9)".

    Signals without a name (real-time ones, numbers unknown here) are named by number.
    """
    if code is None:
        return "has not exited"
    if code >= 0:
        return f"exited with code {code}"
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        low, high = getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1)
        name = f"SIGRTMIN+{number - low}" if low < number <= high else ""
    return f"was killed by signal {name} ({number})" if name else f"was killed by signal {number}"


def remote_error(index: int | None, described: tuple[bytes | None, str, str], where: str) -> Exception:
    """The exception to raise in the parent for an item that failed in a worker (see :func:`_answer.describe`).

    The worker's own exception where it can be rebuilt, with a note naming
    the item (None: the executor's task) and giving the worker's traceback;
    else a :class:`WorkerError`.
    """
    payload, message, text = described
    subject = "the task" if index is None else f"item {index}"
    exc: BaseException | None = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if isinstance(exc, Exception):
        try:
            exc.add_note(f"{where}: raised by func for {subject}; the worker's traceback:\n{text.rstrip()}")
            return _with_index(exc, index)
        except Exception:
            pass  # e.g. a __notes__ that is not a list: report it as a WorkerError
    return WorkerError(f"{subject} failed in a worker: {message}\n\n{text}", index, text)


def rebuild_error(index: int | None, exc: Exception, where: str) -> Exception:
    """Name item ``index`` (None: the executor's task) on ``exc``, raised in the parent while rebuilding its result."""
    subject = "the task" if index is None else f"item {index}"
    try:
        exc.add_note(f"{where}: raised in the parent while rebuilding the result of {subject}")
    except Exception:  # an exception that takes no notes: wrap it
        wrapped = WorkerError(f"{subject}: rebuilding its result in the parent failed: {exc!r}", index)
        wrapped.__cause__ = exc
        return wrapped
    return _with_index(exc, index)


def _with_index(exc: Exception, index: int | None) -> Exception:
    """``exc``, carrying the failing item's index as ``shmalloc_index`` where it takes attributes."""
    if index is not None:
        try:
            exc.shmalloc_index = index  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return exc


# ----------------------------------------------------------------------------
# The parent


@dataclass
class _Worker:
    process: Any
    conn: Connection
    pending: list[int] = field(default_factory=list)  # indices sent, not yet answered


def usable_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def map(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    processes: int | None = None,
    copy: bool = True,
    start_method: str | None = None,
    chunksize: int = 1,
    progress: bool = False,
    seed: int | np.random.SeedSequence | None = None,
    pipe_limit: int = PIPE_LIMIT,
) -> list[Any]:
    """Apply ``func`` to each item in worker processes; return the results in input order.

    Large results (arrays, data frames, and containers holding them) come
    back through POSIX shared memory, small ones through a pipe.

    Parameters
    ----------
    func : callable
        Called as ``func(item)`` in a worker. Under ``start_method="fork"``
        it is inherited, so lambdas and closures work; otherwise it must be
        picklable (a module-level function).
    iterable : iterable
        The items. Under fork they are inherited as well; otherwise each is
        pickled to its worker.
    processes : int, optional
        Number of worker processes (default: the usable CPUs, at most one
        per chunk).
    copy : bool, default True
        True: results are copied out of shared memory into regular memory.
        False: arrays in the results own private (copy-on-write) mappings of
        the segments: no copy, the memory is freed with the arrays.
    start_method : {"fork", "forkserver", "spawn"}, optional
        How workers start; None: the platform's default.
    chunksize : int, default 1
        Items handed to a worker at a time.
    progress : bool, default False
        Show a progress bar (``tqdm.auto``), if tqdm is installed.
    seed : int or numpy.random.SeedSequence, optional
        Item ``i`` runs with child ``i`` of ``SeedSequence(seed)``: numpy's
        and :mod:`random`'s global generators are seeded from it, and
        :func:`item_seed` returns it. Results then do not depend on the
        number of processes or on scheduling.
    pipe_limit : int, default 65536
        Results holding fewer bytes than this go through the pipe.

    Returns
    -------
    list
        ``[func(item) for item in iterable]``.

    Raises
    ------
    Exception
        The exception ``func`` raised for the first failing item received,
        re-raised in the parent, with a note giving the item's index and the
        worker's traceback.
    WorkerError
        If that exception cannot be re-raised as it was (not picklable).
    WorkerDiedError
        If a worker ends while working on an item (killed, crashed, out of
        memory), naming the item.
    TypeError, ValueError
        For bad arguments, or a ``func`` that cannot be pickled under spawn
        or forkserver.

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
    ctx, items, options = _prepare(func, iterable, processes, copy, start_method, chunksize, seed, pipe_limit)
    if not items:
        return []
    nproc = min(processes or usable_cpus(), math.ceil(len(items) / chunksize))
    return _Run(ctx, items, options, nproc, chunksize, copy, progress).run()


def check_count(label: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be a {'positive' if minimum else 'non-negative'} int, not {value!r}")


def start_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of ``start_method`` (None: the platform's default), or ValueError."""
    if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {multiprocessing.get_all_start_methods()} or None, not {start_method!r}"
        )
    return multiprocessing.get_context(start_method)


def _prepare(func, iterable, processes, copy, start_method, chunksize, seed, pipe_limit):
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    if processes is not None:
        check_count("processes", processes, 1)
    check_count("chunksize", chunksize, 1)
    check_count("pipe_limit", pipe_limit, 0)
    if not isinstance(copy, bool):
        raise TypeError("copy must be bool")
    ctx = start_context(start_method)
    if seed is not None and not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    items = list(iterable)
    inherit = ctx.get_start_method() == "fork"
    if not inherit:
        try:
            pickle.dumps(func)
        except Exception as exc:
            raise TypeError(
                f"under start_method={ctx.get_start_method()!r} func must be picklable (a module-level function);"
                f" lambdas and closures need start_method='fork': {exc}"
            ) from exc
    return ctx, items, _Options(func, items if inherit else None, seed, pipe_limit)


class _Run:
    """One call of :func:`map`: start workers, hand out chunks, collect, clean up."""

    def __init__(self, ctx, items, options: _Options, nproc: int, chunksize: int, copy: bool, progress: bool):
        self.ctx, self.items, self.options, self.copy = ctx, items, options, copy
        self.nproc = nproc
        self.chunks = [range(s, min(s + chunksize, len(items))) for s in range(0, len(items), chunksize)]
        self.next_chunk = 0
        self.results: list[Any] = [None] * len(items)
        self.done = 0
        self.names: dict[int, str] = {}  # handed out, not yet consumed
        self.workers: list[_Worker] = []
        self.fallbacks = 0
        self.progress = progress
        self.bar = None

    def run(self) -> list[Any]:
        try:
            for _ in range(self.nproc):
                self._start_worker()
            if self.progress:  # after forking: tqdm may start a monitor thread
                self.bar = _progress_bar(len(self.items))
            for worker in self.workers:
                self._dispatch(worker)
            while self.done < len(self.items):
                self._step()
            self._stop(graceful=True)
        finally:
            self._stop(graceful=False)
            for name in self.names.values():
                discard(name)
            self.names.clear()
            if self.bar is not None:
                self.bar.close()
        self._warn_fallbacks()
        return self.results

    def _warn_fallbacks(self) -> None:
        """One warning per call if results had to come back through the pipe."""
        if self.fallbacks:
            warnings.warn(
                f"/dev/shm was full: {self.fallbacks} of {len(self.items)} results came back through the pipe",
                ShmFallbackWarning,
                stacklevel=4,
            )

    def _start_worker(self) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        process = self._new_process(parent_end, child_end)
        try:
            process.start()
        finally:
            child_end.close()  # so that the parent sees EOF when the worker is gone
        self.workers.append(_Worker(process, parent_end))

    def _new_process(self, parent_end: Connection, child_end: Connection) -> multiprocessing.process.BaseProcess:
        return self.ctx.Process(target=_worker, args=(child_end, self.options, os.getpid()), daemon=True)

    def _dispatch(self, worker: _Worker) -> None:
        if self.next_chunk >= len(self.chunks):
            return
        chunk = self.chunks[self.next_chunk]
        self.next_chunk += 1
        inherit = self.options.items is not None
        task = []
        for index in chunk:
            self.names[index] = _names.generate()
            task.append((index, None if inherit else self.items[index], self.names[index]))
        worker.pending = list(chunk)
        try:
            worker.conn.send((task, self.next_chunk >= len(self.chunks)))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"item {chunk[0]}..{chunk[-1]} could not be pickled to its worker: {exc}") from exc

    def _step(self) -> None:
        busy = [w for w in self.workers if w.pending]
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in self.workers]))
        for worker in list(self.workers):
            exited = worker.process.sentinel in ready
            if worker.conn in ready or exited:
                # Read what a worker sent before it ended: its last results are good.
                if not self._drain(worker) or exited:
                    self._buried(worker)
                elif not worker.pending:
                    self._dispatch(worker)

    def _drain(self, worker: _Worker) -> bool:
        """Handle every message waiting from ``worker``; False if its pipe is closed."""
        while worker.pending:
            try:
                if not worker.conn.poll():
                    break
                data = worker.conn.recv_bytes()
            except (EOFError, OSError):  # only the connection itself: rebuilding the answer comes below
                return False
            self._handle(worker, data)  # its errors (e.g. ShmError) are the item's, not a dead pipe
        return True

    def _buried(self, worker: _Worker) -> None:
        """A worker ended: an error if it still owed results, else reap it and replace it if needed."""
        process = worker.process
        exited = bool(wait([process.sentinel], _TERMINATE_GRACE))
        if not exited:  # it closed its pipe but lives on: of no use any more
            process.kill()
        process.join()
        if worker.pending:
            index, code = worker.pending[0], process.exitcode
            how = exit_text(code) if exited else "closed its pipe"
            raise WorkerDiedError(f"the worker (pid {process.pid}) working on item {index} {how}", index, code)
        self.workers.remove(worker)
        worker.conn.close()
        process.close()  # its sentinel's descriptors
        if self.next_chunk < len(self.chunks):
            self._start_worker()
            self._dispatch(self.workers[-1])

    def _handle(self, worker: _Worker, data: bytes) -> None:
        """Take one answer of ``worker``: a result, or the item's error (raised)."""
        header, stream = _answer.read_header(data)
        index = header.index
        try:
            try:
                payload = _answer.read_payload(stream)
            except Exception as exc:
                raise rebuild_error(index, exc, self.LABEL) from None
            if header.kind == _answer.ERROR:
                raise remote_error(index, payload, self.LABEL)
            shipped: Shipped = payload
            try:
                self.results[index] = self._receive(index, shipped)
            except Exception as exc:
                raise rebuild_error(index, exc, self.LABEL) from None
        finally:
            _answer.forget(header.names)  # those not taken over while rebuilding
        self.fallbacks += shipped.fell_back
        worker.pending.remove(index)
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    #: How error notes name the call.
    LABEL = "shmalloc.map"

    def _receive(self, index: int, shipped: Shipped) -> Any:
        value = receive(shipped, self.names[index], self.copy)
        del self.names[index]
        return value

    def _discard_unread(self, worker: _Worker) -> None:
        """Read what a stopped worker left in its pipe, to unlink the ShmArrays handed over there."""
        try:
            while worker.conn.poll():
                _answer.forget(_answer.read_header(worker.conn.recv_bytes())[0].names)
        except Exception:
            pass  # a closed or garbled pipe: nothing more to read

    def _stop(self, graceful: bool) -> None:
        """Tell idle workers to exit and reap them (graceful), or terminate and reap every worker.

        Either way no descriptor of theirs stays open and no zombie is left.
        """
        workers, self.workers = self.workers, []
        if graceful:
            # Every result is in: tell them all first, so that they tear down at the same time.
            # (map's workers mostly exited already: their last chunk told them to.)
            for worker in workers:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        else:
            for worker in workers:
                if worker.process.exitcode is None:
                    worker.process.terminate()
        for worker in workers:
            process = worker.process
            if not wait([process.sentinel], _TERMINATE_GRACE):
                process.kill()
            process.join()
            if not graceful:
                self._discard_unread(worker)
            worker.conn.close()
            process.close()


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar shown", stacklevel=4)
        return None

    class Bar(tqdm):
        monitor_interval = 0  # no monitor thread: a Pool may fork a replacement worker while the bar lives

    return Bar(total=total)


__all__ = ["map", "item_seed"]
