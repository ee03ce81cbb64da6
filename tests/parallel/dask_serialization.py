"""shmalloc.dask's serialization family, in one process (no cluster).

Not collected with the suite: importing distributed changes how every
exception class defined so far pickles (it installs tblib's reducers), which
other tests rely on. ``test_dask.py`` runs this file with pytest in a
process of its own.
"""
from __future__ import annotations

import os
import pickle
import socket
import threading

import dask
import numpy as np
import pandas as pd
import pytest
from distributed.protocol.serialize import deserialize, serialize

import shmalloc
import shmalloc.dask as shm_dask

LOCAL = {"recipient": {"address": "tcp://127.0.0.1:8786"}}
REMOTE = {"recipient": {"address": "tcp://203.0.113.7:8786"}}  # TEST-NET-3: never this host


def _frame(rows: int = 200_000) -> pd.DataFrame:
    frame = pd.DataFrame({
        "x": np.arange(rows) * 0.5,
        "y": np.arange(rows) % 3 == 0,
        "z": np.arange(rows, dtype=np.int32),
        "c": pd.Categorical(np.array(["a", "b", "c"])[np.arange(rows) % 3]),
    })
    frame.attrs["unit"] = "m"
    return frame


def _handler(array: np.ndarray) -> str:
    from numpy._core.multiarray import get_handler_name

    while isinstance(array.base, np.ndarray):
        array = array.base
    return get_handler_name(array)


def test_serializing_starts_no_thread():
    """Serializing through the family starts no thread (a process that forks later must have none)."""
    before = threading.active_count()
    header, frames = serialize(_frame(), serializers=shm_dask.SERIALIZERS, context=LOCAL)
    deserialize(header, frames)
    assert threading.active_count() == before


def test_a_large_frame_bound_for_this_host_goes_through_shared_memory_and_comes_back_exact():
    """A large frame for a local recipient is a handle; deserializing maps it (writable, shmalloc's handler), equal with its attrs, name gone."""
    frame = _frame()
    before = shm_dask.transfers()
    header, frames = serialize(frame, serializers=shm_dask.SERIALIZERS, context=LOCAL)
    assert header["serializer"] == "shmalloc"
    assert sum(memoryview(f).nbytes for f in frames) < 4096  # the handle, not the data
    assert len(_ours()) == 1
    got = deserialize(header, frames)
    assert not _ours()
    pd.testing.assert_frame_equal(got, frame)
    assert got.attrs == {"unit": "m"}
    assert _handler(got["x"].to_numpy()) == "shmalloc"
    got.loc[0, "x"] = -1.0  # writable, private
    assert got.loc[0, "x"] == -1.0 and frame.loc[0, "x"] == 0.0
    after = shm_dask.transfers()
    assert after["sent"] == before["sent"] + 1 and after["received"] == before["received"] + 1
    assert after["sent_bytes"] - before["sent_bytes"] >= frame.memory_usage(index=False).sum()


def test_an_array_comes_back_writable_and_owned_by_shmalloc():
    array = np.random.default_rng(0).random((700, 300))
    header, frames = serialize(array, serializers=shm_dask.SERIALIZERS, context=LOCAL)
    assert header["serializer"] == "shmalloc"
    got = deserialize(header, frames)
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable and _handler(got) == "shmalloc"


class _Frame(pd.DataFrame):
    """A subclass of another module: a receiver may not be able to import it."""


class _Label:
    """A class of another module, as a label or in attrs."""


def _with_attrs(frame: pd.DataFrame, **attrs: object) -> pd.DataFrame:
    frame.attrs.update(attrs)
    return frame


@pytest.mark.parametrize("value", [
    {"a": np.arange(300_000.0)},
    np.array([object()] * 300_000),
    pd.DataFrame({"o": [object()] * 300_000}),
    np.broadcast_to(np.arange(300_000.0)[:, None], (300_000, 200)),
    np.arange(600_000.0)[::2],
    _Frame({"x": np.arange(300_000.0)}),
    _with_attrs(pd.DataFrame({"x": np.arange(300_000.0)}), unit=_Label()),
    pd.Series(np.arange(300_000.0), name=_Label()),
    pd.DataFrame({"x": np.arange(300_000.0)}, index=pd.RangeIndex(300_000, name=_Label())),
], ids=["dict", "object-array", "object-column", "broadcast", "strided", "foreign-subclass", "foreign-attrs", "foreign-name", "foreign-index-name"])
def test_objects_the_receiver_might_not_rebuild_or_that_would_grow_go_dasks_own_way(value):
    """Other types, Python objects (their pickles may name classes only cloudpickle sends), non-contiguous views (a broadcast view's copy is far larger than sizeof says) and subclasses from other modules: no segment."""
    header, _ = serialize(value, serializers=shm_dask.SERIALIZERS, context=LOCAL, iterate_collection=False)
    assert header["serializer"] != "shmalloc"
    assert not _ours()


