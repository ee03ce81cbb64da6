"""What travels between the parent and its workers: named messages, and the transport of one result.

How an item and its result travel (map, Pool and the executor alike)::

    parent                                    worker
    ------                                    ------
    Task(entries=[Entry(index, item, name | spare id)], ...)
      + one descriptor per spare (SCM_RIGHTS)  ->  func(item)
                                                   ship(): small -> Shipped(value)
                                                           large -> written under ``name`` or into the spare
                                                                    -> Shipped(handle)
                   <-  answer bytes: Header(kind, index, handed-over names) + payload
    read_header(); read_payload(); receive()  (consumes the segment, or keeps the spare)

A Pool also sends ``Unmap(drops)`` between calls (answered by an UNMAPPED
header) and :data:`STOP`.

Each answer is one message (``send_bytes``): a header the parent can always
read, then the payload. The header holds only builtins, so the parent learns
which item an answer is for even when rebuilding the payload fails: that
failure is then the item's error, and the pipe stays in step. In a map
(whose caller sees no result before the end) a worker may hold back the
answers of fast items that said nothing and whose results travel in the
pipe, and send them together as one :data:`BATCH` message: each message
wakes the parent, which costs as much as rebuilding a small result.

A ShmArray made by the worker and returned as (part of) a result hands the
duty to unlink its name over to the parent: the header lists such names,
the worker gives the duty up only once the answer is sent, and the parent
unlinks every listed name that it did not take over (payload never rebuilt,
run aborted with the answer unread).
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import reduction
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .. import _names, _ownership, _shmarray, _transfer
from .._api import copy2shm, unlink
from .._handle import ShmObj
from .._shared import SPARE_LABEL, RefillMapping
from ..codecs import pandas as pandas_codec
from ..errors import ShmError
from . import _arena, _relay
from ._arena import Arena
from ._options import PIPE_LIMIT, Options

#: The label of spares in error messages (they have no name).
SPARE = SPARE_LABEL


# ----------------------------------------------------------------------------
# Parent -> worker


@dataclass(frozen=True)
class Entry:
    """One item of a task: where its result goes if it is large."""

    index: int
    item: Any  # None when the worker inherited the items
    name: str | None  # the segment name for a large result; None: into the spare sent along
    spare: int | None = None  # the id of the spare whose descriptor follows the task


@dataclass(frozen=True)
class Task:
    """Items for a worker to run, in order, answering each."""

    entries: list[Entry]
    options: Options | None = None  # None: the options the worker was started with
    last: bool = False  # no more tasks will come: exit right after answering
    drops: tuple[int, ...] = ()  # spares released: unmap them first
    hold: bool = False  # answers may be held back (a map: its caller sees no result before the end)


@dataclass(frozen=True)
class Unmap:
    """Unmap these released spares and answer UNMAPPED (then their space is free)."""

    drops: tuple[int, ...]


#: Exit now.
STOP = None


def send_descriptor(conn: Any, fd: int, pid: int) -> None:
    """Send a spare's descriptor to worker ``pid`` after its task (SCM_RIGHTS)."""
    reduction.send_handle(conn, fd, pid)


def receive_descriptor(conn: Any) -> int:
    """In a worker: the descriptor of a spare that follows the task."""
    return reduction.recv_handle(conn)


# ----------------------------------------------------------------------------
# Worker -> parent

OK = "ok"
#: An OK answer whose payload is the result itself, not its :class:`Shipped`: a result in the pipe,
#: with nothing else to say (the common small result, pickled and unpickled in the least time).
VALUE = "value"
ERROR = "error"
# A Pool worker's reply to a task with no item: it unmapped the spares it was told to drop.
UNMAPPED = "unmapped"
#: An early part of what an item said (its code flushed sys.stdout or sys.stderr); its answer follows.
SAID = "said"
#: Answers held back by a worker, sent together: the payload is the list of their messages.
BATCH = "batch"
#: The index of an ERROR answer saying that the worker's initializer raised (the worker then exits).
INITIALIZER = -1


@dataclass(frozen=True)
class Header:
    """What every answer says first: ``kind`` (OK, VALUE, ERROR, SAID or BATCH), the item's ``index``, handed-over
    ``names``, and what the item said on the way (its output and warnings, see :mod:`._relay`)."""

    kind: str
    index: int
    names: tuple[str, ...]
    said: _relay.Events = ()


