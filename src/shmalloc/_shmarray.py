"""ShmArray: a numpy array in a named shared memory object that several processes map at once.

Every ShmArray lies in a :class:`~shmalloc._shared.SharedMapping` reached
through its ``base`` chain, so the mapping lives as long as any array (or
plain view) uses it. Pickling sends the segment's name and the array's
layout, never the data; unpickling maps the same memory (once per process
and segment). The creating process owns the name and removes it when its
last array over the segment is garbage collected, on :meth:`ShmArray.unlink`,
on leaving a ``with`` block, or at interpreter exit.
"""
from __future__ import annotations

import errno
import html
import operator
import os
import signal
import threading
import weakref
from typing import Any, Iterable

import numpy as np

from . import _names, _posix, _shared, _space
from ._display import html_table, human_size
from .errors import ShmError

# One mapping per segment and process: arrays unpickled twice share it, and
# arrays sent back to the creator land in the creator's own mapping.
_mappings: "weakref.WeakValueDictionary[str, _shared.SharedMapping]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _owner_unlink(name: str, pid: int) -> None:
    """Remove the name if this is still the creating process (a forked child inherits the finalizer)."""
    if os.getpid() != pid:
        return
    try:
        _posix.unlink(name)
    except FileNotFoundError:
        pass  # unlinked already, by unlink() or by a cleanup tool
    _owned_names.discard(name)


# The names this process owns, in a plain set that a signal handler reads without a lock
# (see unlink_owned_and_die). A new name enters before its object is created, so a handler
# that runs in between still removes it.
_owned_names: set[str] = set()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_owned_names.clear)  # a forked child owns none of them


class _Ownership:
    """The creating process's claim on a segment's name."""

    def __init__(self, mapping: _shared.SharedMapping) -> None:
        self.pid = os.getpid()
        self.finalizer = weakref.finalize(mapping, _owner_unlink, mapping.name, self.pid)


_owned: "weakref.WeakKeyDictionary[_shared.SharedMapping, _Ownership]" = weakref.WeakKeyDictionary()


# In a worker of shmalloc: the pid of the process its results go to. New names carry it, because
# that process takes over the arrays returned to it, and cleanup tools judge a name by its pid.
_receiver_pid: int | None = None


def name_for_receiver(pid: int) -> None:
    """In a worker: new ShmArrays get names carrying ``pid``, the process that receives its results."""
    global _receiver_pid
    _receiver_pid = pid


def _new_segment(nbytes: int) -> _shared.SharedMapping:
    name = _names.generate(_receiver_pid)
    _owned_names.add(name)
    try:
        mapping = _space.retry_on_enospc(_shared.create_shared, name, max(nbytes, 1))  # mmap and fallocate refuse 0 bytes
    except BaseException:
        _owned_names.discard(name)  # create_shared left nothing
        raise
    with _lock:
        _owned[mapping] = _Ownership(mapping)
        _mappings[name] = mapping
    return mapping


def _attach(name: str, size: int, inode: int) -> _shared.SharedMapping:
    with _lock:
        mapping = _mappings.get(name)
        if mapping is not None and mapping.size == size and mapping.inode == inode:
            return mapping
    try:
        mapping = _shared.open_shared(_names.validate(name), size, inode)
    except FileNotFoundError:
        raise ShmError(
            errno.ENOENT, "the ShmArray's segment is gone: its creator unlinked it or ended before this process attached", name
        ) from None
    with _lock:
        current = _mappings.get(name)  # another thread may have attached meanwhile
        if current is not None and current.size == size and current.inode == inode:
            return current
        _mappings[name] = mapping
        return mapping


