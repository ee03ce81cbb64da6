"""Worker processes: their main loop, and their lifecycle as the parent sees it (start, replace, stop, reap).

One loop serves :func:`shmalloc.map` and :class:`shmalloc.Pool`: it answers
each :class:`~._protocol.Task` entry (in a map, the answers of fast items
with small results go together, see :class:`_Unsent`), placing a large
result under the entry's name or into the spare whose descriptor follows
the task, and keeps a shared mapping of the spares it filled (refilling
through it is a plain memory copy, ~2.5x faster than pwrite here).

Workers are plain processes, each with its own duplex pipe; the parent waits
on the pipes and on the process sentinels together, so a worker that dies is
noticed at once (``multiprocessing.Pool`` waits forever in that case).
"""
from __future__ import annotations

import mmap
import os
import signal
import struct
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .. import _ownership
from .._shared import RefillMapping
from . import _protocol, _serial
from ._arena import Arena
from ._options import Options, seed_item

#: A function to call in each worker when it starts, and its arguments.
Initializer = tuple[Callable[..., Any], tuple[Any, ...]]

# Seconds a worker gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE = 2.0
#: Refill mappings a worker keeps at most (once full, it maps no more until the parent drops some).
WORKER_MAPPINGS = 8
#: In a map, a worker holds back the answer of an item that took less than this many seconds, if its
#: result travels in the pipe and more items of the task follow, and sends it with the next ones: once
#: an item ends after the first answer held is this old, before an answer that may not wait, or when
#: the task is done. (So an answer may wait for the next item, however long it takes: only a map,
#: whose caller sees no result before the end, holds answers back.)
HOLD_SECONDS = 0.005
#: ... and at most this many bytes of answers.
HOLD_BYTES = 1 << 20


class Progress:
    """Where a worker is in its task, in a word of memory it shares with the parent (no message: that
    would cost what holding answers back saves): the item it started last. When the worker dies, the
    parent learns from it which item it was on, and that the items before it had finished, their answers
    held back.

    The word lives in a memory file (not in /dev/shm) whose descriptor the worker gets first thing.
    """

    def __init__(self, fd: int) -> None:
        self._mapping = mmap.mmap(fd, _WORD.size)
        self._word = memoryview(self._mapping).cast("q")

    @staticmethod
    def new_file() -> int:
        """A descriptor of a new memory file holding one word, -1."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("shmalloc-progress", os.MFD_CLOEXEC)
        else:
            with tempfile.TemporaryFile() as file:  # removed at once; the descriptor keeps it
                fd = os.dup(file.fileno())
        try:
            os.pwrite(fd, _WORD.pack(-1), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        self._word.release()
        self._mapping.close()  # and the descriptor it keeps

    def new_task(self) -> None:
        self._word[0] = -1

    def started(self, index: int) -> None:
        self._word[0] = index

    def last(self) -> int | None:
        """The item of its current task the worker started last (None: none yet)."""
        value = self._word[0]
        return None if value < 0 else value


_WORD = struct.Struct("q")


# ----------------------------------------------------------------------------
# In the worker


class _RefillMappings:
    """A worker's refill mappings, by spare id."""

    def __init__(self) -> None:
        self.maps: dict[int, RefillMapping] = {}

    def get(self, sid: int | None) -> RefillMapping | None:
        """The mapping of spare ``sid`` if there is one, now the most recently used."""
        if sid is None or sid not in self.maps:
            return None
        self.maps[sid] = self.maps.pop(sid)  # last in the dict: the order is that of their use
        return self.maps[sid]

    def detach(self, sid: int) -> None:
        """Forget the mapping of ``sid`` without unmapping it: an arena's region owns it now."""
        mapping = self.maps.pop(sid, None)
        if mapping is not None:
            mapping.detach()

    def drop(self, sids: Iterable[int]) -> None:
        for sid in sids:
            mapping = self.maps.pop(sid, None)
            if mapping is not None:
                mapping.close()

    def remember(self, sid: int, fd: int, written: int, make_room: bool = False) -> RefillMapping | None:
        """Map the whole object ``fd``, whose first ``written`` bytes were just written, for the next refill
        (and the next task's arena); return the mapping (None if there is none). ``make_room``: if this
        worker keeps as many mappings as it may, drop the least recently used one for it."""
        size = os.fstat(fd).st_size
        length = max(written, size)
        current = self.maps.get(sid)
        # Kept if long enough, and not longer than the object (a failed write is cut back): an arena over
        # it would write past the object's end.
        if current is not None and current.length >= length and size >= current.length:
            return current
        self.drop([sid])
        if len(self.maps) >= WORKER_MAPPINGS and make_room:
            self.drop([next(iter(self.maps))])
        if len(self.maps) >= WORKER_MAPPINGS:
            # Full: keep the mappings there are. Making room after every result would map each of many
            # results (a long map of medium results) once, and drop the mapping before it is used again.
            return None
        try:
            self.maps[sid] = RefillMapping(fd, length, written)
        except (OSError, ValueError):
            return None  # the next refill uses pwrite
        return self.maps[sid]