def pickled(obj: Any) -> bytes:
    """``obj`` pickled with ForkingPickler, as ``Connection.send`` does (it knows multiprocessing's own
    types), except for a frame's axes, mostly (see :class:`_Pickler`).

    As bytes, not as ``ForkingPickler.dumps``' memoryview of a BytesIO: a view kept in a reference cycle
    makes the collector fail to clear that BytesIO (Python 3.13 reports "Existing exports of data").
    ``getvalue`` hands over the buffer without a copy.
    """
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _Pickler(ForkingPickler):
    """A ForkingPickler that sends a frame's axes, mostly, in fewer steps than pandas does: a plain
    ``pd.Index`` of few plain labels as the list of its labels (rebuilt by the pandas codec, as it
    rebuilds one from shared memory), a ``pd.RangeIndex`` as its start, stop, step and name.

    pandas pickles an Index of str through Arrow and a RangeIndex through a dict: for a frame of 100 rows
    and three columns (x, y, z), pickling and rebuilding took 111-112 µs that way and 79-83 µs this way.
    Every other object (an Index of another class, of many labels or of other labels too) is pickled as
    ForkingPickler pickles it.
    """

    def __init__(self, file: io.BytesIO, protocol: int) -> None:
        super().__init__(file, protocol)
        # The table is looked up by exact type: these classes only, not their subclasses. A reducer
        # registered for them (copyreg.pickle, ForkingPickler.register) is in the table already and stays.
        self.dispatch_table.setdefault(pd.Index, _reduce_index)
        self.dispatch_table.setdefault(pd.RangeIndex, _reduce_range_index)


def _reduce_index(index: pd.Index) -> str | tuple[Any, ...]:
    labels = pandas_codec.few_labels(index)
    if labels is None:
        return index.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return pandas_codec.labels_index, (labels, index.dtype, index.name)


def _reduce_range_index(index: pd.RangeIndex) -> tuple[Any, ...]:
    return _range_index, (index.start, index.stop, index.step, index.name)


def _range_index(start: int, stop: int, step: int, name: Any) -> pd.RangeIndex:
    return pd.RangeIndex(start, stop, step, name=name)


def _header(kind: str, index: int, names: tuple[str, ...], said: _relay.Events) -> bytes:
    """A :class:`Header`'s fields pickled: builtins only, so plain pickle serves (a ForkingPickler copies
    its reducers' table each time it is made, a cost every answer would pay)."""
    return pickle.dumps((kind, index, names, said), protocol=pickle.HIGHEST_PROTOCOL)


class Answer(NamedTuple):
    """What :func:`answer` made: the message, the handover (None for an ERROR answer), and whether the item
    said anything (printed or warned, early or in the header)."""

    message: bytes
    handover: _ownership.Handover | None
    spoke: bool


def answer(index: int, produce: Callable[[], "Shipped"], on_flush: Callable[[bytes], None] | None = None) -> Answer:
    """In a worker: run ``produce()`` for item ``index`` (it ships the item's result) and return the
    message for the parent.

    Never raises for what ``produce`` (or pickling its value) raises: that
    becomes an ERROR answer. What ``produce`` writes to ``sys.stdout`` /
    ``sys.stderr`` and the warnings it issues travel in the header; when
    its code flushes those streams, what it said so far goes to
    ``on_flush`` as a :data:`SAID` message (if given). Call ``complete()``
    on the returned handover (if any) once the message is sent.
    """
    handover = _ownership.Handover()
    flushed: list[bool] = []  # what it said early, once per flush

    def early(said: _relay.Events) -> None:
        flushed.append(True)
        if on_flush is not None:
            on_flush(_header(SAID, index, (), said))

    run, said = _relay.capture(produce, None if on_flush is None else early)
    try:
        with handover:
            shipped = run()
            kind = VALUE if shipped.only_value else OK
            body = pickled(shipped.value if kind == VALUE else shipped)
        events = said()
        header = _header(kind, index, tuple(handover.names), events)
    except BaseException as exc:  # report everything; the parent decides
        body = pickled(describe(exc))
        events = said()
        return Answer(_header(ERROR, index, (), events) + body, None, bool(flushed or events))  # the worker keeps what it made
    return Answer(header + body, handover, bool(flushed or events))


def batch(messages: list[bytes]) -> bytes:
    """In a worker: one message carrying the answers ``messages`` (each as :func:`answer` made it)."""
    return _header(BATCH, -1, (), ()) + pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)


