"""One parallel call in the parent: hand out chunks of items, collect the answers, clean up whatever happens.

Used by :func:`shmalloc.map` (workers started for the call, told to exit
with their last task) and by :meth:`shmalloc.Pool.map` (the pool's
persistent workers, and spares to write results into): the difference is
in the :class:`Workers` given and in the *destinations* of the results
(:class:`NamedResults` here; the Pool's spares in :mod:`._recycling`).

Whatever goes wrong, the call stops its workers and unlinks each name it
handed out and did not consume, so nothing is left in /dev/shm.
"""
from __future__ import annotations

import math
import pickle
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .. import _names
from ..errors import FailedItemsWarning, ShmFallbackWarning, WorkerDiedError
from . import _protocol, _relay
from ._failures import exit_text, rebuild_error, remote_error, warning_error
from ._options import Options
from ._workers import ChunkMessage, Worker, Workers

# Chunks a worker holds at once: the next one waits in its pipe while it works on the current, so that
# it never idles while this process takes its answers.
CHUNKS_AHEAD = 2
# A chunk goes ahead only if it fits in the pipe at once (with its spares' descriptors, each a small
# message): a send that blocks until the busy worker reads it, while the worker blocks on answers
# nobody reads, never ends. Both limits together stay well under Linux's default socket buffer
# (208 KB). A larger chunk is held here until the worker has answered the one it works on.
AHEAD_BYTES = 64 * 1024
AHEAD_DESCRIPTORS = 64
# An imap reads at most this many chunks per worker ahead of the results its caller has taken.
LOOK_AHEAD_CHUNKS = 2 * CHUNKS_AHEAD
#: map's chunks shrink towards the end of the items, but not below what takes this long (see _chunk_size).
MIN_CHUNK_SECONDS = 0.005


def look_ahead(processes: int, chunksize: int) -> int:
    """How many items an imap on ``processes`` workers reads ahead of what its caller has taken."""
    return processes * chunksize * LOOK_AHEAD_CHUNKS


class NamedResults:
    """Destinations of results: a fresh segment name per item, consumed (or unlinked) by the parent."""

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self.names: dict[int, str] = {}  # handed out, not yet consumed

    def begin(self, gone_pids: list[int]) -> None:
        """A call starts; ``gone_pids``: workers that ended between calls."""

    def entry(self, index: int, item: Any, pid: int) -> tuple[_protocol.Entry, int | None]:
        """The entry for item ``index`` sent to worker ``pid``, and the descriptor to send along (or None)."""
        name = self.names[index] = _names.generate()
        return _protocol.Entry(index, item, name), None

    def drops_for(self, pid: int) -> tuple[int, ...]:
        """The spares worker ``pid`` must unmap before its next task."""
        return ()

    def receive(self, index: int, shipped: _protocol.Shipped) -> Any:
        """Rebuild item ``index``'s result (consuming its segment)."""
        value = _protocol.receive(shipped, self.names[index], self.copy)
        del self.names[index]
        return value

    def redo(self, index: int) -> None:
        """Item ``index`` failed and is handed out again: drop what was handed out with it."""
        name = self.names.pop(index, None)
        if name is not None:
            _protocol.discard(name)  # a dead worker may have left its result there

    def release_unused(self) -> None:
        """Unlink every name handed out and not consumed."""
        for name in self.names.values():
            _protocol.discard(name)
        self.names.clear()

    def aborted(self) -> None:
        """The call failed and its workers were stopped."""

    def finished(self) -> None:
        """The call returned every result."""