class _Unsent:
    """Answers a worker holds back, to send them as one message (see :data:`HOLD_SECONDS`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.messages: list[bytes] = []
        self.nbytes = 0
        self.since = 0.0

    def send(self, message: bytes, may_hold: bool) -> None:
        """Send ``message``, or hold it back if ``may_hold`` and those held are recent and few."""
        if may_hold and self.nbytes + len(message) <= HOLD_BYTES:
            now = time.monotonic()
            if not self.messages:
                self.since = now
            if now - self.since < HOLD_SECONDS:
                self.messages.append(message)
                self.nbytes += len(message)
                return
        self.flush()
        self.conn.send_bytes(message)

    def flush(self) -> None:
        """Send what is held back."""
        if self.messages:
            messages, self.messages, self.nbytes = self.messages, [], 0
            self.conn.send_bytes(_protocol.batch(messages))


def worker_main(conn: Connection, receiver: int, inherited: Options | None, initializer: Initializer | None = None) -> None:
    """A worker's main loop: answer every entry of every task, until STOP, EOF or a task marked last.

    ``receiver``: the parent's pid, which first sends the descriptor of the
    worker's :class:`Progress` word. ``inherited``: the options of a map whose
    workers were made for it (under fork they hold the items and any func);
    a task's own options take precedence. ``initializer``: ``(function,
    args)`` to call first; if it raises, the worker answers with an
    :data:`~._protocol.INITIALIZER` error and exits.
    """
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serial.enter_worker()
    _ownership.name_for_receiver(receiver)
    # The parent terminates a worker whose results it no longer wants (SIGTERM): unlink the
    # ShmArrays' names this worker owns (they carry the parent's pid) before dying of it.
    signal.signal(signal.SIGTERM, _ownership.unlink_owned_and_die)
    mappings = _RefillMappings()
    task: Any = None
    try:
        try:
            progress_fd = _protocol.receive_descriptor(conn)
        except (EOFError, OSError):
            return
        try:
            progress = Progress(progress_fd)
        finally:
            os.close(progress_fd)
        if initializer is not None:
            failure = _protocol.initialize(*initializer)
            if failure is not None:
                conn.send_bytes(failure)
                return
        while True:
            try:
                task = conn.recv()
                if task is _protocol.STOP:
                    return
                mappings.drop(task.drops)
                if isinstance(task, _protocol.Unmap):  # say it is done: then the space is free
                    conn.send_bytes(_protocol.unmapped())
                    continue
                fds = {entry.index: _protocol.receive_descriptor(conn) for entry in task.entries if entry.spare is not None}
            except (EOFError, OSError):
                return
            options = task.options or inherited
            assert options is not None, "a task without options to a worker started without them"
            progress.new_task()
            unsent = _Unsent(conn)
            for position, entry in enumerate(task.entries):
                more = task.hold and position + 1 < len(task.entries)
                _answer_entry(unsent, options, entry, fds.pop(entry.index, -1), mappings, progress, more)
            unsent.flush()
            progress.new_task()  # everything is answered: a death from now on is no item's
            if task.last:
                return
    except (BrokenPipeError, ConnectionResetError):
        # An answer found the parent gone (or its end closed): nobody will consume the segments of this
        # task's results (spares have no name), and a traceback would only reach the terminal it shared.
        if isinstance(task, _protocol.Task):
            for entry in task.entries:
                if entry.name is not None:
                    _protocol.discard(entry.name)
    finally:
        _ownership.unlink_owned()  # the process leaves through os._exit, which skips finalisers


def _answer_entry(
    unsent: _Unsent,
    options: Options,
    entry: _protocol.Entry,
    fd: int,
    mappings: _RefillMappings,
    progress: Progress,
    more: bool,
) -> None:
    """Run one entry and send its answer (or hold it back if ``more`` entries follow); ``fd``: its spare's
    descriptor (closed here), or -1."""
    try:
        shipped: list[_protocol.Shipped] = []
        arenas: list[Arena] = []

        def produce() -> _protocol.Shipped:
            if options.seed is not None:
                seed_item(options.seed, entry.index)
            item = options.items[entry.index] if options.items is not None else entry.item
            mapping = mappings.get(entry.spare)
            if mapping is None and entry.spare is not None:
                # A spare this worker has not mapped yet: all its pages are there (written, or allocated by
                # the parent), so its task can have an arena at once. Worth the least recently used mapping
                # if the arena can open: a call of many medium results hands each worker a new spare per item.
                size = os.fstat(fd).st_size
                mapping = mappings.remember(entry.spare, fd, size, make_room=Arena.large_enough(size))
            if mapping is not None and Arena.fits(mapping, fd):
                arenas.append(Arena(mapping, fd))
                shipped.append(_protocol.ship_in_place(lambda: options.func(item), fd, options.limit, arenas[0]))
                return shipped[0]
            result = options.func(item)
            if entry.spare is not None:
                shipped.append(_protocol.ship_into(result, fd, options.limit, mapping))
            else:
                assert entry.name is not None, "an entry has a name or a spare"
                shipped.append(_protocol.ship(result, entry.name, options.limit))
            return shipped[0]

        progress.started(entry.index)
        start = time.monotonic()
        message, handover, spoke = _protocol.answer(entry.index, produce, unsent.conn.send_bytes)
        grown = None
        if arenas:
            if arenas[0].frozen and entry.spare is not None:
                mappings.detach(entry.spare)
            if shipped:  # not after an error: the parent would not count the growth
                grown = arenas[0].grow_spare(shipped[0].segment_size)  # before the answer leaves: then the spare is the parent's
        # Only answers of results in the pipe wait: one in shared memory is large (the parent is not
        # woken often), and its handover or spare must reach the parent without delay. Nor does the
        # answer of an item that said something: should this worker die, what it said is not lost.
        in_pipe = handover is not None and not handover.names and shipped[0].handle is None
        unsent.send(message, more and in_pipe and not spoke and time.monotonic() - start < HOLD_SECONDS)
        if handover is not None:
            handover.complete()
        # Off the result's path: map the object, for the next refill (all its pages at once if it grew: they
        # were just allocated).
        if entry.spare is not None and handover is not None and shipped and shipped[0].handle is not None:
            mappings.remember(entry.spare, fd, max(shipped[0].handle.size, grown or 0))
    finally:
        if fd >= 0:
            os.close(fd)


# ----------------------------------------------------------------------------
# In the parent


@dataclass
class ChunkMessage:
    """A chunk's task, pickled, with its spares' descriptors; ``items``: how many items it holds."""

    data: Any
    fds: list[int]
    items: int


@dataclass
class Worker:
    """A worker process as the parent sees it."""

    process: Any
    conn: Connection
    progress: Progress
    pending: deque[int] = field(default_factory=deque)  # indices given to it (sent or held), not yet answered
    chunks: deque[int] = field(default_factory=deque)  # of each chunk given, the items not yet answered
    held: ChunkMessage | None = None  # its next chunk, waiting until it has answered the current one
    closing: bool = False  # its last task was sent: it exits once that is answered

    def close(self) -> None:
        """Once it is reaped: close its pipe, its sentinel and its progress word."""
        self.conn.close()
        self.process.close()
        self.progress.close()

    def given(self, chunk: range) -> None:
        """It was given (sent, or held back for it) the items of ``chunk``."""
        self.pending.extend(chunk)
        self.chunks.append(len(chunk))

    def answered(self, index: int) -> None:
        """Its answer for item ``index`` came."""
        if self.pending[0] == index:  # answers come in the order of the chunk
            self.pending.popleft()
        else:
            self.pending.remove(index)
        self.chunks[0] -= 1  # items are answered in the order they were given: the oldest chunk's
        if not self.chunks[0]:
            self.chunks.popleft()

    def owed(self) -> list[int]:
        """Forget every item given and not answered; return them."""
        owed = list(self.pending)
        self.pending.clear()
        self.chunks.clear()
        return owed

    def died_on(self) -> int:
        """After this worker died owing results: the item it died on. That is the item of its task it
        started last, if it is owed (it was running it, or sending its answer and those held back with
        it); else (nothing noted in this task) the first one owed. The items owed before it had finished,
        their answers held back and lost with the worker."""
        last = self.progress.last()
        return last if last is not None and last in self.pending else self.pending[0]


# The parent's ends of the workers' pipes: a forked child must not keep them open, or a worker
# would never see EOF when the parent dies (it, or a sibling, holds its pipe's other end).
_parent_ends: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _close_parent_ends_in_child() -> None:
    for conn in list(_parent_ends):
        try:
            conn.close()
        except OSError:
            pass
    _parent_ends.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_parent_ends_in_child)


class Workers:
    """The worker processes of a map call or of a Pool: one lifecycle for both.

    Parameters
    ----------
    ctx : multiprocessing context
        How workers start.
    inherited : Options, optional
        Given to every worker at its start (a map call's options).
    initializer : (callable, args), optional
        Called in every worker when it starts.
    """

    def __init__(
        self, ctx: Any, inherited: Options | None = None, initializer: Initializer | None = None
    ) -> None:
        self.ctx = ctx
        self.inherited = inherited
        self.initializer = initializer
        self.running: list[Worker] = []

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.running)

    def __len__(self) -> int:
        return len(self.running)

    def __getitem__(self, i: int) -> Worker:
        return self.running[i]

    def start(self) -> Worker:
        """Start one more worker; return it."""
        progress_fd = Progress.new_file()
        try:
            progress = Progress(progress_fd)
            parent_end, child_end = self.ctx.Pipe(duplex=True)
            _parent_ends.add(parent_end)  # before the fork: the child closes its copy of it too
            process = self.ctx.Process(
                target=worker_main, args=(child_end, os.getpid(), self.inherited, self.initializer), daemon=True
            )
            try:
                process.start()
            finally:
                child_end.close()  # so that the parent sees EOF when the worker is gone
            worker = Worker(process, parent_end, progress)
            try:
                _protocol.send_descriptor(parent_end, progress_fd, process.pid)
            except OSError:
                pass  # it died at once: seen as any worker's death
            except BaseException:  # interrupted (Ctrl-C): a worker not in the list must not live on
                process.kill()
                process.join()
                worker.close()
                raise
        finally:
            os.close(progress_fd)
        self.running.append(worker)
        return worker

    def forget_exited(self) -> list[int]:
        """Reap the workers that ended while idle (they cost nothing, are replaced later); return their pids."""
        gone = [w for w in self.running if w.process.exitcode is not None]
        pids = [w.process.pid for w in gone]
        for worker in gone:
            self.running.remove(worker)
            worker.close()
        return pids

    def bury(self, worker: Worker) -> tuple[bool, int | None]:
        """Wait for a worker that closed its pipe or exited (kill it if it lives on), and reap it.

        Returns whether it exited by itself and its exit code. If it owed no
        results it is removed; otherwise it stays in the list for :meth:`stop`.
        """
        process = worker.process
        exited = bool(wait([process.sentinel], TERMINATE_GRACE))
        if not exited:  # it closed its pipe but lives on: of no use any more
            process.kill()
        process.join()
        code = process.exitcode
        if not worker.pending:
            self.forget(worker)
        return exited, code

    def forget(self, worker: Worker) -> None:
        """Remove a reaped worker, closing its pipe and its sentinel's descriptors."""
        self.running.remove(worker)
        worker.close()

    def stop(self, graceful: bool) -> None:
        """Tell every worker to exit and reap them (graceful), or terminate and reap them.

        Either way no descriptor of theirs stays open and no zombie is left;
        what a terminated worker left in its pipe is read, to unlink the
        ShmArrays handed over there.
        """
        workers, self.running = self.running, []
        if graceful:
            # Every result is in: tell them all first, so that they tear down at the same time.
            # (map's workers mostly exited already: their last task told them to.)
            for worker in workers:
                try:
                    worker.conn.send(_protocol.STOP)
                except OSError:
                    pass
        else:
            for worker in workers:
                if worker.process.exitcode is None:
                    worker.process.terminate()
        for worker in workers:
            process = worker.process
            if not wait([process.sentinel], TERMINATE_GRACE):
                process.kill()
            process.join()
            if not graceful:
                _discard_unread(worker)
            worker.close()


def _discard_unread(worker: Worker) -> None:
    """Read what a stopped worker left in its pipe, to unlink the ShmArrays handed over there."""
    try:
        while worker.conn.poll():
            _protocol.forget(_protocol.read_header(worker.conn.recv_bytes())[0].names)
    except Exception:
        pass  # a closed or garbled pipe: nothing more to read
