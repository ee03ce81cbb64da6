"""Zero-copy adoption: whatever Python code runs on the thread meanwhile, each array owns exactly its own mapping."""
from __future__ import annotations

import errno
import gc
import mmap
import os
import signal
import sys

import numpy as np
import pytest
from numpy._core.multiarray import get_handler_name

import shmalloc
from shmalloc import _adopt, _format, _posix

# Small segments are read rather than mapped unless a test says otherwise: these test the mappings.
pytestmark = pytest.mark.usefixtures("map_every_size")

# Each stored array fills one page, so that any array the intruding code allocates
# (np.zeros(512) of float64: one page as well) would fit the mapping.
ITEMS = 512


def _zero_copy_round_trips(count: int) -> list[str]:
    """``count`` zero-copy round trips of one-page arrays; a description of each wrong result."""
    wrong = []
    base = np.arange(ITEMS, dtype=np.float64)
    for i in range(count):
        x = base + i
        y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=False)
        if not np.array_equal(x, y) or get_handler_name(y) != "shmalloc":
            wrong.append(f"round trip {i}: {get_handler_name(y)} array, first items {y[:3].tolist()}")
    return wrong


def _allocate_and_check(faults: list[str], where: str) -> None:
    """Allocate a fresh zeroed array, as any code on the thread may; note it if it is not numpy's own zeros."""
    z = np.zeros(ITEMS)
    if z.any() or get_handler_name(z) != "default_allocator":
        faults.append(f"{where}: np.zeros gave a {get_handler_name(z)} array holding {z[:3].tolist()}")


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_signal_handler_allocating_arrays_never_takes_a_mapping():
    """With a SIGALRM handler allocating np.zeros(512) every 200 us, 20,000 zero-copy round
    trips all return the stored data and the handler always gets fresh zeros."""
    faults: list[str] = []
    calls = [0]

    def handler(signum, frame):
        calls[0] += 1
        _allocate_and_check(faults, "signal handler")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 200e-6, 200e-6)
    try:
        wrong = _zero_copy_round_trips(20_000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert calls[0] > 1000, "the timer hardly fired: the test proved nothing"
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:3]}"
    assert not faults, f"{len(faults)} bad allocations in the handler, e.g. {faults[:3]}"


class _AllocatesWhenCollected:
    """Cyclic garbage whose finaliser allocates an array and, while ``rearm`` holds, leaves new cyclic garbage behind."""

    def __init__(self, state: dict) -> None:
        self.cycle = self
        self.state = state

    def __del__(self) -> None:
        self.state["runs"] += 1
        _allocate_and_check(self.state["faults"], "finaliser")
        # a zero-copy round trip of its own, nested inside whatever the thread was doing
        x = np.full(ITEMS, float(self.state["runs"]))
        y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=False)
        if not np.array_equal(x, y) or get_handler_name(y) != "shmalloc":
            self.state["faults"].append(f"finaliser: its own round trip gave {y[:3].tolist()}")
        if self.state["rearm"]:
            _AllocatesWhenCollected(self.state)


def test_finalisers_run_by_the_collector_never_take_a_mapping():
    """With the collector running at almost every allocation and each collection running a
    finaliser that allocates an array and makes a zero-copy round trip of its own, all
    zero-copy round trips return the stored data."""
    state = {"faults": [], "runs": 0, "rearm": True}
    thresholds = gc.get_threshold()
    _AllocatesWhenCollected(state)
    gc.set_threshold(1, 1_000_000, 1_000_000)  # young collections only: full ones would take minutes
    try:
        wrong = _zero_copy_round_trips(1_000)  # finalisers run tens of times during each
    finally:
        gc.set_threshold(*thresholds)
        state["rearm"] = False
        gc.collect()
    assert state["runs"] > 10_000, "the finaliser hardly ran: the test proved nothing"
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:3]}"
    assert not state["faults"], f"{len(state['faults'])} bad allocations in finalisers, e.g. {state['faults'][:3]}"


@pytest.mark.parametrize("install", [sys.setprofile, sys.settrace], ids=["setprofile", "settrace"])
def test_profile_and_trace_hooks_allocating_arrays_never_take_a_mapping(install):
    """A profile or trace hook that allocates an array at every event it sees leaves every
    zero-copy round trip correct and always gets fresh zeros itself."""
    faults: list[str] = []
    events = [0]

    def hook(frame, event, arg):
        events[0] += 1
        _allocate_and_check(faults, f"{install.__name__} hook ({event})")
        return hook

    install(hook)
    try:
        wrong = _zero_copy_round_trips(2_000)
    finally:
        install(None)
    assert events[0] > 2_000
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:3]}"
    assert not faults, f"{len(faults)} bad allocations in the hook, e.g. {faults[:3]}"


# ---- what each zero-copy array is ----