def _mapping_of(array: np.ndarray) -> _shared.SharedMapping | None:
    """The shared mapping that ``array``'s memory lies in, found through its base chain."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, _shared.SharedMapping) else None


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise TypeError(f"a ShmArray cannot hold Python objects (dtype {dtype}): they live in one process's heap")


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    try:
        dims = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            dims = tuple(operator.index(n) for n in shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    return dims


def _view(mapping: _shared.SharedMapping, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: Any) -> "ShmArray":
    raw = np.asarray(mapping)  # uint8 over the whole segment; its base is the mapping
    return np.ndarray.__new__(ShmArray, shape, dtype, buffer=raw, offset=offset, strides=strides)


def _rebuild(name: str, size: int, inode: int, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: tuple[int, ...]) -> "ShmArray":
    """Unpickle a ShmArray: map its segment (or reuse this process's mapping) and view it."""
    if not isinstance(size, int) or not isinstance(offset, int) or size < 1 or not 0 <= offset < size:
        raise ValueError(f"{name}: damaged ShmArray reference (size {size!r}, offset {offset!r})")
    dtype = np.dtype(dtype)
    _check_dtype(dtype)
    mapping = _attach(name, size, inode)
    try:
        return _view(mapping, _shape(shape), dtype, offset, tuple(operator.index(s) for s in strides))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: damaged ShmArray reference: {exc}") from None


def _adopt(name: str, size: int, inode: int, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: tuple[int, ...]) -> "ShmArray":
    """Unpickle a ShmArray handed over as a result: this process becomes the owner of its name."""
    array = _rebuild(name, size, inode, shape, dtype, offset, strides)
    mapping = _mapping_of(array)
    with _lock:
        ownership = _owned.get(mapping)
        if ownership is None or ownership.pid != os.getpid():
            _owned_names.add(mapping.name)
            _owned[mapping] = _Ownership(mapping)
    return array


# The handover that ShmArrays pickled by this thread join (None: pickled by reference, the owner stays).
_handing_over = threading.local()


class Handover:
    """While active (``with``), ShmArrays this process owns and pickles pass their name's ownership on.

    For a worker returning results: whoever unpickles such an array owns its
    name from then on. The worker keeps its duty to unlink until
    :meth:`complete` (call it once the pickle has been delivered); a
    handover dropped without :meth:`complete` changes nothing here.
    """

    def __init__(self) -> None:
        self.mappings: dict[str, _shared.SharedMapping] = {}

    @property
    def names(self) -> list[str]:
        """The names handed over so far."""
        return list(self.mappings)

    def __enter__(self) -> "Handover":
        self._outer = getattr(_handing_over, "current", None)
        _handing_over.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        _handing_over.current = self._outer

    def _join(self, mapping: _shared.SharedMapping) -> bool:
        """Take ``mapping`` into the handover if this process owns its name."""
        ownership = _owned.get(mapping)
        if ownership is None or ownership.pid != os.getpid() or not ownership.finalizer.alive:
            return False
        self.mappings[mapping.name] = mapping
        return True

    def keep_at_exit(self) -> None:
        """Leave the names handed over alone at interpreter exit (the receiver has them by then)."""
        with _lock:
            for mapping in self.mappings.values():
                ownership = _owned.get(mapping)
                if ownership is not None:
                    ownership.finalizer.atexit = False

    def complete(self) -> None:
        """The receiver has the pickle: give up the duty to unlink the names handed over."""
        with _lock:
            for mapping in self.mappings.values():
                ownership = _owned.pop(mapping, None)
                if ownership is not None:
                    ownership.finalizer.detach()
                    _owned_names.discard(mapping.name)
        self.mappings = {}


def unlink_unless_owned(name: str) -> None:
    """Unlink ``name`` unless this process owns it (a handed-over name nobody took over)."""
    with _lock:
        mapping = _mappings.get(name)
        ownership = _owned.get(mapping) if mapping is not None else None
        if ownership is not None and ownership.pid == os.getpid():
            return
    try:
        _posix.unlink(name)
    except FileNotFoundError:
        pass


def unlink_owned() -> None:
    """Unlink every name this process owns: for a worker about to leave through ``os._exit``.

    (``os._exit`` skips the finalisers that would unlink them; the arrays stay valid where mapped.)
    """
    with _lock:
        owned = [o for o in _owned.values() if o.pid == os.getpid()]
    for ownership in owned:
        ownership.finalizer()


def unlink_owned_and_die(signum: int, frame: Any) -> None:
    """A signal handler for workers: unlink every name this process owns, then die of ``signum``.

    For SIGTERM, which would otherwise end a worker without its finalisers and
    leave names carrying the receiver's pid in ``/dev/shm``. It may run at any
    bytecode, so it takes no lock and only reads a snapshot of the owned names
    (a name being created is in it already; unlinking one not yet created, or
    gone, is harmless). The process then ends as it would have without the
    handler, so its parent sees the same exit status.
    """
    for name in tuple(_owned_names):  # one C call: no other thread changes the set meanwhile
        try:
            _posix.unlink(name)
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal did not end the process


def _demote(result: Any) -> Any:
    """Turn ShmArrays whose memory is not shared (copies, results) into plain ndarrays."""
    if isinstance(result, ShmArray) and _mapping_of(result) is None:
        return result.view(np.ndarray)
    if isinstance(result, tuple):
        return tuple(_demote(r) for r in result)
    if isinstance(result, list):
        return [_demote(r) for r in result]
    return result


class ShmArray(np.ndarray):
    """A numpy array in POSIX shared memory that several processes map and write at once.

    Make one with :meth:`empty`, :meth:`zeros` or :meth:`from_array`. It
    pickles by reference (the segment's name and the array's layout, about
    200 bytes whatever its size), so passing it to worker processes of any
    start method (fork, spawn, forkserver) costs microseconds, and they all
    see, and may write, the same memory. Slices and other views stay
    ShmArrays and pickle as views of the same memory.

    The memory is shared (``MAP_SHARED``), unlike the private copy-on-write
    mapping of :func:`shmalloc.allocate_from_shm`: a write in any process is
    seen by all. Synchronise writers yourself (e.g. give each worker its own
    slice).

    Lifetime: the creating process owns the name. It removes the name when
    its last array over the segment is garbage collected, on
    :meth:`unlink`, on leaving a ``with`` block, or at interpreter exit.
    Processes that mapped the segment keep valid memory after that; the
    memory itself is freed when the last process unmaps it. A process that
    receives the array only after the name is gone gets a
    :class:`~shmalloc.ShmError` (ENOENT). If the creator crashes, the name
    stays in ``/dev/shm`` as ``/shmalloc_<pid>_<random>`` for
    :func:`shmalloc.gc` (``python -m shmalloc gc``) to remove.

    A ShmArray made in a worker of :func:`shmalloc.map`, :class:`shmalloc.Pool`
    or :class:`shmalloc.ProcessPoolExecutor` and returned as (part of) a
    result is handed over: the receiving process becomes its owner, the
    worker gives up its duty once the result is sent. (Passed anywhere else,
    including to a worker as an argument, the creator stays the owner.) The
    names of arrays made in such workers carry the receiving process's pid.

    Results that do not live in the shared memory, such as those of
    arithmetic (``a + 1``), reductions or :meth:`copy`, are plain
    :class:`numpy.ndarray`. ``np.asarray(a)`` is a plain view of the shared
    memory (it keeps the mapping alive but pickles by value).

    Examples
    --------
    >>> import numpy as np
    >>> from shmalloc import ShmArray
    >>> with ShmArray.zeros((2, 3)) as a:
    ...     a[0] = 1
    ...     b = a[0]                   # a view: still a ShmArray
    ...     type(b).__name__, type(a + 1).__name__
    ('ShmArray', 'ndarray')
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ShmArray":
        raise TypeError("make a ShmArray with ShmArray.empty(), ShmArray.zeros() or ShmArray.from_array()")

    # ---- construction ----

    @classmethod
    def empty(cls, shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> "ShmArray":
        """Return a new uninitialised array in a fresh shared memory object.

        Parameters
        ----------
        shape : int or sequence of int
            Shape of the array.
        dtype : data-type, default float
            Any numpy dtype without Python objects.
        order : {'C', 'F'}, default 'C'
            Row-major (C) or column-major (Fortran) layout.

        Returns
        -------
        ShmArray
            Owned by this process. Every page is reserved in ``/dev/shm``
            now, so the memory is there when written. (A new shared memory
            object reads as zeros, so this is the same as :meth:`zeros`.)

        Raises
        ------
        ShmError
            ENOSPC if ``/dev/shm`` is too small (e.g. Docker's default 64 MB:
            raise it with ``--shm-size``); EMFILE or ENOMEM for other limits.
        TypeError
            For an object dtype.
        ValueError
            For a negative dimension or an order other than 'C' or 'F'.
        """
        dims = _shape(shape)
        dtype = np.dtype(dtype)
        _check_dtype(dtype)
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', not {order!r}")
        nbytes = dtype.itemsize * int(np.prod(dims, dtype=object))
        mapping = _new_segment(nbytes)
        return np.ndarray.__new__(cls, dims, dtype, buffer=np.asarray(mapping), order=order)

    @classmethod
    def zeros(cls, shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> "ShmArray":
        """Return a new array of zeros in a fresh shared memory object.

        Parameters and errors are those of :meth:`empty`.
        """
        # A new shared memory object is extended from size 0, and POSIX fills
        # the bytes a file grows by with zeros: no pass over the memory needed.
        return cls.empty(shape, dtype, order)

    @classmethod
    def from_array(cls, x: Any, dtype: Any = None, order: str = "K") -> "ShmArray":
        """Copy an array (or anything ``np.asarray`` accepts) into a fresh shared memory object.

        Parameters
        ----------
        x : array_like
            The data, of any dtype without Python objects.
        dtype : data-type, optional
            Convert to this dtype; default ``x``'s.
        order : {'K', 'C', 'F'}, default 'K'
            Layout of the copy: 'K' keeps Fortran order of a Fortran array,
            C order otherwise.

        Returns
        -------
        ShmArray
            A copy of ``x`` owned by this process.

        Raises
        ------
        TypeError
            If ``x`` holds Python objects.
        ShmError
            As for :meth:`empty`.
        """
        source = np.asarray(x, dtype=dtype)
        if order == "K":
            order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
        out = cls.empty(source.shape, source.dtype, order)
        np.copyto(np.asarray(out), source, casting="no")
        return out

    # ---- where the memory is ----

    @property
    def shared(self) -> bool:
        """True if this array's memory lies in a shared memory object (False for a stray subclass view)."""
        return _mapping_of(self) is not None

    @property
    def name(self) -> str | None:
        """Name of the shared memory object, e.g. ``'/shmalloc_4711_0123456789ab'`` (None if not shared)."""
        mapping = _mapping_of(self)
        return mapping.name if mapping is not None else None

    @property
    def owner(self) -> bool:
        """True in the process that created the segment and owns its name."""
        mapping = _mapping_of(self)
        ownership = _owned.get(mapping) if mapping is not None else None
        return ownership is not None and ownership.pid == os.getpid()

    @property
    def unlinked(self) -> bool:
        """True once the owner removed the name (only known in the owning process; False elsewhere)."""
        mapping = _mapping_of(self)
        ownership = _owned.get(mapping) if mapping is not None else None
        return ownership is not None and not ownership.finalizer.alive

    def unlink(self) -> None:
        """Remove the segment's name now; memory stays valid wherever it is mapped.

        Only the owning process may do this, and doing it twice is harmless.
        After it, the array can no longer be sent to processes that have not
        mapped it yet.

        Raises
        ------
        ValueError
            In a process that does not own the segment.
        """
        mapping = _mapping_of(self)
        ownership = _owned.get(mapping) if mapping is not None else None
        if ownership is None or ownership.pid != os.getpid():
            raise ValueError("only the process that created a ShmArray's segment may unlink it")
        ownership.finalizer()  # runs once: later calls and garbage collection do nothing

    def __enter__(self) -> "ShmArray":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner:
            self.unlink()

    # ---- numpy protocol: only arrays in shared memory stay ShmArray ----

    def __array_wrap__(self, out: np.ndarray, context: Any = None, return_scalar: bool = False) -> Any:
        if return_scalar:
            return out[()]
        if _mapping_of(out) is None:
            return out.view(np.ndarray)  # arithmetic results live in private memory
        return out if isinstance(out, ShmArray) else out.view(ShmArray)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _demote(super().__array_function__(func, types, args, kwargs))

    def __getitem__(self, key: Any) -> Any:
        # Fancy and boolean indexing copy into private memory: such results are plain.
        return _demote(super().__getitem__(key))

    def copy(self, order: str = "C") -> np.ndarray:  # type: ignore[override]
        """Return a copy in private memory, as a plain ndarray."""
        return np.array(self, order=order, copy=True, subok=False)

    def __copy__(self) -> np.ndarray:
        return self.copy(order="K")

    def __deepcopy__(self, memo: dict) -> np.ndarray:
        return self.copy(order="K")

    # ---- pickling by reference ----

    def __reduce_ex__(self, protocol: Any) -> Any:
        mapping = _mapping_of(self)
        if mapping is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        offset = self.__array_interface__["data"][0] - mapping.address
        handover = getattr(_handing_over, "current", None)
        return (
            _adopt if handover is not None and handover._join(mapping) else _rebuild,
            (mapping.name, mapping.size, mapping.inode, self.shape, self.dtype, offset, self.strides),
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    # ---- display ----

    def _repr_html_(self) -> str:
        mapping = _mapping_of(self)
        if mapping is None:
            where = "private memory (not shared)"
        else:
            role = "owner" if self.owner else "attached"
            where = f"{mapping.name} ({role}{', name removed' if self.unlinked else ''})"
        rows = [
            ("segment", where),
            ("shape", self.shape),
            ("dtype", self.dtype),
            ("size", human_size(self.nbytes)),
        ]
        preview = np.array2string(np.asarray(self), threshold=20, edgeitems=3)
        return f"{html_table('shmalloc.ShmArray', rows)}<pre>{html.escape(preview)}</pre>"

