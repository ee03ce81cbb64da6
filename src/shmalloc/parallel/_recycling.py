"""A Pool's results written into spares: recycled objects whose pages are already faulted in.

Each item gets a free spare if there is one (its descriptor travels with
the task), else a fresh name as in :func:`shmalloc.map`. A consumed
object becomes a spare again: at once if the result was copied out, once
every array mapping it is freed for a ``copy=False`` result (see
:mod:`._spares`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _transfer
from .._handle import ShmObj
from . import _arena, _protocol
from ._call import NamedResults
from ._spares import Spare, Spares, fork_stamp


@dataclass
class Kept:
    """The object a result was read from, to keep as a spare; the arrays of a ``copy=False`` result that map it."""

    spare: Spare
    owners: list[np.ndarray]
    stamp: int | None  # fork_stamp() taken before the arrays were made
    parts: list[tuple[int, int]]  # the pages of the object the result takes (see _transfer.Read)

    def return_to(self, spares: Spares) -> None:
        """Under the spares' lock: lend the spare to the result's arrays, or make it free at once (copied out)."""
        if self.owners:
            spares.lend(self.spare, self.owners, self.stamp, self.parts)
        else:
            spares.give(self.spare)


def read_result(handle: ShmObj, copy: bool, spare: Spare | None, name: str | None, recycle: bool) -> tuple[Any, Kept | None]:
    """Rebuild the object ``handle`` describes: written into ``spare``, or else under ``name`` (consumed).

    Returns the value and what to keep as a spare (:meth:`Kept.return_to`): ``spare`` itself, or
    the consumed object if ``recycle``. Raises what reading raises; the caller then releases
    ``spare``, of no use whatever is in it.
    """
    stamp = fork_stamp()  # before the result's arrays map the object: a fork from now on retires it
    if spare is not None:
        with _transfer.open_held(spare.fd, _protocol.SPARE, handle.size) as segment:
            read = _transfer.read(segment, handle, copy)
        # A Pool worker grows a spare its task's arena was too small for (see _arena).
        spare.size = max(spare.size, handle.size, os.fstat(spare.fd).st_size)
        return read.value, Kept(spare, read.owners, stamp, read.parts)
    assert name is not None, "a result is in a spare or under a name"
    with _transfer.open_named(name, handle.size) as segment:  # opens and unlinks the name
        read = _transfer.read(segment, handle, copy)
        fd = segment.reopen_writable() if recycle else -1
    return read.value, Kept(Spare(fd, handle.size), read.owners, stamp, read.parts) if fd >= 0 else None


def _counted(spare: Spare, result_bytes: int, spare_use: int) -> int:
    """What a result of ``result_bytes`` in ``spare`` counts for the budget of the next call's spares: its
    bytes, or, if its task used the spare as its arena, what the task took there at once, times the arena's
    growth (the budget must not cut what it just grew), up to the spare's size."""
    if not spare_use:
        return result_bytes
    return min(spare.size, int(_arena.GROWTH * max(result_bytes, spare_use)))


class SpareResults(NamedResults):
    """Destinations of a Pool's results: spares where there are, fresh names otherwise."""

    def __init__(self, copy: bool, spares: Spares, recycle: bool) -> None:
        super().__init__(copy)
        self.spares = spares
        self.recycle = recycle
        self.lent: dict[int, Spare] = {}  # index -> spare handed out with it
        self.consumed_bytes = 0

    def begin(self, gone_pids: list[int]) -> None:
        self.spares.reclaim()
        self.spares.shrink_lent()  # results kept past the call that made them
        for pid in gone_pids:  # their mappings died with them
            self.spares.dropped.pop(pid, None)

    def entry(self, index: int, item: Any, pid: int) -> tuple[_protocol.Entry, int | None]:
        spare = self.spares.take(pid) if self.recycle else None
        if spare is None:
            return super().entry(index, item, pid)
        self.lent[index] = spare
        spare.mappers.add(pid)  # the worker maps it after filling it
        return _protocol.Entry(index, item, None, spare.sid), spare.fd

    def drops_for(self, pid: int) -> tuple[int, ...]:
        return tuple(self.spares.dropped.pop(pid, ()))

    def receive(self, index: int, shipped: _protocol.Shipped) -> Any:
        handle = shipped.handle
        spare = self.lent.pop(index, None)
        if handle is None:
            if spare is not None:
                self.consumed_bytes += _counted(spare, 0, shipped.spare_use)  # its task's arena
                self.spares.give(spare)
            else:
                del self.names[index]
            return shipped.value
        name = None
        if spare is None:
            name = self.names[index]
            _protocol.check_answered_name(handle, name)
            del self.names[index]
        try:
            value, kept = read_result(handle, self.copy, spare, name, self.recycle)
        except BaseException:
            if spare is not None:
                self.spares.release(spare)
            raise
        self.consumed_bytes += handle.size if spare is None else _counted(spare, handle.size, shipped.spare_use)
        if kept is not None:
            kept.return_to(self.spares)
        return shipped.unboxed(value)

    def redo(self, index: int) -> None:
        super().redo(index)
        spare = self.lent.pop(index, None)
        if spare is not None:  # unused, or written by a worker that died: written over next time
            self.spares.give(spare)

    def release_unused(self) -> None:
        super().release_unused()
        for spare in self.lent.values():  # handed out, not used: still good spares
            self.spares.give(spare)
        self.lent.clear()

    def aborted(self) -> None:
        self.spares.dropped.clear()  # the stopped workers' mappings died with them

    def finished(self) -> None:
        self.spares.end_call(self.consumed_bytes)
