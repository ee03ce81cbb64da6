"""POSIX shared memory calls: the only module that touches the compiled core.

Each wrapper turns a failure into :class:`~shmalloc.ShmError` carrying the
errno, its message and the segment's name. Raw cffi objects never leave this
module: addresses cross it as ints, and the out-parameters that the core
fills before it returns (so that an interrupt right after a call cannot lose
a mapping) live in a :class:`MapOut`.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NO_SUCH_SEGMENT, CorruptHandleError, ShmError

try:
    from ._native import ffi, lib

    _NATIVE_MISSING: ImportError | None = None
except ImportError as exc:  # Windows (never built), or a broken or missing build
    ffi = lib = None
    _NATIVE_MISSING = exc

# ---------------------------------------------------------------------------
# Platform facts

POSIX_PLATFORM = sys.platform != "win32"
SUPPORTED = lib is not None and POSIX_PLATFORM
ZERO_COPY = sys.platform.startswith("linux") or sys.platform.startswith("freebsd")
#: Where Linux shows POSIX shared memory objects as files.
SHM_DIR = Path("/dev/shm")


def usable_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_handler_ready = False


def check_supported() -> None:
    """Raise unless shared memory works here: NotImplementedError off POSIX, ImportError without the core."""
    if not POSIX_PLATFORM:
        raise NotImplementedError(f"shmalloc: POSIX shared memory is not supported on {sys.platform}")
    if lib is None:
        raise _missing_core_error()
    if not _handler_ready:
        _init_handler()


def _missing_core_error() -> ImportError:
    """The error for a POSIX platform whose compiled core cannot be imported: what is wrong, and the fix."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    in_source_tree = os.path.exists(os.path.join(package_dir, "_core", "shmalloc_core.c")) and os.path.exists(
        os.path.join(package_dir, os.pardir, os.pardir, "build_ffi.py")
    )
    hint = (
        "this looks like a source tree, where the core exists only after `pip install -e .`"
        " (run from the project root); or install with `pip install .` and import it from elsewhere"
        if in_source_tree
        else "reinstall shmalloc (`pip install --force-reinstall shmalloc`); building it needs a C compiler"
    )
    error = ImportError(
        f"shmalloc: the compiled core shmalloc._native could not be imported from {package_dir}"
        f" ({_NATIVE_MISSING}); {hint}",
        name="shmalloc._native",
        path=package_dir,
    )
    error.__cause__ = _NATIVE_MISSING
    return error


def _init_handler() -> None:
    global _handler_ready
    if lib.shmalloc_handler_init() < 0:
        raise ImportError("shmalloc: could not initialise numpy's C API in the native core")
    _handler_ready = True


# ---------------------------------------------------------------------------
# Errors


def _raise(name: str, code: int | None = None) -> None:
    code = ffi.errno if code is None else code
    raise ShmError(code, os.strerror(code), name)


def _raise_missing_or(name: str, code: int) -> None:
    """Raise the error of opening or unlinking segment ``name``; a missing one says why that may be."""
    if code == errno.ENOENT:
        raise ShmError(code, NO_SUCH_SEGMENT, name)
    _raise(name, code)


def _raise_map_failure(name: str) -> None:
    """Raise the error of a failed mmap; ENOMEM says that the mapping limit may be the cause, and what to do."""
    code = ffi.errno
    if code != errno.ENOMEM:
        _raise(name, code)
    raise ShmError(code, f"{os.strerror(code)}: {_mapping_limit_hint()}", name)


def _mapping_limit_hint() -> str:
    try:
        with open("/proc/sys/vm/max_map_count") as limit_file:
            limit = limit_file.read().strip()
        with open("/proc/self/maps") as maps:
            in_use = sum(1 for _ in maps)
    except OSError:  # not Linux
        limit, in_use = "unknown", "unknown"  # type: ignore[assignment]
    return (
        f"this process may have reached the limit on memory mappings (vm.max_map_count is {limit};"
        f" the process has {in_use} mappings, {live_mappings()} of them owned by zero-copy shmalloc arrays,"
        " one each). Consume with copy=True, drop zero-copy arrays no longer needed, or raise the limit"
        " (sysctl -w vm.max_map_count=...)"
    )


# ---------------------------------------------------------------------------
# Names and descriptors


