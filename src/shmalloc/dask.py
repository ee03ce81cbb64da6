"""Dask on one host: large arrays and frames between its processes through shared memory.

Drop-in for distributed's own classes::

    from shmalloc.dask import Client, LocalCluster

    with LocalCluster(n_workers=2) as cluster, Client(cluster) as client:
        frames = client.gather(client.map(make_frame, range(8)))

A message between two processes of this host that carries data directly
(a worker's results to the client, data scattered to a worker, one worker's
results fetched by another) carries each large numpy array or pandas object
as a :func:`shmalloc.copy2shm` handle instead of its bytes; the receiver
maps it (:func:`shmalloc.allocate_from_shm` with ``copy=False``): writable
arrays that own a private, copy-on-write mapping, no copy. The rest goes
Dask's own way: small objects, other types, messages to or through the
scheduler (it keeps or relays them, e.g. a published dataset), messages to
another host, and objects that cannot be put into /dev/shm (full).

:class:`Client` sets up every worker and nanny of the cluster it connects
to (a worker plugin and a nanny plugin), so any cluster of this host works;
:class:`LocalCluster` also preloads the module. The workers must be able to
import shmalloc.

What is left behind, and who removes it: a receiver removes the name as it
maps the object. A sender keeps the names it handed out; those not consumed
after ``linger`` seconds (the message was lost) are removed by it, and a
process removes the rest when it exits or, for a worker, closes. A worker
that was killed cannot: its nanny removes what it left (that pid, dead)
after ``leftover-age`` seconds, and
:class:`LocalCluster` removes the rest when it closes; ``shmalloc gc``
collects any other orphan. The settings are Dask configuration keys, see
:data:`DEFAULTS`.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import ipaddress
import os
import pickle
import socket
import threading
import time
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import dask.config
import distributed
import numpy as np
import pandas as pd
from dask.sizeof import sizeof
from distributed.comm.addressing import get_address_host, parse_address
from distributed.core import Status
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin
from distributed.protocol.serialize import register_serialization_family
from tornado.ioloop import PeriodicCallback

from ._api import allocate_from_shm, copy2shm, unlink
from ._handle import ShmObj
from ._posix import SHM_DIR
from .errors import CorruptHandleError, ShmError, ShmFallbackWarning
from .tools._cleanup import segments

#: The name of the serialization family, as listed in ``serializers=`` / ``deserializers=``.
NAME = "shmalloc"
#: What a client and workers serialize with: shmalloc first, Dask's own families after it.
SERIALIZERS = (NAME, "dask", "pickle")
#: What they accept: also Dask's message for an object that could not be serialized.
DESERIALIZERS = (*SERIALIZERS, "error")
#: Dask configuration keys (``dask.config.set({"shmalloc.threshold": ...})``; workers get the
#: client's configuration from their nanny) and their defaults:
#: ``threshold``: objects smaller than this (bytes, as ``dask.sizeof`` counts them) go Dask's own way;
#: ``linger``: seconds after which a sender removes an object it handed out that nobody consumed;
#: ``leftover-age``: seconds after which a nanny removes what its dead worker left behind;
#: ``sweep-interval``: seconds between two such collections.
DEFAULTS = {"threshold": 1 << 20, "linger": 300.0, "leftover-age": 30.0, "sweep-interval": 10.0}


def setting(key: str) -> Any:
    """The value of ``shmalloc.<key>`` in Dask's configuration, else its default in :data:`DEFAULTS`."""
    return dask.config.get(f"{NAME}.{key}", DEFAULTS[key])


