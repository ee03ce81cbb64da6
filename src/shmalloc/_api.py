"""The public API: copy2shm, allocate_from_shm, unlink."""
from __future__ import annotations

import sys
from typing import Any

from . import _names, _posix, _transfer
from ._handle import ShmObj


def copy2shm(x: Any, name: str | None = None, overwrite: bool = False, copy: bool = True) -> ShmObj:
    """Copy ``x`` into a new POSIX shared memory object.

    Parameters
    ----------
    x : numpy array, pandas object or any picklable object
        A numpy array of any fixed-size dtype, shape and layout, a pandas
        object, or any other picklable object (lists, dicts and tuples keep
        their type and may nest arrays and frames, whose large buffers go to
        shared memory too).
    name : str, optional
        Name of the shared memory object: "/" followed by 1 to 253 characters,
        none of them "/" (at most 31 in all on macOS). By default a fresh,
        unpredictable name ``/shmalloc_<pid>_<random>``.
    overwrite : bool, default False
        Replace an existing object of that name. If False and the name
        exists, raise :class:`ShmError` with errno EEXIST (a
        ``FileExistsError``) and leave the existing object untouched. Not
        supported on macOS.
    copy : bool, default True
        Only sets the default of ``copy`` for :func:`allocate_from_shm`.

    Returns
    -------
    ShmObj
        A small picklable handle; pass it to another process and call
        :func:`allocate_from_shm` there, once.

    Raises
    ------
    ShmError
        If the object cannot be created or filled (EEXIST, ENOSPC for a full
        /dev/shm, ...). Nothing is left behind. Unlike the R original, which
        returns the error message, shmalloc raises.
    TypeError, ValueError
        For a bad ``name`` or an argument of the wrong type.
    """
    if not isinstance(overwrite, bool) or not isinstance(copy, bool):
        raise TypeError("overwrite and copy must be bool")
    name = _names.generate() if name is None else _names.validate(name)
    if overwrite and sys.platform == "darwin":
        raise NotImplementedError("overwrite=True is not supported on macOS (shm_open cannot replace safely there)")
    return _transfer.write_named(x, name, overwrite=overwrite, copy=copy)


def allocate_from_shm(obj: ShmObj, copy: bool | None = None) -> Any:
    """Rebuild the object that :func:`copy2shm` placed in shared memory, and remove its name.

    Parameters
    ----------
    obj : ShmObj
        The handle returned by :func:`copy2shm`, usually in another process.
    copy : bool, optional
        True: copy into regular memory; no mapping of the object remains.
        False: map the object privately (copy-on-write); arrays own their
        part of the mapping (through shmalloc's numpy memory handler) and
        unmap it when they and all their views are garbage collected. Writes
        stay private to this process (and to forked children, each to its
        own). An object of less than 1 MiB is read into regular memory
        instead, which takes less time than mapping it (the result behaves
        the same). None (default): ``obj.copy``. On macOS False acts as True.

    Returns
    -------
    object
        An object equal to the one given to :func:`copy2shm`.

    Raises
    ------
    ShmError
        If the object cannot be opened: ENOENT if it is gone (e.g. this is
        the second call on the same handle), EPERM if another user owns it.
    CorruptHandleError
        If the handle does not match the object (damaged, forged, or the
        object was resized or replaced). Nothing is mapped in that case.
    TypeError
        If ``obj`` is not a ShmObj.

    Notes
    -----
    The name is unlinked right after opening, whatever happens next, so each
    handle can be consumed once.
    """
    if not isinstance(obj, ShmObj):
        raise TypeError(f"allocate_from_shm expects a ShmObj, not {type(obj).__name__}")
    if copy is None:
        copy = obj.copy
    if not isinstance(copy, bool):
        raise TypeError(f"copy must be bool or None, not {type(copy).__name__}")
    return _transfer.read_named(obj, copy, read_small=True)


def unlink(obj_or_name: ShmObj | str) -> None:
    """Remove a shared memory object that nobody will consume.

    Parameters
    ----------
    obj_or_name : ShmObj or str
        A handle, or the name of the object.

    Raises
    ------
    ShmError
        ENOENT if it does not exist (anymore).
    """
    name = obj_or_name.name if isinstance(obj_or_name, ShmObj) else obj_or_name
    _posix.unlink(_names.validate(name))
