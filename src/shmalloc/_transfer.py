"""The one write path and the one read path of every transfer through a segment.

Writing: :func:`write_named` places an object in a new named segment
(copy2shm, map's workers), :func:`write_held` in a recycled object the
caller holds open (Pool's workers). Reading: :func:`open_named` (opens and
unlinks a name) or :func:`open_held` (a descriptor the caller keeps) give a
:class:`Segment`, and :func:`read` rebuilds the object in it. The layout of
a segment is :mod:`._format`'s.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from . import _adopt, _format, _names, _posix, _space, codecs
from ._handle import ShmObj
from ._releaser import release_fd
from ._shared import SPARE_LABEL, RefillMapping
from .errors import CorruptHandleError

# ---------------------------------------------------------------------------
# Writing


def write_named(obj: Any, name: str, *, overwrite: bool = False, copy: bool = True) -> ShmObj:
    """Place ``obj`` in a new segment ``name`` (O_EXCL, mode 0600); return its handle.

    ``overwrite`` first removes an object of that name; ``copy`` is the
    handle's default for reading. A full /dev/shm gives ShmError ENOSPC, after
    this process's spares were given back and the write tried once more. On
    any failure the segment is unlinked.
    """
    _posix.check_supported()
    encoded = codecs.encode(obj)
    token = os.urandom(_format.TOKEN_BYTES)  # what secrets.token_bytes calls, minus its layers
    recipe = {"type": encoded.type, "length": encoded.length, "attributes": encoded.attributes}
    size = _space.retry_on_enospc(_create, name, token, recipe, encoded.buffers, overwrite)
    return ShmObj(name, encoded.type, encoded.length, size, encoded.attributes, copy, token)


def write_held(obj: Any, fd: int, mapping: RefillMapping | None = None) -> ShmObj:
    """Place ``obj`` at the start of the recycled object ``fd``; return its handle (labelled SPARE_LABEL).

    Through ``mapping`` (a refill mapping of ``fd``) if the segment fits in
    it and the object is at least the segment's size, else with pwrite. The
    object is not shrunk here (its warm pages stay for later fills): it may
    be larger than the handle's size. A full
    /dev/shm gives ShmError ENOSPC, with no retry: the caller falls back.
    """
    _posix.check_supported()
    encoded = codecs.encode(obj)
    token = os.urandom(_format.TOKEN_BYTES)
    recipe = {"type": encoded.type, "length": encoded.length, "attributes": encoded.attributes}
    plan = _format.plan_segment(token, recipe, encoded.buffers)
    if mapping is None or not _fill_through(mapping, fd, plan, encoded.buffers):
        _fill(fd, SPARE_LABEL, plan, encoded.buffers)
    return ShmObj(SPARE_LABEL, encoded.type, encoded.length, plan.size, encoded.attributes, True, token)


class Arena(Protocol):
    """Where a Pool worker's task allocated its large arrays: a shared mapping of the first ``length``
    bytes of the task's spare (see :mod:`shmalloc.parallel._arena`), its first ``head`` bytes kept free
    for the header and recipe."""

    address: int
    length: int
    head: int

    def holds(self, address: int, nbytes: int) -> bool: ...

    def place(self, nbytes: int) -> int | None: ...


def write_in_place(obj: Any, fd: int, arena: Arena) -> ShmObj | None:
    """Make ``obj`` a segment of the spare ``fd`` where it lies: its buffers that are arrays the task
    allocated in ``arena`` stay where they are, the others are copied into the arena's free space, or
    past the mapping's end (the object grows), and the header and recipe go at the start. Returns its
    handle (labelled SPARE_LABEL), or None if the header and recipe do not fit (then none was written).
    A full /dev/shm gives ShmError ENOSPC."""
    _posix.check_supported()
    encoded = codecs.encode(obj)
    offsets: list[int | None] = []  # in the object; None for an empty buffer
    taken: list[tuple[int, int]] = []  # the pages of each buffer placed: (offset, length)
    beyond = max(arena.length, _format.round_up_to_page(os.fstat(fd).st_size))  # where the object grows
    for buf in encoded.buffers:
        nbytes = buf.nbytes
        if not nbytes:
            offsets.append(None)
            continue
        address = _posix.data_address(buf)
        at, span = address - arena.address, _format.round_up_to_page(nbytes)
        if not arena.holds(address, nbytes) or any(start < at + span and at < start + n for start, n in taken):
            placed = arena.place(nbytes)
            if placed is not None:
                at = placed
                _posix.copy(arena.address + at, address, nbytes, 1)
            else:
                at, beyond = beyond, beyond + span
                _posix.fallocate(fd, SPARE_LABEL, beyond)  # every page there, padding included
                _posix.write(fd, SPARE_LABEL, address, nbytes, at)
        taken.append((at, span))
        offsets.append(at)
    end = max((start + n for start, n in taken), default=arena.head)  # empty buffers go at the end
    relative = [(end if at is None else at) - arena.head for at in offsets]
    token = os.urandom(_format.TOKEN_BYTES)
    recipe = {"type": encoded.type, "length": encoded.length, "attributes": encoded.attributes}
    plan = _format.plan_in_place(token, recipe, encoded.buffers, relative, arena.head)
    if plan is None:
        return None
    _posix.write_bytes(fd, SPARE_LABEL, plan.head, 0)
    return ShmObj(SPARE_LABEL, encoded.type, encoded.length, plan.size, encoded.attributes, True, token)


def _create(name: str, token: bytes, recipe: dict, buffers: Sequence[np.ndarray], overwrite: bool) -> int:
    """Create segment ``name`` holding ``recipe`` and ``buffers``; return its size (unlinked on any failure)."""
    if overwrite:
        try:
            _posix.unlink(name)
        except FileNotFoundError:
            pass
    fd = _posix.create(name)
    try:
        plan = _format.plan_segment(token, recipe, buffers)
        _fill(fd, name, plan, buffers)
        return plan.size
    except BaseException:
        _posix.unlink_quietly(name)
        raise
    finally:
        _posix.close(fd)


# The padding every buffer gets after it, read from one page of zeros kept for the process's life.
_ZERO_PAGE = np.zeros(_format.PAGE, np.uint8)
_ZERO_PAGE.flags.writeable = False


def _fill(fd: int, label: str, plan: _format.Plan, buffers: Sequence[np.ndarray]) -> None:
    """Write the segment of ``plan`` at the start of ``fd`` with pwritev (the GIL is released), padding
    included: the head, then each buffer and its padding, one after the other."""
    zeros = _posix.data_address(_ZERO_PAGE)
    parts = [(_posix.bytes_address(plan.head), len(plan.head))]
    for buf in buffers:
        nbytes = buf.nbytes
        parts.append((_posix.data_address(buf), nbytes))
        parts.append((zeros, _format.round_up_to_page(nbytes) - nbytes))
    _posix.write_parts(fd, label, parts, 0)


def _fill_through(mapping: RefillMapping, fd: int, plan: _format.Plan, buffers: Sequence[np.ndarray]) -> bool:
    """Like :func:`_fill`, the buffers through ``mapping``; False (nothing written) if the segment does not fit."""
    address = mapping.address
    if address is None or plan.size > mapping.length or os.fstat(fd).st_size < plan.size:
        return False  # never write through the mapping past the end of the object (SIGBUS): it may have been cut
    _posix.write_bytes(fd, SPARE_LABEL, plan.head, 0)
    zeros = _posix.data_address(_ZERO_PAGE)
    base = address + plan.data_offset
    for buf, layout in zip(buffers, plan.layouts, strict=True):
        nbytes = buf.nbytes
        if nbytes:
            _posix.copy(base + layout.offset, _posix.data_address(buf), nbytes, 1)
        pad = _format.round_up_to_page(nbytes) - nbytes
        if pad:
            _posix.copy(base + layout.offset + nbytes, zeros, pad, 1)
    return True


# ---------------------------------------------------------------------------
# Reading

#: allocate_from_shm reads a smaller segment into regular memory even with copy=False: then pread takes
#: less time than a mapping, its set-up, a fault per page read and its removal (measured in one
#: process, every page read: 4 KiB 8 against 29 µs, 1 MiB 0.33 against 0.39 ms, the same at about
#: 2 MiB). Pools map whatever the size: their parent's time is what all their workers wait for, and a
#: mapping takes least of it (200 results of 390 KB: 131 ms mapped against 155 ms read).
MAP_FROM = 1 << 20


class Segment:
    """A segment open for reading: its descriptor, name (or label) and size. A context manager.

    ``owns_fd``: :meth:`close` releases the descriptor; else the caller keeps it (and may recycle it).
    """

    def __init__(self, fd: int, name: str, size: int, *, owns_fd: bool) -> None:
        self.fd, self.name, self.size, self.owns_fd = fd, name, size, owns_fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self.owns_fd:
                release_fd(fd, self.size)

    def reopen_writable(self) -> int:
        """A read-write descriptor of this (unlinked) object, or -1 where that is not possible.

        Through /proc/self/fd (Linux): the same object, whatever its name became.
        """
        try:
            return os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return -1

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_named(name: str, size: int) -> Segment:
    """Open segment ``name`` of exactly ``size`` bytes for reading, and unlink the name.

    The name is unlinked right after trying to open it, whatever happens next
    (not if another user owns the object), so each handle is consumed once.
    """
    return Segment(_posix.open_checked(name, size, unlink=True), name, size, owns_fd=True)


def read_named(handle: ShmObj, copy: bool, *, read_small: bool = False) -> Any:
    """Open the segment ``handle`` names, unlink the name and rebuild the object (see :func:`read`);
    the handle's name, size and token are checked first (ValueError, TypeError, CorruptHandleError).
    ``read_small``: a segment of less than :data:`MAP_FROM` bytes is read even with ``copy`` False."""
    name = _names.validate(handle.name)
    if not isinstance(handle.size, int) or isinstance(handle.size, bool) or handle.size < 0:
        raise CorruptHandleError(f"{name}: size must be a non-negative int, not {handle.size!r}")
    if not isinstance(handle.token, bytes):
        raise CorruptHandleError(f"{name}: damaged token")
    if read_small and handle.size < MAP_FROM:
        copy = True  # takes less time than mapping it
    with open_named(name, handle.size) as segment:
        return read(segment, handle, copy).value


def open_held(fd: int, label: str, size: int) -> Segment:
    """A segment at the start of the object the caller holds open as ``fd`` (recycled objects only grow:
    it holds at least ``size`` bytes). Closing the segment leaves ``fd`` open."""
    _posix.check_supported()
    _posix.check_object(fd, label, size, exact=False)
    return Segment(fd, label, size, owns_fd=False)


class Read(NamedTuple):
    """What :func:`read` rebuilt from a segment."""

    value: Any
    owners: list[np.ndarray]  # the arrays that own mappings of the segment (none when copied)
    data_offset: int
    layouts: list[_format.BufferLayout]

    @property
    def parts(self) -> list[tuple[int, int]]:
        """(offset, length): the header and recipe's pages, and each buffer's (a Pool's worker may leave gaps)."""
        spans = _format.buffer_spans(self.layouts)
        return [(0, self.data_offset)] + [(self.data_offset + offset, length) for offset, length in spans]


def read(segment: Segment, handle: ShmObj, copy: bool) -> Read:
    """Rebuild the object ``handle`` describes from ``segment``; also say which arrays own mappings of it
    (none when copied) and which pages of it the object takes (a Pool's worker may leave gaps).

    The header and recipe are checked against the handle before anything is
    mapped. ``copy`` False maps privately (zero-copy) where the platform
    allows it, and copies elsewhere.
    """
    if not isinstance(handle.token, bytes):
        raise CorruptHandleError(f"{segment.name}: damaged token")
    if segment.size < _format.HEADER_SIZE:
        raise CorruptHandleError(f"{segment.name}: {segment.size} bytes cannot hold a shmalloc segment")
    # The header and, mostly, the whole recipe in one read (the data starts a page or more further on).
    head = _posix.read_bytes(segment.fd, segment.name, min(segment.size, _format.PAGE), 0)
    recipe_len, data_offset = _format.check_header(segment.name, head, handle.token, segment.size)
    stored: bytearray | memoryview
    if _format.HEADER_SIZE + recipe_len <= len(head):
        stored = memoryview(head)[_format.HEADER_SIZE : _format.HEADER_SIZE + recipe_len]
    else:
        stored = _posix.read_bytes(segment.fd, segment.name, recipe_len, _format.HEADER_SIZE)
    recipe, layouts = _format.load_recipe(segment.name, stored, segment.size - data_offset)
    _format.check_handle_matches(handle, recipe)
    zero_copy = not copy and _posix.ZERO_COPY
    buffers = _adopt.arrays(segment.fd, segment.name, data_offset, segment.size - data_offset, layouts, not zero_copy)
    owners = [b for b in buffers if b.nbytes] if zero_copy else []
    return Read(codecs.decode(recipe["attributes"], buffers), owners, data_offset, layouts)