def create(name: str) -> int:
    """Create shared memory object ``name`` (O_EXCL, mode 0600); return its read-write descriptor."""
    check_supported()
    fd = lib.shmalloc_open(name.encode(), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if fd < 0:
        _raise(name)
    return fd


def open_checked(
    name: str, size: int, *, writable: bool = False, exact: bool = True, inode: int | None = None, unlink: bool = False
) -> int:
    """Open shared memory object ``name`` and check it (see :func:`check_object`); return its descriptor.

    ``unlink``: remove the name right after trying to open it, whatever happens
    next (also when the open fails), but never another user's object.
    """
    check_supported()
    encoded = name.encode()
    # O_NONBLOCK: a FIFO planted under the name must not block the open (the check refuses it).
    fd = lib.shmalloc_open(encoded, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK, 0)
    if fd < 0:
        code = ffi.errno
        if unlink:
            lib.shmalloc_unlink(encoded)
        _raise_missing_or(name, code)
    try:
        st = os.fstat(fd)
        _check_owner(st, name)  # never remove or read another user's object on the strength of a handle
        if unlink:
            lib.shmalloc_unlink(encoded)
        _check_kind_and_size(st, name, size, exact, inode)
    except BaseException:
        lib.shmalloc_close(fd)
        raise
    return fd


def check_object(fd: int, name: str, size: int, *, exact: bool = True, inode: int | None = None) -> None:
    """Check the object open as ``fd``: owned by this user (else ShmError EPERM), a regular object (else
    EINVAL), of ``size`` bytes (``exact``) or at least that many, and of ``inode`` if given (else
    CorruptHandleError)."""
    st = os.fstat(fd)
    _check_owner(st, name)
    _check_kind_and_size(st, name, size, exact, inode)


def _check_owner(st: os.stat_result, name: str) -> None:
    if st.st_uid != os.geteuid():
        raise ShmError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user ({os.geteuid()})", name)


def _check_kind_and_size(st: os.stat_result, name: str, size: int, exact: bool, inode: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ShmError(errno.EINVAL, "not a regular shared memory object", name)
    wrong_size = st.st_size != size if exact else st.st_size < size
    if inode is None and wrong_size:  # a handle's segment
        raise CorruptHandleError(
            f"{name}: the shared memory object holds {st.st_size} bytes, the handle says {size}"
            " (truncated, resized or replaced)"
        )
    if wrong_size or (inode is not None and st.st_ino != inode):  # a ShmArray's segment
        raise CorruptHandleError(
            f"{name}: the shared memory object is not the one expected"
            f" ({st.st_size} bytes, inode {st.st_ino}; expected {size} bytes, inode {inode})"
        )


def unlink(name: str) -> None:
    """Remove the name of a shared memory object (raises ShmError; ENOENT says a handle is consumed once)."""
    check_supported()
    if lib.shmalloc_unlink(name.encode()) < 0:
        _raise_missing_or(name, ffi.errno)


def unlink_quietly(name: str) -> None:
    """Remove the name of an object this process just failed to fill; errors are ignored (nothing to add)."""
    lib.shmalloc_unlink(name.encode())


def close(fd: int) -> None:
    """Close a descriptor (the object's pages are freed here if it was the last reference)."""
    lib.shmalloc_close(fd)


def punch(fd: int, name: str, offset: int, length: int) -> None:
    """Free the pages of ``length`` bytes at ``offset``, keeping the object's size (ShmError where it cannot)."""
    if lib.shmalloc_punch(fd, offset, length) < 0:
        _raise(name)


def punch_parts(fd: int, name: str, parts: Sequence[tuple[int, int]]) -> None:
    """:func:`punch` each (offset, length) of ``parts``; ShmError at the first that cannot be."""
    for offset, length in parts:
        punch(fd, name, offset, length)


def fallocate(fd: int, name: str, size: int) -> None:
    """Reserve every page of the first ``size`` bytes (a full /dev/shm: ShmError ENOSPC now, not SIGBUS later)."""
    if lib.shmalloc_fallocate(fd, size) < 0:
        _raise(name)


# ---------------------------------------------------------------------------
# Bytes


def data_address(array: np.ndarray) -> int:
    """The address of an array's first byte."""
    try:  # a C-contiguous array (nearly every one): 3x faster than building __array_interface__
        return int(ffi.cast("uintptr_t", ffi.from_buffer(array)))
    except (ValueError, TypeError, BufferError):
        return array.__array_interface__["data"][0]


def bytes_address(data: bytes | bytearray) -> int:
    """The address of a bytes object's first byte (valid while it lives and, a bytearray, is not resized)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(data)))


def write(fd: int, name: str, address: int, nbytes: int, offset: int) -> None:
    """pwrite ``nbytes`` from ``address`` at ``offset`` (the GIL is released; ENOSPC, never SIGBUS)."""
    if lib.shmalloc_write_all(fd, ffi.cast("void *", address), nbytes, offset) < 0:
        _raise(name)


def write_parts(fd: int, name: str, parts: Sequence[tuple[int, int]], offset: int) -> None:
    """:func:`write` of ``parts`` ((address, length) pairs) one after the other from ``offset``, with as
    few system calls as it takes (pwritev)."""
    addresses = ffi.new("uintptr_t[]", [address for address, _ in parts])
    lengths = ffi.new("size_t[]", [length for _, length in parts])
    if lib.shmalloc_write_parts(fd, addresses, lengths, len(parts), offset) < 0:
        _raise(name)


def write_bytes(fd: int, name: str, data: bytes | bytearray, offset: int) -> None:
    """:func:`write` of a bytes object."""
    write(fd, name, bytes_address(data), len(data), offset)  # ``data`` lives across the call


def read_into(fd: int, name: str, address: int, nbytes: int, offset: int) -> None:
    """pread ``nbytes`` at ``offset`` to ``address`` (the GIL is released; an object cut short gives EIO)."""
    if lib.shmalloc_read_all(fd, ffi.cast("void *", address), nbytes, offset) < 0:
        _raise(name)


def read_bytes(fd: int, name: str, nbytes: int, offset: int) -> bytearray:
    """pread ``nbytes`` at ``offset``."""
    out = bytearray(nbytes)
    if nbytes and lib.shmalloc_read_all(fd, ffi.from_buffer(out), nbytes, offset) < 0:
        _raise(name)
    return out


def copy(destination: int, source: int, nbytes: int, threads: int) -> None:
    """memcpy between addresses, split across ``threads`` threads when large."""
    lib.shmalloc_copy(ffi.cast("void *", destination), ffi.cast("void *", source), nbytes, threads)


# ---------------------------------------------------------------------------
# Mappings


class MapOut:
    """Out-parameters the core fills before it returns: a private mapping's address, and which of its
    ``parts`` an array owns. An interrupt right after a call therefore never loses track of them."""

    __slots__ = ("_mapped", "_owned")

    def __init__(self, parts: int) -> None:
        self._mapped = ffi.new("void **")
        self._owned = ffi.new("int[]", parts)

    @property
    def address(self) -> int:
        """The mapping's address; 0 while there is none."""
        return int(ffi.cast("uintptr_t", self._mapped[0]))

    def owned(self, part: int) -> bool:
        """Whether part ``part`` was handed to an array (which then unmaps it)."""
        return bool(self._owned[part])


def map_private(fd: int, name: str, length: int, offset: int, out: MapOut, *, writable: bool) -> None:
    """Map ``length`` bytes at ``offset`` privately (copy-on-write if ``writable``); the address goes to ``out``."""
    lib.shmalloc_map(fd, length, offset, 1 if writable else 0, out._mapped)
    if out._mapped[0] == ffi.NULL:
        _raise_map_failure(name)


def map_parts(fd: int, name: str, length: int, offset: int, out: MapOut, spans: Sequence[tuple[int, int]]) -> None:
    """As :func:`map_private` (writable), but only ``spans`` ((start, length) relative to the mapping, page
    aligned, sorted, not overlapping) stay mapped: the pages between them are unmapped in the same call."""
    flat = ffi.new("size_t[]", [n for span in spans for n in span] or [0])
    lib.shmalloc_map_parts(fd, length, offset, 1, flat, len(spans), out._mapped)
    if out._mapped[0] == ffi.NULL:
        _raise_map_failure(name)


def map_shared(fd: int, name: str, size: int) -> int:
    """Map the first ``size`` bytes shared and writable; return the address."""
    address = lib.shmalloc_map_shared(fd, size, 0, 1)
    if address == ffi.NULL:
        _raise_map_failure(name)
    return int(ffi.cast("uintptr_t", address))


def map_populated(fd: int, name: str, length: int, populated: int) -> int:
    """Map the first ``length`` bytes shared, the pages of the first ``populated`` (already written) of
    them populated; return the address."""
    address = lib.shmalloc_map_populated(fd, length, populated)
    if address == ffi.NULL:
        _raise_map_failure(name)
    return int(ffi.cast("uintptr_t", address))


def unmap(address: int, length: int) -> None:
    """munmap (a failure leaves the range mapped: nothing to do about it here)."""
    lib.shmalloc_unmap(ffi.cast("void *", address), length)


def adopt(
    name: str, address: int, span: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, out: MapOut, part: int
) -> np.ndarray:
    """An array over the ``span`` mapped bytes at ``address`` that owns them (munmaps them when freed).

    The core makes the array and hands it the mapping in one call with the GIL
    held, so no other Python code on this thread (a signal handler, a
    finaliser, a profile hook) can ever receive the mapping; it marks ``part``
    as owned in ``out`` in that call.
    """
    made: list[Any] = [None]  # the core puts the array here; it and the dtype stay alive across the call
    dims = ffi.new("intptr_t[]", shape)
    if lib.shmalloc_adopt(
        ffi.cast("void *", address), span, _pointer_to(dtype), len(shape), dims, fortran, _pointer_to(made), out._owned + part
    ) < 0:
        code = ffi.errno
        if code == errno.ENOMEM:
            raise MemoryError(f"shmalloc: no memory to hand {name}'s mapping to an array")
        raise ShmError(code, f"numpy could not make a {dtype} array of shape {shape} over the mapping", name)
    return made[0]


def _pointer_to(obj: object) -> Any:
    """The address of a Python object, for the core (cffi has no PyObject type); the caller keeps obj alive."""
    return ffi.cast("void *", id(obj))


def live_mappings() -> int:
    """Number of mappings currently owned by arrays through shmalloc's handler."""
    return int(lib.shmalloc_live_mappings()) if SUPPORTED else 0


def unmap_failures() -> tuple[int, int]:
    """How often freeing an array failed to unmap its mapping (which then stays mapped), and the last errno.

    numpy's free callback may not raise, print or allocate: the core counts instead.
    """
    if not SUPPORTED:
        return 0, 0
    last = ffi.new("int *")
    return int(lib.shmalloc_unmap_failures(last)), int(last[0])


def any_adopted(addresses: Sequence[int]) -> bool:
    """Whether any of these addresses is still a mapping owned by an array."""
    return any(lib.shmalloc_is_adopted(ffi.cast("void *", a)) for a in addresses)


# ---------------------------------------------------------------------------
# The arena (see parallel._arena)

_arena_ready = False


class ArenaOut:
    """The region id the core stores before :func:`arena_open` returns (-1 until then)."""

    __slots__ = ("_region",)

    def __init__(self) -> None:
        self._region = ffi.new("int *", -1)

    @property
    def region(self) -> int:
        return int(self._region[0])


def arena_open(address: int, length: int, head: int, fd: int, threshold: int, out: ArenaOut) -> None:
    """Serve this thread's numpy allocations of at least ``threshold`` bytes from the shared mapping of
    ``length`` bytes at ``address`` (of the object ``fd``), past its first ``head`` bytes; the region's id
    goes to ``out``. OSError if it cannot (EBUSY: an arena is open; ENFILE: every region is in use)."""
    global _arena_ready
    check_supported()
    if not _arena_ready:
        if lib.shmalloc_arena_init() < 0:
            raise OSError(ffi.errno, "could not set up the arena")
        _arena_ready = True
    if lib.shmalloc_arena_open(ffi.cast("void *", address), length, head, fd, threshold, out._region) < 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))


