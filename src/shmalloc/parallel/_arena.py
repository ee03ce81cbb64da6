"""A worker's arena (a Pool's or an executor's): its task's large arrays come from its shared mapping of the task's spare.

The spare's pages are already there, mapped in the worker, where fresh
memory must be faulted in page by page: a new 1e7-row frame computed into
them takes 15 ms here, against 27 ms into fresh pages and 35 ms with the
copy of the result into the spare. The result is then shipped where it lies
(:func:`shmalloc._transfer.write_in_place`): no copy at all.

The object must never change under an array that maps it, and an array the
parent maps must not change with what the worker does later. So:

- while the task runs, numpy's allocations of at least :data:`THRESHOLD`
  bytes made in its thread come from the mapping, past its first
  :data:`HEAD` bytes (smaller ones, and other threads', from the heap);
- when it is over and no array it allocated there lives, the region is
  released: the mapping is the worker's refill mapping again, and the result
  goes as any other;
- else the result is placed there and the header written, and the worker
  lets go of it. Arrays of the region that still live then (the task kept
  them, in a global or a traceback) are frozen before the answer leaves: the
  region is remapped privately and their pages copied, so they are the
  worker's own memory from then on, and the object can be reused;
- a fork while the region holds arrays, or while the task runs, freezes it
  at once (in the native core, before the fork): the result is then written
  into the object as any other, and the task's later arrays come from the
  heap (in the child too).

If a region cannot be frozen (mmap fails), the worker exits before
answering: the parent then redoes the item or reports the death. If no
arena can be opened (every region holds arrays that tasks kept), the task
runs as without one.

Known costs: a spare grows (fresh pages) until it holds what its tasks
allocate at once, temporaries included; a ``copy=False`` result made in
place keeps the whole object (its task's freed temporaries included) until
the second call after it begins (see :meth:`._spares.Spares.shrink_lent`). A
frozen region's mapping keeps the object alive until its last array is
freed, but not its pages: the parent frees those no array maps when it
releases the spare.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Iterator

from .. import _ownership, _posix
from .._format import PAGE as _PAGE
from .._format import round_up_to_page
from .._shared import RefillMapping
from ._spares import OVERSIZE, shm_free_bytes

#: Bytes at the start of the mapping kept for the header and recipe.
HEAD = 64 * 1024
#: numpy allocations of at least this many bytes come from the arena. (With 1 MiB, a result of columns of
#: a few hundred KB, the common medium result, was computed on the heap and copied: 0.50 of
#: multiprocessing.Pool's time for 200 frames of 1e5 rows, against 0.35-0.39 with this.)
THRESHOLD = 256 * 1024
#: How much larger than what a task wanted a spare is made. A task's first allocation that does not fit
#: shows only part of what it wants (those after it are not counted), so a spare may grow in several
#: calls. Every spare of a call grows, and copy=False results keep theirs whole: 200 frames of 1e5 rows
#: (247 MB) held 778 MB of /dev/shm with doubling, 492 MB with this, at the same speed.
GROWTH = 1.25
#: The exit code of a worker whose arena could not be made private.
EXIT_CANNOT_FREEZE = 75

#: What this process's arenas did: results shipped where they lay ("in place"), regions frozen, spares grown.
counts: collections.Counter[str] = collections.Counter()


class Arena:
    """The arena of one task over ``mapping``, the worker's refill mapping of the spare ``fd``."""

    def __init__(self, mapping: RefillMapping, fd: int) -> None:
        assert mapping.address is not None, "an arena needs an open mapping"
        self.mapping = mapping
        self.address: int = mapping.address
        self.length = mapping.length
        self.head = HEAD
        self.fd = fd
        self._out = _posix.ArenaOut()  # the region's id, once opened
        self._settled = False
        self.frozen = False  # the region owns the mapping now: it is no refill mapping any more
        self.wanted = 0  # what the task's large arrays wanted at once, if more than there was
        self.peak = 0  # the most of the mapping the task's large arrays took or wanted at once, HEAD included

    @staticmethod
    def large_enough(length: int) -> bool:
        """Whether a mapping of ``length`` bytes can hold an arena (the head and one large allocation)."""
        return length >= HEAD + THRESHOLD

    @staticmethod
    def fits(mapping: RefillMapping | None, fd: int) -> bool:
        """Whether an arena can be opened over ``mapping``: large enough, and all of it inside the object."""
        return (
            mapping is not None
            and mapping.address is not None
            and Arena.large_enough(mapping.length)
            and os.fstat(fd).st_size >= mapping.length  # else a write past the object's end: SIGBUS
        )

    @contextlib.contextmanager
    def allocating(self) -> Iterator[bool]:
        """numpy's large allocations in this thread come from the arena inside the block. Yields whether
        one could be opened (else everything comes from the heap, as without it)."""
        try:
            try:
                _posix.arena_open(self.address, self.length, HEAD, self.fd, THRESHOLD, self._out)
            except OSError:  # every region in use (arrays that tasks kept), or no memory
                yield False
                return
            yield True
        finally:
            _posix.arena_close()

    def _state(self) -> tuple[int, int, int, bool]:
        assert self._out.region >= 0, "the arena was never opened"
        return _posix.arena_state(self._out.region)

    def untouched(self) -> bool:
        """Whether no array the task allocated here lives, and no fork came."""
        _, live_arrays, _, spoiled = self._state()
        return not live_arrays and not spoiled

    def spoiled(self) -> bool:
        """Whether a fork froze the region: the object does not hold what the task wrote since."""
        return self._state()[3]

    def holds(self, address: int, nbytes: int) -> bool:
        """Whether ``nbytes`` at ``address`` lie in one live array allocation here, from a page boundary."""
        return _posix.arena_holds(self._out.region, address, nbytes)

    def place(self, nbytes: int) -> int | None:
        """Offset in the mapping of ``nbytes`` of free space for a copy; None if there is none."""
        return _posix.arena_place(self._out.region, nbytes)

    def settle(self) -> None:
        """The task's answer is ready: release the region, or freeze what lives in it (see the module).

        Call it once the worker let go of the result. Idempotent (the core's settle is too: an
        interrupt between it and the end of this method is harmless).
        """
        region = self._out.region
        if region < 0 or self._settled:
            return
        wanted = _posix.arena_state(region)[2]
        try:
            frozen = _posix.arena_settle(region)
        except OSError as exc:  # its arrays would write into an object the parent reads or reuses
            print(f"shmalloc: a worker could not make its task's arrays private ({exc}); it exits", file=sys.stderr)
            _ownership.unlink_owned()  # as a worker that exits otherwise: its ShmArrays' names go with it
            os._exit(EXIT_CANNOT_FREEZE)
        self.peak = HEAD + wanted if wanted else 0
        if wanted > self.length - HEAD:
            self.wanted = wanted
        if frozen and not self.frozen:
            counts["frozen"] += 1
        self.frozen = frozen
        self._settled = True

    def grow_spare(self, result_size: int) -> int | None:
        """If the task wanted more than the arena held: make the spare large enough for it (every page
        allocated: a full /dev/shm is then an error here, not a SIGBUS later), and return its new size.
        ``result_size``: the size of the segment its result took in the spare (0: none, it went through
        the pipe). Call it before the answer leaves: once the parent has it, another worker may get the
        spare."""
        if not self.wanted:
            return None
        current = os.fstat(self.fd).st_size
        # Never more than OVERSIZE times the result (a copy=False result keeps its spare whole: a small
        # one computed from large temporaries must not hold them; up to that, the result itself and the
        # smaller temporaries fit), nor than a quarter of what /dev/shm has free (the pools' default
        # share for spares), and not at all if then the task would still not fit: that would take space
        # for nothing.
        by_result = round_up_to_page(OVERSIZE * result_size)
        room = current + (shm_free_bytes() or 0) // 4
        size = min(round_up_to_page(int(HEAD + self.wanted * GROWTH)), by_result, room - room % _PAGE)
        if size <= current or (size < HEAD + self.wanted and size < by_result):
            return None
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError:
            return None  # /dev/shm is full: the next tasks use the arena there is
        counts["grown"] += 1
        return size