def initialize(initializer: Callable[..., Any], args: tuple[Any, ...]) -> bytes | None:
    """In a worker, at its start: call ``initializer(*args)``; None, or the ERROR answer for the parent."""
    try:
        initializer(*args)
    except BaseException as exc:
        return _header(ERROR, INITIALIZER, (), ()) + pickled(describe(exc))
    return None


def describe(exc: BaseException) -> tuple[bytes | None, str, str]:
    """The exception as (pickle or None, one-line message, traceback text); never raises.

    Every step is guarded: ``__str__``, ``__repr__``, ``__reduce__`` or the
    traceback formatting of a user's exception may raise.
    """
    try:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    except BaseException:
        kind = "<exception of unknown type>"
    try:
        message = f"{kind}: {exc}"
    except BaseException:
        try:
            message = f"{kind}: {exc!r}"
        except BaseException:
            message = f"{kind} (its str() and repr() raised)"
    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException:
        try:
            text = "".join(traceback.format_tb(exc.__traceback__)) + message + "\n"
        except BaseException:
            text = message + "\n"
    payload = None
    if isinstance(exc, Exception):
        try:
            payload = pickled(exc)
        except BaseException:
            payload = None
    return payload, message, text


def read_header(data: bytes) -> tuple[Header, io.BytesIO]:
    """In the parent: the header of an answer, and the stream positioned at its payload."""
    stream = io.BytesIO(data)
    kind, index, names, said = pickle.load(stream)
    return Header(kind, index, tuple(names), said), stream


def read_payload(stream: io.BytesIO) -> Any:
    """In the parent: rebuild the payload (raises whatever rebuilding it raises)."""
    return pickle.load(stream)


def as_shipped(header: Header, payload: Any) -> "Shipped":
    """In the parent: the :class:`Shipped` of an OK or VALUE answer, given its rebuilt payload."""
    return Shipped(value=payload) if header.kind == VALUE else payload


def unmapped() -> bytes:
    """In a Pool worker: the reply to a task that only asked it to unmap released spares."""
    return _header(UNMAPPED, -1, (), ())


def read_unmapped(data: bytes) -> bool:
    """In the parent: whether ``data`` is a worker's :func:`unmapped` reply (False: the pipe is out of step)."""
    try:
        header, _ = read_header(data)
    except Exception:
        return False
    if header.kind != UNMAPPED:
        forget(header.names)
        return False
    return True


def forget(names: tuple[str, ...]) -> None:
    """In the parent: unlink the handed-over names that this process did not take over."""
    for name in names:
        if _names.creator_pid(name) is not None:  # only names in shmalloc's form
            _ownership.unlink_unless_owned(name)


# ----------------------------------------------------------------------------
# The transport of one result


@dataclass(frozen=True)
class Shipped:
    """A result on its way to the parent: the value itself, or a handle to it in shared memory."""

    value: Any = None
    handle: ShmObj | None = None
    boxed: bool = False  # the handle holds a _Box around the value
    fell_back: bool = False  # /dev/shm was full: the value travels through the pipe
    spare_use: int = 0  # the most of its spare a worker's task took or wanted at once (see _arena)

    @property
    def only_value(self) -> bool:
        """Whether it is the value alone, in the pipe, with nothing else to say."""
        return self.handle is None and not self.fell_back and not self.spare_use

    @property
    def segment_size(self) -> int:
        """Bytes of the segment that holds it (0: it travels in the pipe)."""
        return 0 if self.handle is None else self.handle.size

    def unboxed(self, read: Any) -> Any:
        """The result, given what was read from the segment of :attr:`handle`."""
        return read.value if self.boxed else read


@dataclass
class _Box:
    """Keeps containers and scalars as they are: copy2shm would turn a list of numbers into an array."""

    value: Any


def ship(result: Any, name: str, limit: int = PIPE_LIMIT) -> Shipped:
    """In a worker: make ``result`` ready for the parent, in shared memory under ``name`` if large.

    A full /dev/shm (ENOSPC) sends the value through the pipe instead; then
    nothing is left under ``name``.
    """
    return _ship(result, limit, lambda obj: copy2shm(obj, name=name))


def ship_into(result: Any, fd: int, limit: int = PIPE_LIMIT, mapping: RefillMapping | None = None) -> Shipped:
    """In a worker: write a large ``result`` into the spare ``fd`` (a small one goes through the pipe).

    Through ``mapping`` (a refill mapping of ``fd``) if the result fits in
    it. A full /dev/shm (ENOSPC) sends the value through the pipe instead.
    A write that fails or falls back leaves the spare its size: the part it
    grew by would take /dev/shm space that the parent does not count.
    """
    size = os.fstat(fd).st_size
    try:
        shipped = _ship(result, limit, lambda obj: _transfer.write_held(obj, fd, mapping))
    except BaseException:
        _shrink(fd, size)
        raise
    if shipped.fell_back:
        _shrink(fd, size)
    return shipped