def _mapping_at(address: int) -> tuple[int, str] | None:
    """File offset and path of the mapping that starts at ``address`` in /proc/self/maps, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if int(fields[0].split("-")[0], 16) == address:
                return int(fields[2], 16), fields[5].strip() if len(fields) > 5 else ""
    return None


DTYPES = [np.bool_, np.int8, np.uint16, np.int32, np.float64, np.longdouble, np.complex128, ">f8", "S5", "U3", "M8[ns]", "V6",
          np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")])]


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_zero_copy_array_is_the_owner_of_its_own_mapping(dtype, order):
    """A zero-copy array's data pointer is the start of a private mapping of its segment's buffer,
    it owns that mapping through shmalloc's handler (owndata, no base), and keeps its order."""
    x = np.asarray(np.random.default_rng(1).integers(0, 256, (5, 7) + (np.dtype(dtype).itemsize,), dtype=np.uint8)
                   .view(dtype).reshape(5, 7), order=order)
    if x.dtype.kind == "U":
        x = np.asarray(np.full((5, 7), "ab\u00e9"), dtype=dtype, order=order)
    obj = shmalloc.copy2shm(x)
    y = shmalloc.allocate_from_shm(obj, copy=False)
    address = y.__array_interface__["data"][0]
    mapping = _mapping_at(address)
    assert mapping is not None, "the data pointer is not the start of a mapping"
    offset, path = mapping
    assert obj.name in path and path.endswith("(deleted)")
    assert offset == obj.size - -(-x.nbytes // _format.PAGE) * _format.PAGE  # the buffer is the segment's last part
    assert get_handler_name(y) == "shmalloc" and y.flags.owndata and y.base is None
    assert y.flags.writeable and y.flags.aligned
    assert y.flags.f_contiguous if order == "F" else y.flags.c_contiguous
    assert y.tobytes(order="A") == x.tobytes(order="A")
    del y
    assert _mapping_at(address) is None or obj.name not in _mapping_at(address)[1]


@pytest.mark.parametrize(
    "bad",
    ["descr", "out-not-a-list", "out-too-long", "out-not-empty", "too-many-dims"],
)
def test_the_core_refuses_bad_arguments_and_registers_nothing(bad):
    """shmalloc_adopt refuses what is not a dtype, an output list holding only None, or a shape numpy
    allows (EINVAL), and then registers nothing: the caller still owns the mapping."""
    from shmalloc._posix import ffi, lib

    fd = _anonymous_object(_format.PAGE)
    address = lib.shmalloc_map(fd, _format.PAGE, 0, 1, ffi.NULL)
    os.close(fd)
    try:
        before = _posix.live_mappings()
        dtype, out, shape = np.dtype(np.uint8), [None], (16,)
        if bad == "descr":
            dtype = "uint8"
        elif bad == "out-not-a-list":
            out = (None,)
        elif bad == "out-too-long":
            out = [None, None]
        elif bad == "out-not-empty":
            out = [0]
        else:
            shape = (1,) * 65
        dims = ffi.new("intptr_t[]", shape)
        owned = ffi.new("int *")
        rc = lib.shmalloc_adopt(
            address, _format.PAGE, ffi.cast("void *", id(dtype)), len(shape), dims, 0, ffi.cast("void *", id(out)), owned
        )
        assert rc == -1 and ffi.errno == errno.EINVAL and owned[0] == 0
        assert _posix.live_mappings() == before and not lib.shmalloc_is_adopted(address)
        assert list(out) in ([None], [None, None], [0])
    finally:
        lib.shmalloc_unmap(address, _format.PAGE)


def _anonymous_object(size: int) -> int:
    """A descriptor of an unnamed memory file of ``size`` zero bytes."""
    fd = os.memfd_create("shmalloc-test")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.allow_unmap_failures
def test_a_failing_munmap_when_an_array_is_freed_is_counted():
    """When numpy frees an adopted array and munmap fails, the core neither crashes nor stays silent:
    the failure is counted, with its errno, for Python to read."""
    region = mmap.mmap(-1, 2 * _format.PAGE)
    start = np.frombuffer(region, np.uint8).__array_interface__["data"][0]
    before, _ = _posix.unmap_failures()
    # An address one byte into the page: munmap refuses it (EINVAL) and unmaps nothing.
    layout = _format.BufferLayout(0, np.dtype(np.uint8), (16,), False)
    out = _posix.MapOut(1)
    array = _adopt._adopt_part("/test", start + 1, _format.PAGE, layout, out, 0)
    assert out.owned(0)
    assert get_handler_name(array) == "shmalloc" and array.flags.owndata
    del array
    count, last = _posix.unmap_failures()
    assert count == before + 1 and last == errno.EINVAL
    assert not _posix.any_adopted([start + 1])
    region.close()


def test_an_array_that_does_not_own_its_mapping_is_never_returned(monkeypatch):
    """If the array the core made did not prove to own the mapping, allocate_from_shm raises instead of
    returning it, and the mapping is still unmapped exactly once."""
    obj = shmalloc.copy2shm([np.arange(5000.0), np.arange(7000.0)])
    before = _posix.live_mappings()
    failures = _posix.unmap_failures()[0]
    monkeypatch.setattr(_adopt, "get_handler_name", lambda array: "default_allocator")
    with pytest.raises(shmalloc.ShmError, match="does not own the mapping"):
        shmalloc.allocate_from_shm(obj, copy=False)
    monkeypatch.undo()
    gc.collect()
    assert _posix.live_mappings() == before and _posix.unmap_failures()[0] == failures
    with open("/proc/self/maps") as maps:
        assert obj.name not in maps.read()
