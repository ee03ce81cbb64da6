"""Shared mappings: objects mapped MAP_SHARED and written through the mapping.

* :class:`SharedMapping` (for ShmArray): one named object that several
  processes map and write at once. It carries no header: the object is the
  array's memory. numpy sees it through ``__array_interface__``, and it
  unmaps itself when garbage collected.
* :class:`RefillMapping` (for shmalloc.Pool): a worker's mapping of a
  recycled object (an unlinked object held open by its descriptor) that it
  fills again. Its pages were faulted in by an earlier transfer, so writing
  through it is a plain memcpy instead of ~4 us per fresh page.
"""
from __future__ import annotations

import os
import weakref

from . import _posix

#: The label of recycled objects (spares) in error messages: they have no name.
SPARE_LABEL = "/shmalloc_spare"


class SharedMapping:
    """A writable MAP_SHARED mapping of a whole shared memory object.

    ``np.asarray(mapping)`` is a uint8 array over all of it whose ``base`` is
    the mapping, so arrays built on it keep it, and the memory, alive. The
    mapping is unmapped when this object is garbage collected (not at
    interpreter exit, when arrays may still be in use: the OS unmaps then).
    """

    def __init__(self, name: str, fd: int, size: int, inode: int) -> None:
        self.address = _posix.map_shared(fd, name, size)
        self.name = name
        self.size = size
        self.inode = inode
        self.__array_interface__ = {
            "version": 3,
            "shape": (size,),
            "typestr": "|u1",
            "data": (self.address, False),
        }
        finalizer = weakref.finalize(self, _posix.unmap, self.address, size)
        finalizer.atexit = False


def create_shared(name: str, size: int) -> SharedMapping:
    """Create shared memory object ``name`` of ``size`` bytes (at least 1) and map it shared.

    The object is created with O_EXCL and mode 0600, and every page is
    reserved with posix_fallocate, so a full /dev/shm gives ShmError ENOSPC
    here rather than SIGBUS on a later write. On failure nothing is left.
    """
    _posix.check_supported()
    if size < 1:
        raise ValueError(f"a shared segment needs at least 1 byte, not {size}")
    fd = _posix.create(name)
    try:
        _posix.fallocate(fd, name, size)
        return SharedMapping(name, fd, size, os.fstat(fd).st_ino)
    except BaseException:
        _posix.unlink_quietly(name)
        raise
    finally:
        _posix.close(fd)


def open_shared(name: str, size: int, inode: int | None = None) -> SharedMapping:
    """Map an existing shared object made by :func:`create_shared`, after checking it.

    Raises ShmError (EPERM) if another user owns it, EINVAL if it is not a
    regular object, and CorruptHandleError if its size (or inode, when
    given) differs from what the caller expects: it was replaced or resized.
    """
    fd = _posix.open_checked(name, size, writable=True, inode=inode)
    try:
        return SharedMapping(name, fd, size, os.fstat(fd).st_ino if inode is None else inode)
    finally:
        _posix.close(fd)


class RefillMapping:
    """A worker's writable shared mapping of the first ``length`` bytes of a recycled object, the pages
    of the first ``populated`` bytes (just written) in its page tables at once.

    The rest was written or allocated before (the parent allocates a spare's
    freed pages again before a task gets it), so no page a task writes
    through the mapping is a hole a full /dev/shm could refuse. A failed
    write may cut the object back below ``length``: writes through the
    mapping check the object's size first (``_transfer._fill_through``),
    which is what keeps them from a SIGBUS. Refilling through it is a plain
    memcpy into mapped pages, ~2.5x faster than pwrite here. ``address`` is
    None once closed.
    """

    def __init__(self, fd: int, length: int, populated: int) -> None:
        self.address: int | None = None  # for __del__, should this fail
        self.length = length
        _posix.check_supported()
        if length <= 0 or os.fstat(fd).st_size < length:
            raise ValueError("a refill mapping must cover written bytes of the object")
        self.address = _posix.map_populated(fd, SPARE_LABEL, length, populated)

    def close(self) -> None:
        if self.address is not None:
            address, self.address = self.address, None
            _posix.unmap(address, self.length)

    def detach(self) -> None:
        """Forget the mapping without unmapping it (its range belongs to a frozen arena now)."""
        self.address = None

    def __del__(self) -> None:
        self.close()
