"""Segments: create, fill, open, check, map and unlink POSIX shared memory objects.

The only module that touches the compiled core. A segment holds a header, a
pickled *recipe* (what the codec needs to rebuild the object, and where each
buffer lies) and the buffers, each starting on a page boundary so that each
zero-copy array can own, and unmap, its own part:

    [header | recipe | pad] [buffer 0 | pad] [buffer 1 | pad] ...

Every byte up to the object's size is written (padding included), so no page
of the object is a hole that a full /dev/shm could refuse to fault in later.
"""
from __future__ import annotations

import collections
import errno
import os
import pickle
import stat
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numpy._core.multiarray import get_handler_name

from .errors import NO_SUCH_SEGMENT, CorruptHandleError, ShmError
from ._threads import wait_until_gone

try:
    from ._native import ffi, lib

    _NATIVE_MISSING: ImportError | None = None
except ImportError as exc:  # Windows (never built), or a broken or missing build
    ffi = lib = None
    _NATIVE_MISSING = exc

MAGIC = b"SHMALLOC"
VERSION = 1
TOKEN_BYTES = 16
_HEADER = struct.Struct("<8sII16sQQQ")  # magic, version, reserved, token, recipe, data offset, size
HEADER_SIZE = 64
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MAX_RECIPE = 1 << 30
POSIX_PLATFORM = sys.platform != "win32"
SUPPORTED = lib is not None and POSIX_PLATFORM
ZERO_COPY = sys.platform.startswith("linux") or sys.platform.startswith("freebsd")


