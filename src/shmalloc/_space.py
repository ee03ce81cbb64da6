"""Space givers: what this process holds in /dev/shm and can give back when a write finds it full.

A :class:`shmalloc.Pool` keeps *spares*: unlinked objects held only by a
descriptor, which take /dev/shm space that no listing shows. When a write
of this process (``copy2shm``, a new ``ShmArray``) fails with ENOSPC, it
asks every registered holder to give its space back, and tries once more
if any did. Holders are kept weakly: registering one never keeps it alive.
"""
from __future__ import annotations

import errno
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .errors import ShmError

T = TypeVar("T")


class SpaceHolder(Protocol):
    def give_back_space(self) -> int:
        """Release what can be released now; return the bytes given back (0 if none)."""


_holders: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(holder: SpaceHolder) -> None:
    """Ask ``holder`` for its space when a write of this process finds /dev/shm full."""
    _holders.add(holder)


def give_back_all() -> int:
    """Ask every holder of this process to give its space back; return the bytes given back."""
    given = 0
    for holder in list(_holders):
        try:
            given += holder.give_back_space()
        except Exception:  # a holder's failure must not replace the ENOSPC the caller reports
            pass
    return given


def retry_on_enospc(write: Callable[..., T], *args: Any) -> T:
    """``write(*args)``; if /dev/shm is full (ShmError ENOSPC), free this process's spares and try once more."""
    try:
        return write(*args)
    except ShmError as exc:
        if exc.errno != errno.ENOSPC or give_back_all() <= 0:
            raise
    return write(*args)