class _Sent:
    """The names this process handed out and not yet seen consumed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every name, with a new lock: in a forked child, the names are its parent's to remove."""
        self._lock = threading.Lock()
        self._created: dict[str, float] = {}
        self._swept = time.monotonic()

    def add(self, name: str) -> None:
        with self._lock:
            self._created[name] = time.monotonic()

    def sweep(self, linger: float) -> int:
        """Forget consumed names; remove those older than ``linger`` seconds. Return how many were removed."""
        now = time.monotonic()
        listed = SHM_DIR.is_dir()  # where names show as files, consumed ones are forgotten at once
        with self._lock:
            names = list(self._created.items())
        removed = 0
        for name, created in names:
            young = now - created < linger
            if young and (not listed or (SHM_DIR / name.lstrip("/")).exists()):
                continue
            with self._lock:
                self._created.pop(name, None)
            if young:
                continue
            try:
                unlink(name)
                removed += 1
            except ShmError:
                pass  # consumed: the receiver removed the name
        return removed

    def sweep_if_due(self) -> None:
        """Sweep with the configured linger time, if the last sweep is a ``sweep-interval`` ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept < setting("sweep-interval"):
                return
            self._swept = now
        self.sweep(setting("linger"))


_sent = _Sent()
atexit.register(_sent.sweep, 0.0)
os.register_at_fork(after_in_child=_sent.reset)


class _Counts:
    """What went through shared memory in this process (see :func:`transfers`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = dict.fromkeys(("sent", "sent_bytes", "received", "received_bytes", "fallbacks"), 0)

    def add(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self.values[key] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)

    def new_lock(self) -> None:
        """In a forked child: the parent's lock may have been held by a thread that does not exist here."""
        self._lock = threading.Lock()


_counts = _Counts()
os.register_at_fork(after_in_child=_counts.new_lock)


def transfers() -> dict[str, int]:
    """Count what this process sent and received through shared memory.

    Returns
    -------
    dict
        ``sent`` and ``received``: objects; ``sent_bytes`` and
        ``received_bytes``: the size of their shared memory objects;
        ``fallbacks``: large objects bound for this host that went Dask's own
        way because they could not go through shared memory (e.g. a full
        /dev/shm).
    """
    return _counts.snapshot()


@cache
def _local_hosts() -> frozenset[str]:
    hosts = {"localhost", socket.gethostname(), socket.getfqdn()}
    try:
        import psutil  # a dependency of distributed

        for addresses in psutil.net_if_addrs().values():
            hosts.update(address.address.split("%")[0] for address in addresses)
    except (ImportError, OSError):
        pass
    return frozenset(hosts)


def same_host(address: str | None) -> bool:
    """Whether a Dask address (``"tcp://127.0.0.1:8786"``) is a process on this host.

    Parameters
    ----------
    address : str or None
        The address; None (unknown) is not on this host.
    """
    if not address:
        return False
    try:
        scheme, _ = parse_address(address)
        if scheme == "inproc":
            return True
        host = get_address_host(address)
    except (ValueError, TypeError):
        return False
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass  # a host name
    return host in _local_hosts()


def _recipient(context: dict | None) -> str | None:
    """The address of the process a message goes to (Dask's comms give the peer's handshake, with its address)."""
    recipient = (context or {}).get("recipient")
    if isinstance(recipient, dict):
        recipient = recipient.get("address")
    return recipient if isinstance(recipient, str) else None


def _fits(x: Any) -> bool:
    """Whether ``x`` is an object this path takes: a numpy array or pandas object a receiver can rebuild.

    Objects of other types, arrays or columns of Python objects, and names or ``attrs`` holding
    anything but builtin values go Dask's own way: their pickles may name classes of ``__main__``
    that only cloudpickle sends. Non-contiguous arrays do too: they
    may be broadcast views, whose logical size is far above what ``dask.sizeof`` counts.
    """
    if isinstance(x, np.ndarray):
        return _from_library(x) and not x.dtype.hasobject and (x.flags.c_contiguous or x.flags.f_contiguous)
    if not (_from_library(x) and _plain_value(x.attrs)):
        return False
    if isinstance(x, pd.DataFrame):
        return all(map(_no_objects, x.dtypes)) and _plain_index(x.columns) and _plain_index(x.index)
    if isinstance(x, pd.Series):
        return _no_objects(x.dtype) and _plain_value(x.name) and _plain_index(x.index)
    if isinstance(x, pd.Index):
        return _plain_index(x)
    return False


def _plain_value(value: Any) -> bool:
    """Whether ``value`` (a label, the attrs) is made of builtin scalars and containers, which any receiver unpickles."""
    if value is None or isinstance(value, (str, bytes, int, float, complex, np.generic)):
        return type(value).__module__ in ("builtins", "numpy")
    if isinstance(value, dict):
        return type(value) is dict and all(_plain_value(k) and _plain_value(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value) in (list, tuple) and all(map(_plain_value, value))
    return False


def _no_objects(dtype: Any) -> bool:
    if isinstance(dtype, pd.CategoricalDtype):
        return _no_objects(dtype.categories.dtype)
    return not (isinstance(dtype, np.dtype) and dtype.hasobject)


def _plain_index(index: pd.Index) -> bool:
    if not _plain_value(list(index.names)):
        return False
    if isinstance(index, pd.MultiIndex):
        return all(_no_objects(level.dtype) for level in index.levels)
    return _no_objects(index.dtype)


def _from_library(x: Any) -> bool:
    return type(x).__module__.split(".")[0] in ("numpy", "pandas")


def _dumps(x: Any, context: dict | None = None) -> tuple[dict, list[bytes]]:
    """Put ``x`` into shared memory if it is large and bound for this host; else defer to the next family."""
    if not _fits(x) or sizeof(x) < setting("threshold") or not same_host(_recipient(context)):
        raise NotImplementedError
    _sent.sweep_if_due()
    try:
        handle = copy2shm(x, copy=False)
    except ShmError as exc:
        _counts.add(fallbacks=1)
        warnings.warn(f"shmalloc: a {type(x).__name__} goes Dask's own way, not through shared memory: {exc}",
                      ShmFallbackWarning, stacklevel=2)
        raise NotImplementedError from exc
    except Exception as exc:  # e.g. MemoryError: Dask's own families decide (copy2shm leaves nothing)
        raise NotImplementedError from exc
    _sent.add(handle.name)
    _counts.add(sent=1, sent_bytes=handle.size)
    return {}, [pickle.dumps(handle, protocol=pickle.HIGHEST_PROTOCOL)]


def _loads(header: dict, frames: list) -> Any:
    """Map the object a handle names (zero-copy, private); its name is removed."""
    # Dask trusts its peers' pickles; the handle is checked against the segment before anything is mapped.
    handle = pickle.loads(frames[0]) if len(frames) == 1 else None
    if not isinstance(handle, ShmObj):
        raise CorruptHandleError(f"a {NAME!r} message must carry one shmalloc handle, got {len(frames)} frames")
    value = allocate_from_shm(handle, copy=False)
    _counts.add(received=1, received_bytes=handle.size)
    return value


def register() -> None:
    """Register the serialization family "shmalloc" with Dask (importing this module does it)."""
    register_serialization_family(NAME, _dumps, _loads)


register()


# --- preload: `--preload shmalloc.dask` for workers, `--preload-nanny shmalloc.dask` for nannies ---------


class _Leftovers:
    """The pids of a nanny's worker processes, and the collection of what they left when they died."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every pid, with a new lock: a forked child is no nanny."""
        self._lock = threading.Lock()
        self.pids: set[int] = set()
        self._collected = 0.0

    def note(self, pid: int | None) -> None:
        if pid:
            with self._lock:
                self.pids.add(pid)

    def collect_if_due(self, older_than: float) -> None:
        """Collect, unless another nanny of this process did less than a ``sweep-interval`` ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._collected < setting("sweep-interval") / 2:
                return
            self._collected = now
        self.collect(older_than)

    def collect(self, older_than: float) -> int:
        """Remove the segments of dead workers at least ``older_than`` seconds old; return how many."""
        with self._lock:
            pids = set(self.pids)
        if not pids:
            return 0
        table = segments()
        dead = table[table["pid"].isin(pids) & ~table["alive"] & (table["age"] >= older_than)]
        removed = 0
        for name in dead["name"].tolist():
            try:
                unlink(str(name))
                removed += 1
            except ShmError:
                pass  # consumed meanwhile
        return removed


_leftovers = _Leftovers()
os.register_at_fork(after_in_child=_leftovers.reset)


_LOOK_MS = 50  # how often a nanny notes its worker's pid: its worker takes longer than that to start


def dask_setup(server: Any) -> None:
    """Set up a worker or a nanny (Dask's preload hook; the plugins of :class:`Client` call it too).

    A worker fetches its peers' data with :data:`SERIALIZERS` and removes
    what it handed out and nobody consumed; a nanny notes its workers' pids
    and removes what they left when they died. A second call does nothing.
    """
    if "shmalloc-sweep" in server.periodic_callbacks:
        return
    if isinstance(server, distributed.Nanny):
        callbacks = {
            "shmalloc-workers": (lambda: _leftovers.note(server.pid), _LOOK_MS),
            "shmalloc-sweep": (lambda: _leftovers.collect_if_due(setting("leftover-age")), setting("sweep-interval") * 1000),
        }
    elif isinstance(server, distributed.Worker):
        # Worker to worker: the worker asks its peers for data with these, and they answer with them.
        # (Its rpc to the scheduler was made before, with Dask's own: the scheduler keeps what it gets.)
        server.rpc.serializers = list(SERIALIZERS)
        server.rpc.deserializers = list(DESERIALIZERS)
        callbacks = {"shmalloc-sweep": (_sent.sweep_if_due, setting("sweep-interval") * 1000)}
    else:
        return  # a scheduler: it needs the family registered (importing this module) and nothing more
    for name, (call, milliseconds) in callbacks.items():
        callback = PeriodicCallback(functools.partial(_discard_result, call), milliseconds)
        callback.start()
        server.periodic_callbacks[name] = callback


def _discard_result(call: Callable[[], object]) -> None:
    call()


def dask_teardown(server: Any) -> None:
    """At a worker's close (Dask's preload hook; the worker plugin calls it too): remove what it handed out and
    nobody consumed, if it runs in a process of its own (it has a nanny; a forked one ends without ``atexit``).

    Only while the worker closes: a plugin is also torn down when a client registers it again, and the
    worker's objects then in flight must stay.
    """
    closing = getattr(server, "status", None) in (Status.closing, Status.closing_gracefully)
    if isinstance(server, distributed.Worker) and server.nanny and closing:
        _sent.sweep(0.0)


class _WorkerSetup(WorkerPlugin):
    """Runs :func:`dask_setup` on every worker, present and future."""

    name = "shmalloc-worker"

    def setup(self, worker: Any) -> None:
        dask_setup(worker)

    def teardown(self, worker: Any) -> None:
        dask_teardown(worker)


class _NannySetup(NannyPlugin):
    """Runs :func:`dask_setup` on every nanny, present and future (without restarting its worker)."""

    name = "shmalloc-nanny"
    restart = False

    def setup(self, nanny: Any) -> None:
        dask_setup(nanny)


# --- drop-in cluster and client ---------------------------------------------------------------------------


class LocalCluster(distributed.LocalCluster):
    """:class:`distributed.LocalCluster` whose workers and nannies load :mod:`shmalloc.dask`.

    Takes the arguments of :class:`distributed.LocalCluster`; ``preload``
    and ``preload_nanny`` get this module added. After closing, it removes
    whatever its killed workers left in /dev/shm.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["preload"] = _with_this_module(kwargs.get("preload"))
        worker_class = kwargs.get("worker_class")
        nannies = kwargs.get("processes") is not False if worker_class is None else issubclass(worker_class, distributed.Nanny)
        if nannies:
            kwargs["preload_nanny"] = _with_this_module(kwargs.get("preload_nanny"))
        super().__init__(*args, **kwargs)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        """Close the cluster (see :meth:`distributed.LocalCluster.close`), then remove its dead workers' leftovers."""
        result = super().close(*args, **kwargs)
        if inspect.isawaitable(result):
            return _then_collect(result)
        _leftovers.collect(0.0)
        return result

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        _leftovers.collect(0.0)


async def _then_collect(closing: Any) -> Any:
    result = await closing
    _leftovers.collect(0.0)
    return result


def _with_this_module(preload: Any) -> list[str]:
    modules = [preload] if isinstance(preload, str) else list(preload or [])
    return modules if __name__ in modules else modules + [__name__]


class Client(distributed.Client):
    """:class:`distributed.Client` whose direct transfers with workers of this host go through shared memory.

    Takes the arguments of :class:`distributed.Client`, with
    ``direct_to_workers`` True by default: results come from the workers
    themselves (through the scheduler they would go Dask's own way). It sets
    up every worker and nanny of the cluster (plugins named
    ``"shmalloc-worker"`` and ``"shmalloc-nanny"``). Without an address it
    starts a :class:`LocalCluster` of its own, closed with it (not with
    ``asynchronous=True``: pass a cluster then), unless Dask's configuration
    names one (``scheduler-address``).
    """

    def __init__(self, address: Any = None, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("direct_to_workers", True)
        self._own_cluster: LocalCluster | None = None
        if address is None and "scheduler_file" not in kwargs and not dask.config.get("scheduler-address", None):
            if kwargs.get("asynchronous"):
                raise ValueError("shmalloc.dask.Client(asynchronous=True) needs a cluster or an address")
            cluster_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key not in _CLIENT_ARGUMENTS}
            self._own_cluster = address = LocalCluster(**cluster_kwargs)
        super().__init__(address, *args, **kwargs)
        if not self.asynchronous:
            self.set_up_workers()

    def set_up_workers(self) -> Any:
        """Set up the cluster's workers and nannies and start using shared memory (done at start unless
        ``asynchronous``: then await this once the client has started)."""
        registered = [self.register_plugin(_WorkerSetup()), self.register_plugin(_NannySetup())]
        if self.asynchronous:
            return self._use_shared_memory_after(registered)
        self._use_shared_memory()
        return None

    async def _use_shared_memory_after(self, registrations: list) -> None:
        for registration in registrations:
            await registration
        self._use_shared_memory()

    def _use_shared_memory(self) -> None:
        # Only once the workers know the family. The rpc to the scheduler was made at start, with Dask's
        # own families, and keeps them.
        self.rpc.serializers = list(SERIALIZERS)
        self.rpc.deserializers = list(DESERIALIZERS)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        """Close the client (see :meth:`distributed.Client.close`) and the cluster it started."""
        result = super().close(*args, **kwargs)
        if self._own_cluster is not None:
            self._own_cluster.close()
            self._own_cluster = None
        return result


_CLIENT_ARGUMENTS = frozenset(inspect.signature(distributed.Client.__init__).parameters)