def copy_threads() -> int:
    """Threads used for large copies: the usable cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# Dropping the last reference to a large unlinked object frees its pages, which
# takes ~50 ms per 400 MB here; a background thread does that off the caller's path
# (copy=True of 400 MB: ~100 ms with it, ~160 ms without).
RELEASE_LATER_BYTES = 16 << 20
# How long a fork waits for the thread to finish the close it is in (~1 s per 8 GB).
STOP_TIMEOUT = 60.0
# How long a fork made by a signal handler inside close_later's Thread.start() waits for
# a thread that is not alive yet: if the OS thread exists it runs at once (we release the
# lock and the GIL); if the handler came before the OS thread was created, it never will.
START_GRACE = 1.0


class _Releaser:
    """A daemon thread that closes the descriptors of consumed objects, never alive at a fork.

    A library must not leave its user's process multi-threaded at a fork (Python
    3.12 warns, and a child of a multi-threaded process may deadlock). So, before
    every ``os.fork``, the thread finishes the close it is in and exits, and the
    forking thread closes what is still queued: the child inherits no descriptor
    waiting to be closed, and no thread of ours. The thread starts again at the
    next :meth:`close_later`.
    """

    def __init__(self) -> None:
        # Reentrant: a signal handler may fork while its thread is inside close_later.
        self._changed = threading.Condition(threading.RLock())
        self._queue: collections.deque[int] = collections.deque()
        self._closing = 0  # descriptors the thread took and is closing
        self._thread: threading.Thread | None = None
        self._stop = False  # a fork is under way: the thread exits and no new one starts
        # True only while the lock's holder is inside Thread.start() of self._thread; seen
        # by _before_fork only when that holder is the forking thread (a signal handler).
        self._starting = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=self._before_fork,
                after_in_parent=self._after_fork_in_parent,
                after_in_child=self._after_fork_in_child,
            )

    def close_later(self, fd: int) -> None:
        """Close ``fd`` on the background thread."""
        with self._changed:
            self._queue.append(fd)
            if self._thread is None and not self._stop:  # _stop: _before_fork closes the queue
                self._starting = True  # before _thread is set: see _before_fork
                self._thread = threading.Thread(target=self._run, name="shmalloc-release", daemon=True)
                try:
                    self._thread.start()
                except RuntimeError:
                    # A fork made by a signal handler inside start() may leave this Thread
                    # unstartable in the child (Python 3.13: "thread already started").
                    self._thread = None
                    self._close_queued()  # here, then: slower, never lost
                finally:
                    self._starting = False
            self._changed.notify_all()

    def wait(self) -> None:
        """Block until every submitted release has run."""
        with self._changed:
            while self._queue or self._closing:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._stop:
                    self._changed.wait()
                if self._stop:
                    self._thread = None
                    self._changed.notify_all()  # for _before_fork
                    return
                fd = self._queue.popleft()
                self._closing += 1
            try:
                lib.shmalloc_close(fd)  # outside the lock: this is the slow part
            finally:
                with self._changed:
                    self._closing -= 1
                    self._changed.notify_all()

    def _close_queued(self) -> None:
        while self._queue:
            lib.shmalloc_close(self._queue.popleft())
        self._changed.notify_all()  # for wait()

    def _before_fork(self) -> None:
        self._changed.acquire()  # held across the fork: released in both after-fork hooks
        thread = self._thread
        if thread is not None:
            self._stop = True
            self._changed.notify_all()
            # wait() releases the lock however often this thread holds it (a signal handler
            # may fork inside close_later), so the thread can finish its close and exit.
            if not thread.is_alive() and self._starting:
                # This thread is inside thread.start() (the fork comes from a signal handler):
                # the OS thread may not exist yet, and cannot come to exist before the fork.
                self._changed.wait_for(lambda: self._thread is None, timeout=START_GRACE)
            if self._thread is not None and (thread.is_alive() or not self._starting):
                self._changed.wait_for(lambda: self._thread is None, timeout=STOP_TIMEOUT)
            if self._thread is None:
                thread.join()
                wait_until_gone([thread.native_id])
            # else: never started (its start() resumes after the fork, in parent and child
            # alike), or a close that takes minutes: fork with it rather than hang
        self._close_queued()  # rather here than pinning the objects' pages in the child

    def _after_fork_in_parent(self) -> None:
        self._stop = False
        self._close_queued()  # queued by a signal handler during the fork, if any
        self._changed.release()

    def _after_fork_in_child(self) -> None:
        # The same Condition: a close_later or wait() that the forking signal handler
        # interrupted carries on with it. Its RLock is owned by this (the forking) thread
        # only, as _before_fork acquired it: release that acquisition, keep the caller's.
        self._stop, self._closing = False, 0
        if not self._starting:
            self._thread = None  # no thread of the parent exists here
        # else: this thread is inside start() of self._thread, which runs here once start()
        # resumes (the OS thread did not exist at the fork).
        self._close_queued()
        self._changed.release()


_releaser = _Releaser()


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _check_supported() -> None:
    if not POSIX_PLATFORM:
        raise NotImplementedError(f"shmalloc: POSIX shared memory is not supported on {sys.platform}")
    if lib is None:
        raise _missing_core_error()
    if not _handler_ready:
        _init_handler()


_handler_ready = False


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
        limit = in_use = "unknown"
    return (
        f"this process may have reached the limit on memory mappings (vm.max_map_count is {limit};"
        f" the process has {in_use} mappings, {live_mappings()} of them owned by zero-copy shmalloc arrays,"
        " one each). Consume with copy=True, drop zero-copy arrays no longer needed, or raise the limit"
        " (sysctl -w vm.max_map_count=...)"
    )


def _address(array: np.ndarray) -> Any:
    return ffi.cast("void *", array.__array_interface__["data"][0])


@dataclass(frozen=True)
class BufferLayout:
    """Where one buffer lies in the data part of a segment, and how to view it."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=object))


def layout_buffers(buffers: Sequence[np.ndarray]) -> tuple[list[BufferLayout], int]:
    """Place buffers on page boundaries; return their layouts and the data part's size."""
    layouts, offset = [], 0
    for buf in buffers:
        fortran = bool(buf.flags.f_contiguous and not buf.flags.c_contiguous)
        layouts.append(BufferLayout(offset, buf.dtype, tuple(buf.shape), fortran))
        offset += _round_up(buf.nbytes)
    return layouts, offset