class Call:
    """One call: run ``options.func`` over ``items`` on ``workers``; :meth:`run` returns the results in
    order, :meth:`iterate` yields them as they come.

    Parameters
    ----------
    workers : Workers
        Started up to ``nproc`` here; stopped at the end unless ``persistent``.
    items : iterable
        Read as chunks are handed out (lazily, with :meth:`iterate` and a
        ``look_ahead``).
    persistent : bool
        The workers outlive the call (a Pool's): every task carries the
        call's options (the workers were not started with them) and none is
        marked last.
    interrupted : callable
        Returns a reason (str) to stop at once, e.g. the pool was terminated.
    label : str
        How error notes name the call.
    errors : {"raise", "return"}
        What a failed item (func raised, its worker died, its result could
        not be rebuilt) does once its retries are spent: stop the call and
        raise, or become its own result (one warning then counts them).
    retries : int
        How many times a failed item is run again (with the same seed).
    look_ahead : int, optional
        At most this many items are read and not yet yielded (None: no
        bound; the items are in memory already).
    fail_at_turn : bool
        With ``errors="raise"``, raise a failure when its result's turn to
        be yielded comes, the results before it yielded first (imap), instead
        of at once (map). No new item goes out once a failure is known.
    hold_answers : bool
        Workers may hold back the answers of fast items and send them
        together (a map, whose caller sees no result before it ends; never
        an imap, whose caller may wait for one result before the next item
        can finish).
    shrink_tail : bool
        Chunks shrink towards the end of the items, so that the workers
        finish together (see :meth:`_chunk_size`): for a map whose caller
        left ``chunksize`` to be chosen.
    """

    def __init__(
        self,
        workers: Workers,
        items: Iterable[Any],
        options: Options,
        *,
        nproc: int,
        chunksize: int,
        results: NamedResults,
        progress: bool,
        label: str,
        persistent: bool,
        interrupted: Callable[[], str | None] = lambda: None,
        errors: str = "raise",
        retries: int = 0,
        look_ahead: int | None = None,
        fail_at_turn: bool = False,
        hold_answers: bool = False,
        shrink_tail: bool = False,
    ) -> None:
        self.workers, self.options = workers, options
        self.total = len(items) if isinstance(items, Sized) else None
        self.source = iter(items)
        self.peeked: list[Any] = []  # the next item, read to learn whether there is one
        self.source_ended = False
        self.source_error: Exception | None = None  # what reading the next item raised
        self.taken = 0  # items read from the source (the next item's index)
        self.items: dict[int, Any] = {}  # items read and not yet final (None when the workers inherited them)
        self.nproc = nproc
        self.chunksize = chunksize
        self.look_ahead = look_ahead
        self.ready: dict[int, Any] = {}  # final results not yet yielded
        self.ordered = True  # yield in input order; else in the order results become final
        self.finals: deque[int] = deque()  # unordered: the indices of ready results, in that order
        self.yielded = 0
        self.results = results
        self.progress = progress
        self.label = label
        self.persistent = persistent
        self.interrupted = interrupted
        self.fallbacks = 0
        self.bar: Any = None
        self.errors, self.retries = errors, retries
        self.redo: deque[int] = deque()  # failed items to hand out again, before the next chunk
        self.tries: dict[int, int] = {}  # failed tries so far, by item
        self.failed = 0  # items whose result is their exception
        self.said_early: dict[int, _relay.Events] = {}  # flushed output of items still running
        self.fail_at_turn = fail_at_turn
        self.hold_answers = hold_answers
        self.shrink_tail = shrink_tail
        self.failing = False  # a failure waits for its turn to be raised: hand out nothing more
        self.started = time.monotonic()  # when the call began handing out items

    def run(self) -> list[Any]:
        """Every result, in input order."""
        return list(self.iterate(ordered=True))

    def iterate(self, ordered: bool) -> Iterator[Any]:
        """Yield the results as they come: in input order, or in the order they are ready.

        Closing the generator (a ``break`` in the caller's loop) stops the
        workers and leaves nothing behind, as an error does.
        """
        self.ordered = ordered
        self.started = time.monotonic()
        self.results.begin(self.workers.forget_exited())
        try:
            while len(self.workers) < self.nproc:
                self._start_worker()
            if self.progress:  # after forking: tqdm may start a monitor thread
                self.bar = _progress_bar(self.total)
            for _ in range(CHUNKS_AHEAD):
                for worker in list(self.workers):
                    self._dispatch(worker)
            while True:
                while (self.yielded in self.ready) if ordered else self.finals:
                    yield self._pop_ready(self.yielded if ordered else self.finals.popleft())
                if not self.items and not self._work_left():
                    if self.source_error is not None:
                        raise self.source_error
                    break
                self._top_up()  # yielding made room under look_ahead
                self._step()
            if not self.persistent:
                self.workers.stop(graceful=True)
        except BaseException:
            self.workers.stop(graceful=False)  # also stops workers still writing results
            self.results.aborted()
            raise
        finally:
            self.results.release_unused()
            if self.bar is not None:
                self.bar.close()
        self.results.finished()
        if self.failed:
            warnings.warn(
                f"{self.failed} of {self.taken} items failed: their results are their exceptions",
                FailedItemsWarning,
                stacklevel=4,
            )
        if self.fallbacks:  # one warning per call
            warnings.warn(
                f"/dev/shm was full: {self.fallbacks} of {self.taken} results came back through the pipe",
                ShmFallbackWarning,
                stacklevel=4,
            )

    def _pop_ready(self, index: int) -> Any:
        self.yielded += 1
        value = self.ready.pop(index)
        if isinstance(value, _Raise):
            raise value.error
        return value

    def _check_interrupted(self) -> None:
        reason = self.interrupted()
        if reason is not None:
            raise RuntimeError(reason)

    def _start_worker(self) -> Worker:
        self._check_interrupted()
        return self.workers.start()

    def _more_items(self) -> bool:
        """Whether the source has another item (read ahead by one). An error of the source ends it; it is
        raised once the results of the items read before are out."""
        if not self.peeked and not self.source_ended:
            try:
                self.peeked.append(next(self.source))
            except StopIteration:
                self.source_ended = True
            except Exception as exc:
                self.source_ended, self.source_error = True, exc
        return bool(self.peeked)

    def _work_left(self) -> bool:
        # Once a failure waits for its turn, only retries of earlier failures still go out.
        return bool(self.redo) or (not self.failing and self._more_items())

    def _may_read(self) -> bool:
        return not self.failing and (self.look_ahead is None or self.taken - self.yielded < self.look_ahead)

    def _next_chunk(self) -> range | None:
        """The indices to hand out next: a failed item again, else up to ``chunksize`` new items."""
        if self.redo:
            index = self.redo.popleft()
            return range(index, index + 1)
        if not self._may_read():
            return None
        first, size = self.taken, self._chunk_size()
        while self.taken - first < size and (self.taken == first or self._may_read()) and self._more_items():
            item = self.peeked.pop()
            self.items[self.taken] = None if self.options.items is not None else item
            self.taken += 1
        return range(first, self.taken) if self.taken > first else None

    def _chunk_size(self) -> int:
        """``chunksize``; with ``shrink_tail``, at most the items left shared among the chunks the workers
        may hold, but not fewer than take MIN_CHUNK_SECONDS at the pace so far. Each worker holds up to
        CHUNKS_AHEAD chunks, and with full ones to the end one could still have a chunk or two to go
        while the others wait (200 items of 3 ms on 2 workers: idle for the last 75-115 ms of 460);
        but each chunk costs messages, which items of 0.3 ms feel (200 of them: 5-15% slower)."""
        if not self.shrink_tail or self.total is None:
            return self.chunksize
        share = math.ceil((self.total - self.taken) / (self.nproc * CHUNKS_AHEAD))
        done = self.taken - len(self.items)  # final: answered, or failed for good
        elapsed = time.monotonic() - self.started  # 0 on a clock of coarse ticks
        if share >= self.chunksize or not done or elapsed <= 0:
            return self.chunksize
        seconds_per_item = elapsed * self.nproc / done
        return max(1, share, min(self.chunksize, math.ceil(MIN_CHUNK_SECONDS / seconds_per_item)))

    def _dispatch(self, worker: Worker) -> None:
        if worker.held is not None or worker.closing:
            return
        chunk = self._next_chunk()
        if chunk is None:
            return
        pid = worker.process.pid
        entries, fds = [], []
        for index in chunk:
            entry, fd = self.results.entry(index, self.items[index], pid)
            entries.append(entry)
            if fd is not None:
                fds.append(fd)
        busy = bool(worker.pending)
        if not busy:  # it is past its last note: what it says now is about this call, not an earlier one
            worker.progress.new_task()
        worker.given(chunk)
        task = _protocol.Task(
            entries,
            options=self.options if self.persistent else None,
            last=not self.persistent and not self._work_left(),
            drops=self.results.drops_for(pid),
            hold=self.hold_answers,
        )
        worker.closing = task.last  # it exits once answered: nothing more may go to it
        try:
            data = _protocol.pickled(task)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"item {chunk[0]}..{chunk[-1]} could not be pickled to its worker: {exc}") from exc
        message = ChunkMessage(data, fds, len(chunk))
        if busy and (len(data) > AHEAD_BYTES or len(fds) > AHEAD_DESCRIPTORS):
            worker.held = message  # sent once the worker has answered what it holds
        else:
            self._send(worker, message)

    def _send(self, worker: Worker, chunk: ChunkMessage) -> None:
        try:
            worker.conn.send_bytes(chunk.data)
            for fd in chunk.fds:
                _protocol.send_descriptor(worker.conn, fd, worker.process.pid)
        except OSError:
            # Mostly the worker is gone: _step sees its sentinel and names the item. But a
            # descriptor that cannot be sent (EMFILE, ETOOMANYREFS) leaves a live worker waiting
            # for it, and this call waiting for the worker: end it, so that it is gone too.
            if worker.process.exitcode is None:
                worker.process.kill()

    def _step(self) -> None:
        busy = [w for w in self.workers if w.pending]
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in self.workers]))
        for worker in list(self.workers):
            exited = worker.process.sentinel in ready
            if worker.conn in ready or exited:
                # Read what a worker sent before it ended: its last results are good.
                if not self._drain(worker) or exited:
                    self._buried(worker)
                elif worker.held is not None and len(worker.pending) == worker.held.items:
                    held, worker.held = worker.held, None  # it answered all but the held chunk
                    self._send(worker, held)
        self._top_up()

    def _top_up(self) -> None:
        """Give every worker with fewer than CHUNKS_AHEAD chunks its next chunk: no pause between chunks
        (also for workers that had run out of work, when a failed item goes out again). Chunks, not
        items: small chunks (the tail's, retries) must not pile up unread in a busy worker's pipe."""
        for worker in list(self.workers):
            if len(worker.chunks) < CHUNKS_AHEAD:
                self._dispatch(worker)

    def _drain(self, worker: Worker) -> bool:
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

    def _buried(self, worker: Worker) -> None:
        """A worker ended: an error if it still owed results, else replace it if chunks remain."""
        self._check_interrupted()
        exited, code = self.workers.bury(worker)
        if worker.pending:
            index = worker.died_on()
            how = exit_text(code) if exited else "closed its pipe"
            died = WorkerDiedError(f"the worker (pid {worker.process.pid}) working on item {index} {how}", index, code)
            _relay.replay(self.said_early.pop(index, ()), f"item {index}")  # what it flushed before dying
            if not self._may_go_on(index):
                raise died
            others = [other for other in worker.owed() if other != index]
            worker.held = None
            self.workers.forget(worker)
            for other in others:  # finished with its answer held back, or never started: not a try
                self.said_early.pop(other, None)  # it runs again and says it again
                self.results.redo(other)
                self.redo.append(other)
            self._failed(index, died)
        if self._work_left():
            self._dispatch(self._start_worker())

    def _handle(self, worker: Worker, data: bytes) -> None:
        """Take one answer of ``worker``: a result, or the item's failure."""
        header, stream = _protocol.read_header(data)
        if header.kind == _protocol.BATCH:  # answers the worker held back: each in turn
            for answer in _protocol.read_payload(stream):
                self._handle(worker, answer)
            return
        index = header.index
        if header.kind == _protocol.SAID:  # flushed output of an item still running: kept for its answer
            self.said_early[index] = self.said_early.get(index, ()) + header.said
            return
        try:
            value, failure = self._outcome(worker, header, stream)
        finally:
            _protocol.forget(header.names)  # those not taken over while rebuilding
        worker.answered(index)
        if failure is None:
            self._done(index, value)
        else:
            self._failed(index, failure)

    def _outcome(self, worker: Worker, header: _protocol.Header, stream: Any) -> tuple[Any, Exception | None]:
        """The item's result and None, or None and its failure (raises only for a failed initializer)."""
        index = header.index
        said = self.said_early.pop(index, ()) + header.said
        try:
            _relay.replay(said, f"item {index}")  # what the item printed and warned first, as in a loop
        except Exception as exc:  # a warning the filters make an error: the item failed, as in a loop
            return None, warning_error(index, exc, self.label)
        try:
            payload = _protocol.read_payload(stream)
        except Exception as exc:
            return None, rebuild_error(index, exc, self.label)
        if header.kind == _protocol.ERROR:
            if index == _protocol.INITIALIZER:
                raise remote_error(None, payload, self.label, raised_by=f"the initializer of worker {worker.process.pid}")
            return None, remote_error(index, payload, self.label)
        shipped = _protocol.as_shipped(header, payload)
        try:
            value = self.results.receive(index, shipped)
        except Exception as exc:
            return None, rebuild_error(index, exc, self.label)
        self.fallbacks += shipped.fell_back
        return value, None

    def _may_go_on(self, index: int) -> bool:
        """Whether a failure of item ``index`` leaves the call running (a retry is left, errors="return", or
        the failure waits for its turn)."""
        return self.tries.get(index, 0) < self.retries or self.errors == "return" or self.fail_at_turn

    def _failed(self, index: int, failure: Exception) -> None:
        """Item ``index`` failed: run it again if it has tries left, else return or raise ``failure``."""
        tries = self.tries.get(index, 0)
        if tries < self.retries:
            self.tries[index] = tries + 1
            self.results.redo(index)
            self.redo.append(index)
        elif self.errors == "return":
            self.failed += 1
            self._done(index, failure)
        elif self.fail_at_turn:
            self.failing = True
            self._done(index, _Raise(failure))
        else:
            raise failure

    def _done(self, index: int, value: Any) -> None:
        del self.items[index]
        self.ready[index] = value
        if not self.ordered:
            self.finals.append(index)
        if self.bar is not None:
            self.bar.update(1)


@dataclass
class _Raise:
    """A failure to raise when its result's turn to be yielded comes."""

    error: Exception


def _progress_bar(total: int | None) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar shown", stacklevel=4)
        return None

    class Bar(tqdm):
        monitor_interval = 0  # no monitor thread: a Pool may fork a replacement worker while the bar lives

    return Bar(total=total)