def ship_in_place(produce: Callable[[], Any], fd: int, limit: int, arena: Arena) -> Shipped:
    """In a worker: run the task ``produce`` with its large arrays allocated in ``arena`` (a refill
    mapping of the spare ``fd``), and make its result ready for the parent, where it lies if it can.

    See :mod:`._arena`; ``arena.settle()`` has run when this returns or raises.
    """
    try:
        shipped = _ship_from(produce, fd, limit, arena)
    finally:
        arena.settle()
    return replace(shipped, spare_use=arena.peak)


def _ship_from(produce: Callable[[], Any], fd: int, limit: int, arena: Arena) -> Shipped:
    """The body of :func:`ship_in_place`."""
    size = os.fstat(fd).st_size
    with arena.allocating() as opened:
        result = produce()
    if not opened or arena.untouched():  # nothing of the task lives there: as any result, through the mapping
        arena.settle()
        return ship_into(result, fd, limit, arena.mapping)
    if not arena.spoiled() and _nbytes(result, limit) >= limit:
        whole = isinstance(result, np.ndarray) or _is_pandas(result)
        try:
            handle = _transfer.write_in_place(result if whole else _Box(result), fd, arena)
        except ShmError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            handle = None  # the object could not grow: as any result (which falls back in turn)
        # A fork by another thread meanwhile may have kept a copy of a buffer from the object.
        if handle is not None and not arena.spoiled():
            del result  # the worker lets go of it: what still lives in the arena, the task kept
            arena.settle()
            _arena.counts["in place"] += 1
            return Shipped(handle=handle, boxed=not whole)
    arena.settle()  # freezes: what the task made there is the worker's own memory from now on
    _shrink(fd, size)  # what placing it grew the object by
    return ship_into(result, fd, limit)  # with pwrite: the mapping is no longer the spare's


def _shrink(fd: int, size: int) -> None:
    """Cut the spare ``fd`` back to ``size`` bytes if a failed write grew it."""
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    except OSError:
        pass  # the parent's budget is then off by the growth until the spare is released


def _ship(result: Any, limit: int, write: Callable[[Any], ShmObj]) -> Shipped:
    if _nbytes(result, limit) < limit:
        return Shipped(value=result)
    whole = isinstance(result, np.ndarray) or _is_pandas(result)
    try:
        handle = write(result if whole else _Box(result))
    except ShmError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return Shipped(value=result, fell_back=True)
    return Shipped(handle=handle, boxed=not whole)


def receive(shipped: Shipped, name: str, copy: bool) -> Any:
    """In the parent: rebuild the result a worker shipped (consuming its segment)."""
    if shipped.handle is None:
        return shipped.value
    check_answered_name(shipped.handle, name)
    # Mapped with copy=False whatever its size, where allocate_from_shm reads a small object: the
    # parent's time is what all the workers wait for (see _transfer.MAP_FROM).
    return shipped.unboxed(_transfer.read_named(shipped.handle, copy))


def check_answered_name(handle: ShmObj, name: str) -> None:
    """Refuse a handle to any segment but ``name``, the one the parent handed out with the item."""
    if handle.name != name:
        raise ShmError(errno.EINVAL, f"a worker answered with segment {handle.name!r}", name)


def discard(name: str) -> None:
    """Unlink ``name`` if it exists: a result nobody will consume."""
    try:
        unlink(name)
    except FileNotFoundError:
        pass


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".", 1)[0] == "pandas" and hasattr(obj, "memory_usage")


_SCALARS = frozenset({type(None), bool, int, float, complex})


def _nbytes(obj: Any, limit: int) -> int:
    """Roughly how many bytes ``obj`` holds; counting may stop once ``limit`` is reached."""
    kind = type(obj)
    if kind in _SCALARS:  # the common small results first, by their exact type
        return 32
    if kind is np.ndarray:
        return obj.nbytes
    if isinstance(obj, _shmarray.ShmArray) and obj.shared:
        return 256  # pickled by reference (name and layout)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray, str, memoryview)):
        return len(obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, np.generic)):
        return 32
    if _is_pandas(obj):
        return pandas_codec.nbytes(obj)
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