def unlink(name: str) -> None:
    """Remove the name of a shared memory object (raises ShmError)."""
    _check_supported()
    if lib.shmalloc_unlink(name.encode()) < 0:
        _raise_missing_or(name, ffi.errno)


def _prepared(token: bytes, recipe: dict, buffers: Sequence[np.ndarray]) -> tuple[bytearray, list[BufferLayout], int, int]:
    """The header block, buffer layouts, data offset and size of a segment (as :func:`create` lays it out)."""
    layouts, data_size = layout_buffers(buffers)
    recipe_bytes = pickle.dumps(dict(recipe, buffers=layouts), protocol=5)
    data_offset = _round_up(HEADER_SIZE + len(recipe_bytes))
    size = data_offset + data_size
    head = bytearray(data_offset)
    _HEADER.pack_into(head, 0, MAGIC, VERSION, 0, token, len(recipe_bytes), data_offset, size)
    head[HEADER_SIZE : HEADER_SIZE + len(recipe_bytes)] = recipe_bytes
    return head, layouts, data_offset, size


def fill(fd: int, name: str, token: bytes, recipe: dict, buffers: Sequence[np.ndarray]) -> int:
    """Write ``recipe`` and ``buffers`` at the start of the open object ``fd``; return the segment's size.

    The layout of every segment (see the module docstring). The object is never shrunk (its warm pages
    stay for later fills): it may be larger than the returned size. ``name``
    only labels errors. A full /dev/shm gives ShmError (ENOSPC).
    """
    _check_supported()
    head, layouts, data_offset, size = _prepared(token, recipe, buffers)
    _write(fd, name, ffi.from_buffer(head), len(head), 0)
    padding = np.zeros(PAGE, np.uint8)
    for buf, layout in zip(buffers, layouts):
        nbytes = buf.nbytes
        if nbytes:
            _write(fd, name, _address(buf), nbytes, data_offset + layout.offset)
        pad = _round_up(nbytes) - nbytes
        if pad:
            _write(fd, name, _address(padding), pad, data_offset + layout.offset + nbytes)
    return size


