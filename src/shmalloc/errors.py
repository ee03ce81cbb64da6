"""shmalloc's exceptions."""
from __future__ import annotations

import errno as errno_codes
import os

# OSError.__new__ picks the builtin subclass from errno (FileExistsError, ...);
# ShmError keeps that behaviour by mixing in the matching subclass.
_BUILTIN_FOR_ERRNO = {
    errno_codes.EEXIST: FileExistsError,
    errno_codes.ENOENT: FileNotFoundError,
    errno_codes.EACCES: PermissionError,
    errno_codes.EPERM: PermissionError,
}


class ShmError(OSError):
    """A shared memory operation failed.

    A subclass of :class:`OSError` with ``errno``, ``strerror`` and
    ``filename`` (the segment's name). Where the errno has a builtin subclass
    of OSError (``FileExistsError``, ``FileNotFoundError``,
    ``PermissionError``) the raised exception is an instance of it too, so
    ``except FileExistsError:`` works.
    """

    def __new__(cls, errno: int, strerror: str | None = None, name: str | None = None):
        if cls is ShmError and errno in _BUILTIN_FOR_ERRNO:
            cls = _SUBCLASSES[errno]
        return super().__new__(cls, errno, strerror or os.strerror(errno), name)

    def __init__(self, errno: int, strerror: str | None = None, name: str | None = None):
        super().__init__(errno, strerror or os.strerror(errno), name)

    def __reduce__(self):
        return (ShmError, (self.errno, self.strerror, self.filename))


class ShmFileExistsError(ShmError, FileExistsError):
    """A shared memory object of that name exists already (EEXIST)."""


class ShmFileNotFoundError(ShmError, FileNotFoundError):
    """No shared memory object of that name (ENOENT): a handle that was consumed already
    (each can be consumed once), an object removed, or one that never existed."""


class ShmPermissionError(ShmError, PermissionError):
    """The shared memory object belongs to another user, or its mode refuses access (EPERM, EACCES)."""


_SUBCLASSES = {
    errno_codes.EEXIST: ShmFileExistsError,
    errno_codes.ENOENT: ShmFileNotFoundError,
    errno_codes.EACCES: ShmPermissionError,
    errno_codes.EPERM: ShmPermissionError,
}
assert all(issubclass(_SUBCLASSES[code], builtin) for code, builtin in _BUILTIN_FOR_ERRNO.items())

#: What a missing segment means to a user of handles.
NO_SUCH_SEGMENT = "no such segment: it was already consumed (a handle can be consumed once), removed, or never existed"


class CorruptHandleError(ValueError):
    """A handle does not describe the shared memory object it names (damaged or forged)."""


class WorkerError(RuntimeError):
    """An item failed in a worker and its exception could not be re-raised as it was.

    Attributes
    ----------
    index : int or None
        Position of the failing item in the input (None for a task of
        :class:`shmalloc.ProcessPoolExecutor`).
    remote_traceback : str
        The traceback text from the worker ("" if there is none).
    """

    def __init__(self, message: str, index: int | None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.args[0], self.index, self.remote_traceback))


class WorkerDiedError(WorkerError):
    """A worker process ended (killed, crashed, ``os._exit``) while it was working on an item.

    Attributes
    ----------
    index : int
        The item the worker was working on.
    exitcode : int or None
        The worker's exit code; ``-N`` if it was killed by signal ``N``.
    """

    def __init__(self, message: str, index: int, exitcode: int | None = None) -> None:
        super().__init__(message, index)
        self.exitcode = exitcode

    def __reduce__(self):
        return (type(self), (self.args[0], self.index, self.exitcode))


class ShmFallbackWarning(RuntimeWarning):
    """Results did not fit into /dev/shm and came back through the pipe instead."""


class FailedItemsWarning(RuntimeWarning):
    """Some items of a call with ``errors="return"`` failed: their results are their exceptions."""
