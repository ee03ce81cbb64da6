"""ShmArray: a numpy array in a named shared memory object that several processes map at once.

Every ShmArray lies in a :class:`~shmalloc._shared.SharedMapping` (see :mod:`._ownership`) reached
through its ``base`` chain, so the mapping lives as long as any array (or
plain view) uses it. Pickling sends the segment's name and the array's
layout, never the data; unpickling maps the same memory (once per process
and segment). The creating process owns the name and removes it when its
last array over the segment is garbage collected, on :meth:`ShmArray.unlink`,
on leaving a ``with`` block, or at interpreter exit.
"""
from __future__ import annotations

import html
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _ownership
from ._display import html_table, human_size


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise TypeError(f"a ShmArray cannot hold Python objects (dtype {dtype}): they live in one process's heap")


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    try:
        dims: tuple[int, ...] = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            dims = tuple(operator.index(n) for n in shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    return dims


def _view(mapping: Any, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: Any) -> "ShmArray":
    raw = np.asarray(mapping)  # uint8 over the whole segment; its base is the mapping
    return np.ndarray.__new__(ShmArray, shape, dtype, buffer=raw, offset=offset, strides=strides)


def _rebuild(
    name: str, size: int, inode: int, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: tuple[int, ...]
) -> "ShmArray":
    """Unpickle a ShmArray: map its segment (or reuse this process's mapping) and view it."""
    if not isinstance(size, int) or not isinstance(offset, int) or size < 1 or not 0 <= offset < size:
        raise ValueError(f"{name}: damaged ShmArray reference (size {size!r}, offset {offset!r})")
    dtype = np.dtype(dtype)
    _check_dtype(dtype)
    mapping = _ownership.attach(name, size, inode)
    try:
        return _view(mapping, _shape(shape), dtype, offset, tuple(operator.index(s) for s in strides))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: damaged ShmArray reference: {exc}") from None


def _adopt(
    name: str, size: int, inode: int, shape: tuple[int, ...], dtype: np.dtype, offset: int, strides: tuple[int, ...]
) -> "ShmArray":
    """Unpickle a ShmArray handed over as a result: this process becomes the owner of its name."""
    array = _rebuild(name, size, inode, shape, dtype, offset, strides)
    mapping = _ownership.mapping_of(array)
    if mapping is not None:  # always: _rebuild views a mapping
        _ownership.take_over(mapping)
    return array


def _demote(result: Any) -> Any:
    """Turn ShmArrays whose memory is not shared (copies, results) into plain ndarrays."""
    if isinstance(result, ShmArray) and _ownership.mapping_of(result) is None:
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
        mapping = _ownership.new_mapping(nbytes)
        return np.ndarray.__new__(cls, dims, dtype, buffer=np.asarray(mapping), order=order)  # type: ignore[arg-type]

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
        return _ownership.mapping_of(self) is not None

    @property
    def name(self) -> str | None:
        """Name of the shared memory object, e.g. ``'/shmalloc_4711_0123456789ab'`` (None if not shared)."""
        mapping = _ownership.mapping_of(self)
        return mapping.name if mapping is not None else None

    @property
    def owner(self) -> bool:
        """True in the process that created the segment and owns its name."""
        return _ownership.ownership_of(_ownership.mapping_of(self)) is not None

    @property
    def unlinked(self) -> bool:
        """True once the owner removed the name (only known in the owning process; False elsewhere)."""
        ownership = _ownership.ownership_of(_ownership.mapping_of(self))
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
        ownership = _ownership.ownership_of(_ownership.mapping_of(self))
        if ownership is None:
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
        if _ownership.mapping_of(out) is None:
            return out.view(np.ndarray)  # arithmetic results live in private memory
        return out if isinstance(out, ShmArray) else out.view(ShmArray)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _demote(super().__array_function__(func, types, args, kwargs))

    def __getitem__(self, key: Any) -> Any:
        # Fancy and boolean indexing copy into private memory: such results are plain.
        return _demote(super().__getitem__(key))

    def copy(self, order: str = "C") -> np.ndarray:  # type: ignore[override]
        """Return a copy in private memory, as a plain ndarray."""
        return np.array(self, order=order, copy=True, subok=False)  # type: ignore[call-overload]

    def __copy__(self) -> np.ndarray:  # type: ignore[override]
        return self.copy(order="K")

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> np.ndarray:  # type: ignore[override]
        return self.copy(order="K")

    # ---- pickling by reference ----

    def __reduce_ex__(self, protocol: Any) -> Any:
        mapping = _ownership.mapping_of(self)
        if mapping is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        offset = self.__array_interface__["data"][0] - mapping.address
        return (
            _adopt if _ownership.joins_handover(mapping) else _rebuild,
            (mapping.name, mapping.size, mapping.inode, self.shape, self.dtype, offset, self.strides),
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    # ---- display ----

    def _repr_html_(self) -> str:
        mapping = _ownership.mapping_of(self)
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