def create(name: str, token: bytes, recipe: dict, buffers: Sequence[np.ndarray], overwrite: bool) -> int:
    """Create segment ``name`` holding ``recipe`` and ``buffers``; return its size in bytes.

    ``buffers`` must each be C- or Fortran-contiguous. Writes with pwrite (the
    GIL is released), so a full /dev/shm gives ENOSPC, not SIGBUS. On any
    failure the segment is unlinked and the error raised.
    """
    _check_supported()
    encoded = name.encode()
    if overwrite and lib.shmalloc_unlink(encoded) < 0 and ffi.errno != errno.ENOENT:
        _raise(name)
    fd = lib.shmalloc_open(encoded, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if fd < 0:
        _raise(name)
    try:
        return fill(fd, name, token, recipe, buffers)
    except BaseException:
        lib.shmalloc_unlink(encoded)
        raise
    finally:
        lib.shmalloc_close(fd)


def _write(fd: int, name: str, address: Any, nbytes: int, offset: int) -> None:
    if lib.shmalloc_write_all(fd, address, nbytes, offset) < 0:
        _raise(name)


class OpenSegment:
    """A segment opened for consumption: its name is already unlinked.

    Use as a context manager; :meth:`read_recipe` checks the header against
    the handle's size and token, :meth:`arrays` maps or copies the buffers.
    """

    def __init__(self, name: str, size: int) -> None:
        _check_supported()
        self.name = name
        encoded = name.encode()
        # O_NONBLOCK: a FIFO planted under the name must not block the open (S_ISREG refuses it below).
        fd = lib.shmalloc_open(encoded, os.O_RDONLY | os.O_NONBLOCK, 0)
        if fd < 0:
            code = ffi.errno
            lib.shmalloc_unlink(encoded)  # unlink right after trying to open, whatever happens
            _raise_missing_or(name, code)
        self.fd = fd
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                # Never remove or read another user's object on the strength of a handle.
                raise ShmError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user ({os.geteuid()})", name)
            lib.shmalloc_unlink(encoded)
            if not stat.S_ISREG(st.st_mode):
                raise ShmError(errno.EINVAL, "not a regular shared memory object", name)
            if st.st_size != size:
                raise CorruptHandleError(
                    f"{name}: the shared memory object holds {st.st_size} bytes, the handle says {size}"
                    " (truncated, resized or replaced)"
                )
            self.size = size
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            release_fd(fd, getattr(self, "size", 0))

    def __enter__(self) -> "OpenSegment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, nbytes: int, offset: int) -> bytearray:
        out = bytearray(nbytes)
        if nbytes and lib.shmalloc_read_all(self.fd, ffi.from_buffer(out), nbytes, offset) < 0:
            _raise(self.name)
        return out

    def read_recipe(self, token: bytes) -> dict:
        """Read and check the header, return the recipe stored in the segment."""
        if self.size < HEADER_SIZE:
            raise CorruptHandleError(f"{self.name}: {self.size} bytes cannot hold a shmalloc segment")
        magic, version, _, stored_token, recipe_len, data_offset, size = _HEADER.unpack_from(
            self._read(_HEADER.size, 0)
        )
        if magic != MAGIC:
            raise CorruptHandleError(f"{self.name}: not a shmalloc segment (bad magic {magic!r})")
        if version != VERSION:
            raise CorruptHandleError(f"{self.name}: segment format {version}, this shmalloc reads {VERSION}")
        if stored_token != token:
            raise CorruptHandleError(f"{self.name}: the segment was replaced since the handle was made (token differs)")
        if (
            size != self.size
            or recipe_len > MAX_RECIPE
            or data_offset % PAGE
            or data_offset < HEADER_SIZE + recipe_len
            or data_offset > size
        ):
            raise CorruptHandleError(f"{self.name}: damaged segment header")
        self.data_offset = data_offset
        try:
            recipe = pickle.loads(self._read(recipe_len, HEADER_SIZE))
        except Exception as exc:
            raise CorruptHandleError(f"{self.name}: damaged recipe ({type(exc).__name__})") from exc
        if not isinstance(recipe, dict) or not {"type", "length", "attributes", "buffers"} <= recipe.keys():
            raise CorruptHandleError(f"{self.name}: damaged recipe")
        self.layouts = _checked_layouts(self.name, recipe.get("buffers"), size - data_offset)
        return recipe

    def arrays(self, copy: bool) -> list[np.ndarray]:
        """Return the buffers as arrays: copies in regular memory, or arrays owning private mappings."""
        data_size = self.size - self.data_offset
        if not self.layouts or data_size == 0:
            return [_empty(layout) for layout in self.layouts]
        # The core stores the mapping's address, and each part's hand-over to its array, in these
        # before returning, so an interrupt right after any call cannot lose track of them.
        mapped = ffi.new("void **")
        owned = ffi.new("int[]", len(self.layouts))
        try:
            lib.shmalloc_map(self.fd, data_size, self.data_offset, 0 if copy else 1, mapped)
            if mapped[0] == ffi.NULL:
                _raise_map_failure(self.name)
            if copy:
                return [_copied(layout, mapped[0]) for layout in self.layouts]
            return _adopt_all(self.name, mapped[0], self.layouts, owned)
        except BaseException:
            if mapped[0] != ffi.NULL and not copy:
                _unmap_unowned(mapped[0], self.layouts, owned)
            raise
        finally:
            if mapped[0] != ffi.NULL and copy:
                lib.shmalloc_unmap(mapped[0], data_size)  # promised: no mapping remains at return


def _checked_layouts(name: str, layouts: object, data_size: int) -> list[BufferLayout]:
    if not isinstance(layouts, list) or not all(isinstance(x, BufferLayout) for x in layouts):
        raise CorruptHandleError(f"{name}: damaged buffer table")
    end = 0
    for layout in layouts:
        if not (
            vars(layout).keys() == {"offset", "dtype", "shape", "fortran"}
            and type(layout.offset) is int
            and isinstance(layout.dtype, np.dtype)
            and not layout.dtype.hasobject
            and isinstance(layout.shape, tuple)
            and all(type(n) is int and n >= 0 for n in layout.shape)
            and type(layout.fortran) is bool
            and _numpy_can_make(layout)
        ):
            raise CorruptHandleError(f"{name}: damaged buffer table entry")
        if layout.offset % PAGE or layout.offset < end or layout.offset + layout.nbytes > data_size:
            raise CorruptHandleError(f"{name}: buffer table does not fit the segment")
        end = layout.offset + _round_up(layout.nbytes)
    if end != data_size:
        raise CorruptHandleError(f"{name}: buffer table does not cover the segment")
    return layouts


def _numpy_can_make(layout: BufferLayout) -> bool:
    """Whether numpy accepts the layout's shape: at most 64 dimensions, and a size that fits in
    ``intp`` counting the non-zero dimensions (numpy checks those even for an empty array)."""
    extent = layout.dtype.itemsize
    for n in layout.shape:
        extent *= n or 1
    return len(layout.shape) <= 64 and extent <= np.iinfo(np.intp).max


def _empty(layout: BufferLayout) -> np.ndarray:
    return np.empty(layout.shape, layout.dtype, order="F" if layout.fortran else "C")


def _copied(layout: BufferLayout, base: Any) -> np.ndarray:
    out = _empty(layout)
    if layout.nbytes:
        lib.shmalloc_copy(_address(out), base + layout.offset, layout.nbytes, copy_threads())
    return out


def _adopt_all(name: str, base: Any, layouts: list[BufferLayout], owned: Any) -> list[np.ndarray]:
    """Hand each page-aligned part of one private mapping (at ``base``) to its own array.

    ``owned[i]`` becomes 1 when part ``i`` belongs to its array. On an exception the
    caller unmaps the other parts (:func:`_unmap_unowned`).
    """
    arrays: list[np.ndarray] = []
    for i, layout in enumerate(layouts):
        span = _round_up(layout.nbytes)
        arrays.append(_adopt(name, base + layout.offset, span, layout, owned + i) if span else _empty(layout))
    return arrays


def _unmap_unowned(base: Any, layouts: list[BufferLayout], owned: Any) -> None:
    """Unmap the parts of a mapping that were never handed to an array.

    A part that was handed over is the array's to unmap, even if an interrupt dropped
    the array before it reached a list (then it is already unmapped, and its
    addresses may already hold another mapping): the core's flags, set in the call
    that handed it over, say which parts these are.
    """
    for i, layout in enumerate(layouts):
        span = _round_up(layout.nbytes)
        if span and not owned[i]:
            lib.shmalloc_unmap(base + layout.offset, span)


def _adopt(name: str, address: Any, span: int, layout: BufferLayout, owned: Any) -> np.ndarray:
    """An array over the ``span`` mapped bytes at ``address`` that owns them (munmaps them when freed).

    The core makes the array and hands it the mapping in one call with the GIL
    held, so no other Python code on this thread (a signal handler, a finaliser,
    a profile hook) can ever receive the mapping; it sets ``owned[0]`` to 1 in
    that call. The result is checked all the same: wrong data is never returned.
    """
    out = [None]  # the core puts the array here; it and the dtype stay alive across the call
    dims = ffi.new("intptr_t[]", layout.shape)
    descr = _pointer_to(layout.dtype)
    if lib.shmalloc_adopt(address, span, descr, len(layout.shape), dims, layout.fortran, _pointer_to(out), owned) < 0:
        code = ffi.errno
        if code == errno.ENOMEM:
            raise MemoryError(f"shmalloc: no memory to hand {name}'s mapping to an array")
        raise ShmError(code, f"numpy could not make a {layout.dtype} array of shape {layout.shape} over the mapping", name)
    array = out[0]
    owner = array.__array_interface__["data"][0]
    if owner != int(ffi.cast("uintptr_t", address)) or get_handler_name(array) != "shmalloc" or not array.flags.owndata:
        # never seen: the array owns the mapping all the same, and unmaps it when collected
        raise ShmError(errno.EFAULT, "the new array does not own the mapping it was made over", name)
    return array


def _pointer_to(obj: object) -> Any:
    """The address of a Python object, for the core (cffi has no PyObject type); the caller keeps obj alive."""
    return ffi.cast("void *", id(obj))


def wait_for_releases() -> None:
    """Block until descriptors handed to the background releaser are closed."""
    _releaser.wait()


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


# ---------------------------------------------------------------------------
# Shared segments (MAP_SHARED), for ShmArray: one object that several
# processes map and write at once. Unlike the segments above they carry no
# header: the object is the array's memory. Raw cffi pointers stay in this
# module; callers get a SharedMapping, which numpy sees through
# __array_interface__ and which unmaps itself when garbage collected.
# ---------------------------------------------------------------------------

class SharedMapping:
    """A writable MAP_SHARED mapping of a whole shared memory object.

    ``np.asarray(mapping)`` is a uint8 array over all of it whose ``base`` is
    the mapping, so arrays built on it keep it, and the memory, alive. The
    mapping is unmapped when this object is garbage collected (not at
    interpreter exit, when arrays may still be in use: the OS unmaps then).
    """

    def __init__(self, name: str, fd: int, size: int, inode: int) -> None:
        address = lib.shmalloc_map_shared(fd, size, 0, 1)
        if address == ffi.NULL:
            _raise_map_failure(name)
        self.name = name
        self.size = size
        self.inode = inode
        self.address = int(ffi.cast("uintptr_t", address))
        self.__array_interface__ = {
            "version": 3,
            "shape": (size,),
            "typestr": "|u1",
            "data": (self.address, False),
        }
        finalizer = weakref.finalize(self, lib.shmalloc_unmap, address, size)
        finalizer.atexit = False


def create_shared(name: str, size: int) -> SharedMapping:
    """Create shared memory object ``name`` of ``size`` bytes (at least 1) and map it shared.

    The object is created with O_EXCL and mode 0600, and every page is
    reserved with posix_fallocate, so a full /dev/shm gives ShmError ENOSPC
    here rather than SIGBUS on a later write. On failure nothing is left.
    """
    _check_supported()
    if size < 1:
        raise ValueError(f"a shared segment needs at least 1 byte, not {size}")
    encoded = name.encode()
    fd = lib.shmalloc_open(encoded, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if fd < 0:
        _raise(name)
    try:
        if lib.shmalloc_fallocate(fd, size) < 0:
            _raise(name)
        return SharedMapping(name, fd, size, os.fstat(fd).st_ino)
    except BaseException:
        lib.shmalloc_unlink(encoded)
        raise
    finally:
        lib.shmalloc_close(fd)


def open_shared(name: str, size: int, inode: int | None = None) -> SharedMapping:
    """Map an existing shared object made by :func:`create_shared`, after checking it.

    Raises ShmError (EPERM) if another user owns it, EINVAL if it is not a
    regular object, and CorruptHandleError if its size (or inode, when
    given) differs from what the caller expects: it was replaced or resized.
    """
    _check_supported()
    fd = lib.shmalloc_open(name.encode(), os.O_RDWR | os.O_NONBLOCK, 0)  # a planted FIFO must not block
    if fd < 0:
        _raise(name)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ShmError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user ({os.geteuid()})", name)
        if not stat.S_ISREG(st.st_mode):
            raise ShmError(errno.EINVAL, "not a regular shared memory object", name)
        if st.st_size != size or (inode is not None and st.st_ino != inode):
            raise CorruptHandleError(
                f"{name}: the shared memory object is not the one expected"
                f" ({st.st_size} bytes, inode {st.st_ino}; expected {size} bytes, inode {inode})"
            )
        return SharedMapping(name, fd, size, st.st_ino)
    finally:
        lib.shmalloc_close(fd)


# ---------------------------------------------------------------------------
# Recycled segments (for shmalloc.Pool): an unlinked object, held open by its
# descriptor, that a worker fills again. Its pages were faulted in by an earlier
# transfer, so pwrite into it is a plain copy instead of ~4 us per fresh page.
# ---------------------------------------------------------------------------


class RefillMapping:
    """A worker's writable shared mapping of the first ``length`` bytes of a recycled object.

    Every byte of that range was written before the mapping was made (so no
    page is a hole a full /dev/shm could refuse: writes through it cannot
    SIGBUS), and the object is never shrunk. Refilling through it is a plain
    memcpy into mapped pages, ~2.5x faster than pwrite here.
    """

    def __init__(self, fd: int, length: int) -> None:
        _check_supported()
        if length <= 0 or os.fstat(fd).st_size < length:
            raise ValueError("a refill mapping must cover written bytes of the object")
        address = lib.shmalloc_map_populated(fd, length)
        if address == ffi.NULL:
            _raise_map_failure(SPARE_LABEL)
        self._address, self.length = address, length

    def fill(self, fd: int, name: str, token: bytes, recipe: dict, buffers: Sequence[np.ndarray]) -> int | None:
        """Like :func:`fill`, through the mapping; None (nothing written) if the segment would not fit."""
        head, layouts, data_offset, size = _prepared(token, recipe, buffers)
        if self._address is None or size > self.length or os.fstat(fd).st_size < size:
            return None  # never write through the mapping past the end of the object (SIGBUS)
        _write(fd, name, ffi.from_buffer(head), len(head), 0)
        padding = np.zeros(PAGE, np.uint8)
        base = self._address + data_offset
        for buf, layout in zip(buffers, layouts):
            nbytes = buf.nbytes
            if nbytes:
                lib.shmalloc_copy(base + layout.offset, _address(buf), nbytes, 1)
            pad = _round_up(nbytes) - nbytes
            if pad:
                lib.shmalloc_copy(base + layout.offset + nbytes, _address(padding), pad, 1)
        return size

    def close(self) -> None:
        if self._address is not None:
            address, self._address = self._address, None
            lib.shmalloc_unmap(address, self.length)

    def __del__(self) -> None:
        self.close()


SPARE_LABEL = "/shmalloc_spare"


class HeldSegment(OpenSegment):
    """A segment read through a descriptor the caller keeps (no name to open or unlink).

    :meth:`close` leaves the descriptor open: the caller may recycle it.
    """

    def __init__(self, fd: int, name: str, size: int) -> None:
        _check_supported()
        self.name, self.fd = name, fd
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            raise ShmError(errno.EPERM, "not a regular object of this user", name)
        if st.st_size < size:  # recycled objects only grow: the segment is at their start
            raise CorruptHandleError(f"{name}: the object holds {st.st_size} bytes, the handle says {size}")
        self.size = size

    def close(self) -> None:
        self.fd = -1  # the caller's descriptor stays open


def reopen_writable(segment: OpenSegment) -> int:
    """A read-write descriptor of an opened (unlinked) segment, or -1 where that is not possible.

    Through /proc/self/fd (Linux): the same object, whatever its name became.
    """
    try:
        return os.open(f"/proc/self/fd/{segment.fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return -1


def any_adopted(addresses: Sequence[int]) -> bool:
    """Whether any of these addresses is still a mapping owned by an array."""
    return any(lib.shmalloc_is_adopted(ffi.cast("void *", a)) for a in addresses)


def release_fd(fd: int, size: int) -> None:
    """Close a descriptor; a large object's pages are freed on the background thread."""
    if size >= RELEASE_LATER_BYTES:
        _releaser.close_later(fd)
    else:
        lib.shmalloc_close(fd)
