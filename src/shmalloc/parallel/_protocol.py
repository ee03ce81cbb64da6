"""A worker's answer for one item, as bytes on the pipe: a header the parent can always read, then the payload.

The header (kind, index, handed-over names) holds only builtins, so the
parent learns which item an answer is for even when rebuilding the payload
fails: that failure is then the item's error, and the pipe stays in step
(each answer is one message, read with ``recv_bytes``).

A ShmArray made by the worker and returned as (part of) a result hands the
duty to unlink its name over to the parent: the header lists such names,
the worker gives the duty up only once the answer is sent, and the parent
unlinks every listed name that it did not take over (payload never rebuilt,
run aborted with the answer unread).
"""
from __future__ import annotations

import io
import pickle
import traceback
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from .. import _names, _shmarray

OK = "ok"
ERROR = "error"
# A Pool worker's reply to a task with no item: it unmapped the spares it was told to drop.
UNMAPPED = "unmapped"


@dataclass(frozen=True)
class Header:
    """What every answer says first: ``kind`` (OK or ERROR), the item's ``index``, handed-over ``names``."""

    kind: str
    index: int
    names: tuple[str, ...]


def _dumps(obj: Any) -> bytes:
    # ForkingPickler, as Connection.send uses: it knows multiprocessing's own types.
    return bytes(ForkingPickler.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def answer(index: int, produce: Callable[[], Any]) -> tuple[bytes, _shmarray.Handover | None]:
    """In a worker: run ``produce()`` for item ``index`` and return the message for the parent.

    Never raises for what ``produce`` (or pickling its value) raises: that
    becomes an ERROR answer. Call ``complete()`` on the returned handover
    (if any) once the message is sent.
    """
    handover = _shmarray.Handover()
    try:
        with handover:
            value = produce()
            body = _dumps(value)
        header = (OK, index, tuple(handover.names))
    except BaseException as exc:  # report everything; the parent decides
        handover = None  # the worker keeps what it made
        body = _dumps(describe(exc))
        header = (ERROR, index, ())
    return _dumps(header) + body, handover


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
            payload = _dumps(exc)
        except BaseException:
            payload = None
    return payload, message, text


def read_header(data: bytes) -> tuple[Header, io.BytesIO]:
    """In the parent: the header of an answer, and the stream positioned at its payload."""
    stream = io.BytesIO(data)
    kind, index, names = pickle.load(stream)
    return Header(kind, index, tuple(names)), stream


def read_payload(stream: io.BytesIO) -> Any:
    """In the parent: rebuild the payload (raises whatever rebuilding it raises)."""
    return pickle.load(stream)


def unmapped() -> bytes:
    """In a Pool worker: the reply to a task that only asked it to unmap released spares."""
    return _dumps((UNMAPPED, -1, ()))


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
            _shmarray.unlink_unless_owned(name)


__all__ = ["Header", "answer", "describe", "read_header", "read_payload", "forget", "unmapped", "read_unmapped", "OK", "ERROR", "UNMAPPED"]
