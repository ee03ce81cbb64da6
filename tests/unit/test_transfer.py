"""The one write path and the one read path: named segments, held (recycled) objects, and the one check of every open."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from numpy._core.multiarray import get_handler_name

import shmalloc
from shmalloc import _format, _names, _transfer
from shmalloc._shared import SPARE_LABEL, RefillMapping


def _held_object(shm_name: str, size: int) -> int:
    """A read-write descriptor of an unlinked object of ``size`` zero bytes, as the Pool's spares are."""
    path = "/dev/shm" + shm_name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "zerocopy"])
def test_named_write_and_read_round_trip_and_consume_the_name(copy):
    """write_named then open_named + read gives the object back, removes the name, and reports as owners
    exactly the zero-copy arrays that hold a mapping."""
    x = np.arange(200_000.0)  # 1.6 MB: mapped with copy=False
    handle = _transfer.write_named([x, np.arange(3)], _names.generate())
    assert os.path.exists("/dev/shm" + handle.name)
    with _transfer.open_named(handle.name, handle.size) as segment:
        assert not os.path.exists("/dev/shm" + handle.name)
        value, owners = _transfer.read(segment, handle, copy)[:2]
    assert np.array_equal(value[0], x) and value[1].tolist() == [0, 1, 2]
    assert bool(owners) != copy and all(get_handler_name(owner) == "shmalloc" for owner in owners)


def test_held_segment_close_leaves_the_descriptor_open(shm_name):
    """A segment opened on a held descriptor reads the object, and closing it leaves the caller's descriptor open."""
    fd = _held_object(shm_name, 1 << 20)
    try:
        handle = _transfer.write_held(np.arange(10_000), fd)
        assert handle.name == SPARE_LABEL and os.fstat(fd).st_size == 1 << 20  # never shrunk
        with _transfer.open_held(fd, SPARE_LABEL, handle.size) as segment:
            value, owners = _transfer.read(segment, handle, copy=True)[:2]
        assert value.tolist() == list(range(10_000)) and owners == []
        os.fstat(fd)  # still open: raises if closing the segment closed it
    finally:
        os.close(fd)


def test_refill_through_the_mapping_and_by_pwrite_give_the_same_object(shm_name):
    """A held object refilled through its refill mapping reads back as the new value; one too large for
    the mapping is written with pwrite instead, and grows the object."""
    fd = _held_object(shm_name, 0)
    try:
        first = _transfer.write_held(np.full(100_000, 1.0), fd)
        mapping = RefillMapping(fd, first.size, first.size)
        try:
            second = _transfer.write_held(np.full(100_000, 2.0), fd, mapping)  # fits: through the mapping
            with _transfer.open_held(fd, SPARE_LABEL, second.size) as segment:
                assert (_transfer.read(segment, second, copy=True)[0] == 2.0).all()
            third = _transfer.write_held(np.full(300_000, 3.0), fd, mapping)  # does not fit: pwrite
            assert os.fstat(fd).st_size == third.size > mapping.length
            with _transfer.open_held(fd, SPARE_LABEL, third.size) as segment:
                assert (_transfer.read(segment, third, copy=True)[0] == 3.0).all()
        finally:
            mapping.close()
    finally:
        os.close(fd)


def test_held_descriptor_of_something_else_is_refused_like_a_named_one(shm_name):
    """The held open makes the checks of the named open: a non-regular object is EINVAL, a short one
    CorruptHandleError (the held check used to say EPERM for both kinds of object)."""
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(shmalloc.ShmError) as info:
            _transfer.open_held(read_end, SPARE_LABEL, 0)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)
    fd = _held_object(shm_name, _format.PAGE)
    try:
        with pytest.raises(shmalloc.CorruptHandleError, match="truncated"):
            _transfer.open_held(fd, SPARE_LABEL, 2 * _format.PAGE)
    finally:
        os.close(fd)


def test_a_failed_named_open_still_unlinks_the_name(shm_name):
    """Opening a name for reading removes it even when the open itself fails (here: a planted symlink,
    which shm_open refuses to follow)."""
    path = "/dev/shm" + shm_name
    os.symlink("/nonexistent-shmalloc-target", path)
    try:
        with pytest.raises(shmalloc.ShmError) as info:
            _transfer.open_named(shm_name, 0)
        assert info.value.errno in (errno.ELOOP, errno.ENOENT) and not os.path.lexists(path)
    finally:
        if os.path.lexists(path):
            os.unlink(path)


@pytest.mark.parametrize("copy", [True, False])
def test_results_sharing_a_recipe_are_rebuilt_each_with_its_own_data(copy, map_every_size, monkeypatch):
    """Frames of one shape have the same recipe, read once and kept: each result still gets its own
    data, columns, index and name, and changing one changes no other."""
    import pandas as pd

    monkeypatch.setattr(_format, "_RECIPES", {})
    index = pd.RangeIndex(5000, name="r")
    frames = [pd.DataFrame({"x": np.arange(5000.0) + i, "s": ["a", "b"] * 2500}, index=index) for i in range(3)]
    handles = [shmalloc.copy2shm(frame) for frame in frames]
    got = [shmalloc.allocate_from_shm(handle, copy=copy) for handle in handles]
    assert len(_format._RECIPES) == 1  # one recipe for the three
    for frame, result in zip(frames, got, strict=True):
        pd.testing.assert_frame_equal(result, frame)
    got[0].loc[0, "x"] = -1.0
    got[0].columns.name = "changed"
    got[0].index.name = "changed"
    pd.testing.assert_frame_equal(got[1], frames[1])
    pd.testing.assert_frame_equal(got[2], frames[2])


@pytest.mark.parametrize("dtype", [np.dtype([("a", "f8"), ("b", "i4")]), np.dtype("f8", metadata={"unit": "m"})])
def test_results_of_one_recipe_never_share_a_dtype_that_can_change(dtype, map_every_size):
    """A structured dtype's names (and a dtype's metadata) can be changed in place, and an array keeps
    the dtype of its recipe: renaming one result's fields changes no other result, and no later read."""
    x = np.zeros(2000, dtype)
    handles = [shmalloc.copy2shm(x) for _ in range(3)]
    first, second = (shmalloc.allocate_from_shm(handle, copy=False) for handle in handles[:2])
    assert first.dtype is not second.dtype
    if dtype.names is not None:
        first.dtype.names = ("p", "q")
        assert second.dtype.names == ("a", "b")
    third = shmalloc.allocate_from_shm(handles[2], copy=False)
    assert third.dtype == dtype and third.dtype.names == dtype.names and third.dtype.metadata == dtype.metadata
