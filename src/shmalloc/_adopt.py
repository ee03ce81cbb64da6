"""A segment's buffers as arrays: copies in regular memory, or arrays that own their part of one private mapping.

Zero-copy arrays own their mapping through shmalloc's numpy memory handler
(NEP 49) and unmap it when freed. Whatever interrupts the hand-over (Ctrl-C
may arrive after any C call returns), every part of the mapping is unmapped
exactly once: by its array if it got one, else here.
"""
from __future__ import annotations

import errno

import numpy as np
from numpy._core.multiarray import get_handler_name

from . import _posix
from ._format import BufferLayout, buffer_spans, round_up_to_page
from .errors import ShmError

#: Large copies use the usable cores, at most this many.
MAX_COPY_THREADS = 4
#: A data part of at most this many bytes is copied with pread, straight into the new arrays: for
#: small ones that takes less time than mapping it and copying from the mapping (measured: the
#: same at 8 MiB, where the copy's threads start to pay).
READ_LIMIT = 4 << 20


def arrays(fd: int, name: str, data_offset: int, data_size: int, layouts: list[BufferLayout], copy: bool) -> list[np.ndarray]:
    """The buffers of the data part (``data_size`` bytes at ``data_offset`` of ``fd``) as arrays.

    ``copy``: copies in regular memory, and no mapping remains at return;
    else arrays owning their part of one private (copy-on-write) mapping.
    """
    if not layouts or data_size == 0:
        return [_empty(layout) for layout in layouts]
    if copy and data_size <= READ_LIMIT:
        return [_read(fd, name, data_offset, layout) for layout in layouts]
    # The core stores the mapping's address, and each part's hand-over to its array, in `out`
    # before returning, so an interrupt right after any call cannot lose track of them.
    out = _posix.MapOut(len(layouts))
    try:
        if copy:
            _posix.map_private(fd, name, data_size, data_offset, out, writable=False)
            return [_copied(layout, out.address) for layout in layouts]
        # Only the buffers' pages stay mapped: a Pool's worker may leave space between them.
        _posix.map_parts(fd, name, data_size, data_offset, out, buffer_spans(layouts))
        return _adopt_all(name, out.address, layouts, out)
    except BaseException:
        if out.address and not copy:
            _unmap_unowned(out.address, layouts, out)
        raise
    finally:
        if out.address and copy:
            _posix.unmap(out.address, data_size)  # promised: no mapping remains at return


def _empty(layout: BufferLayout) -> np.ndarray:
    return np.empty(layout.shape, layout.dtype, order="F" if layout.fortran else "C")


def _read(fd: int, name: str, data_offset: int, layout: BufferLayout) -> np.ndarray:
    out = _empty(layout)
    if layout.nbytes:
        _posix.read_into(fd, name, _posix.data_address(out), layout.nbytes, data_offset + layout.offset)
    return out


def _copied(layout: BufferLayout, base: int) -> np.ndarray:
    out = _empty(layout)
    if layout.nbytes:
        threads = min(MAX_COPY_THREADS, _posix.usable_cpus())
        _posix.copy(_posix.data_address(out), base + layout.offset, layout.nbytes, threads)
    return out


def _adopt_all(name: str, base: int, layouts: list[BufferLayout], out: _posix.MapOut) -> list[np.ndarray]:
    """Hand each page-aligned part of one private mapping (at ``base``) to its own array.

    ``out`` records part ``i`` as owned once it belongs to its array. On an
    exception the caller unmaps the other parts (:func:`_unmap_unowned`).
    """
    arrays: list[np.ndarray] = []
    for i, layout in enumerate(layouts):
        span = round_up_to_page(layout.nbytes)
        arrays.append(_adopt_part(name, base + layout.offset, span, layout, out, i) if span else _empty(layout))
    return arrays


def _unmap_unowned(base: int, layouts: list[BufferLayout], out: _posix.MapOut) -> None:
    """Unmap the parts of a mapping that were never handed to an array.

    A part that was handed over is the array's to unmap, even if an interrupt dropped
    the array before it reached a list (then it is already unmapped, and its
    addresses may already hold another mapping): the core's flags, set in the call
    that handed it over, say which parts these are.
    """
    for i, layout in enumerate(layouts):
        span = round_up_to_page(layout.nbytes)
        if span and not out.owned(i):
            _posix.unmap(base + layout.offset, span)


def _adopt_part(name: str, address: int, span: int, layout: BufferLayout, out: _posix.MapOut, part: int) -> np.ndarray:
    """An array over the ``span`` mapped bytes at ``address`` that owns them (see :func:`_posix.adopt`).

    The result is checked all the same: wrong data is never returned.
    """
    array = _posix.adopt(name, address, span, layout.dtype, layout.shape, layout.fortran, out, part)
    if _posix.data_address(array) != address or get_handler_name(array) != "shmalloc" or not array.flags.owndata:
        # never seen: the array owns the mapping all the same, and unmaps it when collected
        raise ShmError(errno.EFAULT, "the new array does not own the mapping it was made over", name)
    return array