def test_a_frame_with_a_multiindex_and_strings_goes_through_shared_memory():
    rows = 100_000
    frame = pd.DataFrame({"s": pd.array([f"s{i % 7}" for i in range(rows)], dtype="string"), "x": np.arange(rows) * 1.5},
                         index=pd.MultiIndex.from_arrays([np.arange(rows) % 3, np.arange(rows)]))
    header, frames = serialize(frame, serializers=shm_dask.SERIALIZERS, context=LOCAL)
    assert header["serializer"] == "shmalloc"
    pd.testing.assert_frame_equal(deserialize(header, frames), frame)


@pytest.mark.parametrize("context", [REMOTE, None, {"recipient": {}}, {"recipient": "not an address"}], ids=["remote", "none", "no-address", "garbage"])
def test_a_recipient_not_known_to_be_on_this_host_gets_dasks_own_serialization(context):
    """Bound for another host (or an unknown one), the frame goes Dask's own way and no segment is made."""
    header, frames = serialize(_frame(), serializers=shm_dask.SERIALIZERS, context=context)
    assert header["serializer"] in ("dask", "pickle")
    assert not _ours()
    pd.testing.assert_frame_equal(deserialize(header, frames), _frame())


def test_small_objects_go_dasks_own_way_and_the_threshold_is_a_dask_setting():
    small = np.arange(1000.0)
    header, _ = serialize(small, serializers=shm_dask.SERIALIZERS, context=LOCAL)
    assert header["serializer"] == "dask"
    with dask.config.set({"shmalloc.threshold": 1000}):
        header, frames = serialize(small, serializers=shm_dask.SERIALIZERS, context=LOCAL)
        assert header["serializer"] == "shmalloc"
        np.testing.assert_array_equal(deserialize(header, frames), small)


def test_same_host():
    assert shm_dask.same_host("tcp://127.0.0.1:1")
    assert shm_dask.same_host("tcp://[::1]:1")
    assert shm_dask.same_host(f"tcp://{socket.gethostname()}:1")
    assert shm_dask.same_host("inproc://10.1.2.3/1/2")
    for address in ["tcp://203.0.113.7:1", "tcp://example.invalid:1", None, "", "no scheme"]:
        assert not shm_dask.same_host(address), address


def test_a_damaged_message_is_a_clear_error_and_maps_nothing():
    header, frames = serialize(_frame(), serializers=shm_dask.SERIALIZERS, context=LOCAL)
    with pytest.raises(shmalloc.CorruptHandleError, match="one shmalloc handle"):
        deserialize(header, [pickle.dumps("not a handle")])
    with pytest.raises(shmalloc.CorruptHandleError, match="one shmalloc handle"):
        deserialize(header, [*frames, b""])
    deserialize(header, frames)  # the real one still works, once
    with pytest.raises(shmalloc.ShmError) as info:
        deserialize(header, frames)
    assert info.value.errno == 2  # ENOENT: consumed


def test_the_sweep_removes_what_was_handed_out_and_never_consumed():
    """Names handed out whose messages were lost are removed after the linger time; consumed ones are just forgotten."""
    lost = serialize(_frame(), serializers=shm_dask.SERIALIZERS, context=LOCAL)
    kept = serialize(_frame(), serializers=shm_dask.SERIALIZERS, context=LOCAL)
    deserialize(*kept)
    assert len(_ours()) == 1
    assert shm_dask._sent.sweep(3600.0) == 0 and len(_ours()) == 1
    assert shm_dask._sent.sweep(0.0) == 1
    assert not _ours()
    with pytest.raises(shmalloc.ShmError):
        deserialize(*lost)


def _ours() -> set[str]:
    """shmalloc's names in /dev/shm made since this module was imported (not another process's leftovers)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("shmalloc_")} - _ALREADY_THERE


_ALREADY_THERE = set(os.listdir("/dev/shm"))