def arena_close() -> None:
    """Stop serving allocations from the open arena (if any); numpy's handler of this context is restored."""
    lib.shmalloc_arena_close()


def arena_state(region: int) -> tuple[int, int, int, bool]:
    """Bytes in use in ``region`` (live arrays and placed copies), live arrays, the most its large
    allocations and placed copies took or asked for at once, and whether a fork spoiled it."""
    live_bytes, live_arrays, wanted, spoiled = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("int *")
    lib.shmalloc_arena_state(region, live_bytes, live_arrays, wanted, spoiled)
    return int(live_bytes[0]), int(live_arrays[0]), int(wanted[0]), bool(spoiled[0])


def arena_place(region: int, nbytes: int) -> int | None:
    """Offset in ``region``'s mapping of ``nbytes`` of free space (page aligned) for a copy; None if none."""
    offset = lib.shmalloc_arena_place(region, nbytes)
    return None if offset < 0 else int(offset)


def arena_holds(region: int, address: int, nbytes: int) -> bool:
    """Whether ``nbytes`` at ``address`` lie in one live array allocation of ``region``, from a page boundary."""
    return bool(lib.shmalloc_arena_holds(region, ffi.cast("void *", address), nbytes))


def arena_settle(region: int) -> bool:
    """Release ``region`` (no array lives in it, no fork came: its mapping stays the caller's) and return
    False, or freeze it (from then on it owns the mapping) and return True. Idempotent. OSError if it
    cannot be frozen (then it is still shared)."""
    outcome = lib.shmalloc_arena_settle(region)
    if outcome < 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
    return outcome == 2
