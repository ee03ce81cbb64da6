"""Who owns the name of each ShmArray segment, and how ownership passes to the process that receives it.

One :class:`~._shared.SharedMapping` per segment and process. The creating
process owns the name and removes it when its last array over the segment
is garbage collected (or at exit, or on ``unlink()``). A worker returning
ShmArrays as results hands ownership over (:class:`Handover`): whoever
unpickles them owns the names from then on. Signal handlers and forks may
come at any bytecode: see :func:`unlink_owned_and_die`.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import weakref
from typing import Any

import numpy as np

from . import _names, _posix, _shared, _space
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


class Ownership:
    """The creating process's claim on a segment's name."""

    def __init__(self, mapping: _shared.SharedMapping) -> None:
        self.pid = os.getpid()
        self.finalizer = weakref.finalize(mapping, _owner_unlink, mapping.name, self.pid)


_owned: "weakref.WeakKeyDictionary[_shared.SharedMapping, Ownership]" = weakref.WeakKeyDictionary()


# In a worker of shmalloc: the pid of the process its results go to. New names carry it, because
# that process takes over the arrays returned to it, and cleanup tools judge a name by its pid.
_receiver_pid: int | None = None


def name_for_receiver(pid: int) -> None:
    """In a worker: new ShmArrays get names carrying ``pid``, the process that receives its results."""
    global _receiver_pid
    _receiver_pid = pid


def new_mapping(nbytes: int) -> _shared.SharedMapping:
    """A new segment of ``nbytes`` (at least 1), owned by this process, mapped shared."""
    name = _names.generate(_receiver_pid)
    _owned_names.add(name)
    try:
        mapping = _space.retry_on_enospc(_shared.create_shared, name, max(nbytes, 1))  # mmap and fallocate refuse 0 bytes
    except BaseException:
        _owned_names.discard(name)  # create_shared left nothing
        raise
    with _lock:
        _owned[mapping] = Ownership(mapping)
        _mappings[name] = mapping
    return mapping


def attach(name: str, size: int, inode: int) -> _shared.SharedMapping:
    """This process's mapping of an existing segment (made once per process and segment)."""
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


def mapping_of(array: np.ndarray) -> _shared.SharedMapping | None:
    """The shared mapping that ``array``'s memory lies in, found through its base chain."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, _shared.SharedMapping) else None


def ownership_of(mapping: _shared.SharedMapping | None) -> Ownership | None:
    """This process's claim on ``mapping``'s name, if it owns it (None elsewhere)."""
    ownership = _owned.get(mapping) if mapping is not None else None
    return ownership if ownership is not None and ownership.pid == os.getpid() else None


def take_over(mapping: _shared.SharedMapping) -> None:
    """Make this process the owner of ``mapping``'s name (an array handed over as a result)."""
    with _lock:
        if ownership_of(mapping) is None:
            _owned_names.add(mapping.name)
            _owned[mapping] = Ownership(mapping)


def joins_handover(mapping: _shared.SharedMapping) -> bool:
    """Whether ``mapping``, pickled now by this thread, passes its name's ownership on (see :class:`Handover`)."""
    handover = getattr(_handing_over, "current", None)
    return handover is not None and handover.join(mapping)


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

    def join(self, mapping: _shared.SharedMapping) -> bool:
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
