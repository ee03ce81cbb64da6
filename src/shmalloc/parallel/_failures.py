"""How a worker's failure reads in the parent: exit codes as text, the worker's exception rebuilt and named."""
from __future__ import annotations

import pickle
import signal

from ..errors import WorkerError


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


def remote_error(
    index: int | None, described: tuple[bytes | None, str, str], where: str, raised_by: str | None = None
) -> Exception:
    """The exception to raise in the parent for an item that failed in a worker (see :func:`._protocol.describe`).

    The worker's own exception where it can be rebuilt, with a note naming
    the item (None: the executor's task) and giving the worker's
    traceback; else a :class:`WorkerError`. ``raised_by``: what raised it,
    if not ``func`` for the item.
    """
    payload, message, text = described
    subject = "the task" if index is None else f"item {index}"
    origin = raised_by or f"func for {subject}"
    exc: BaseException | None = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if isinstance(exc, Exception):
        try:
            exc.add_note(f"{where}: raised by {origin}; the worker's traceback:\n{text.rstrip()}")
            return _with_index(exc, index)
        except Exception:
            pass  # e.g. a __notes__ that is not a list: report it as a WorkerError
    return WorkerError(f"{raised_by or subject} failed in a worker: {message}\n\n{text}", index, text)


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


def warning_error(index: int | None, exc: Exception, where: str) -> Exception:
    """Name item ``index`` (None: the executor's task) on ``exc``, a warning of it that this process's warning
    filters turned into an error when it was re-issued here."""
    subject = "the task" if index is None else f"item {index}"
    try:
        exc.add_note(f"{where}: issued by func for {subject}, an error under this process's warning filters")
    except Exception:
        return exc
    return _with_index(exc, index)
