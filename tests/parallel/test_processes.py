"""Handles crossing real process boundaries: fork, spawn, forkserver."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

import shmalloc

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


def make_array(n: int, copy: bool) -> shmalloc.ShmObj:
    """Runs in a child: put a recognisable array into shared memory."""
    return shmalloc.copy2shm(np.arange(n, dtype=np.float64).reshape(-1, 10, order="F") * 3, copy=copy)


def consume(obj: shmalloc.ShmObj) -> tuple[float, tuple[int, ...], bool, str]:
    """Runs in a child: take the array out of shared memory, report what it saw."""
    from numpy._core.multiarray import get_handler_name

    y = shmalloc.allocate_from_shm(obj)
    return float(y.sum()), y.shape, bool(y.flags.f_contiguous), get_handler_name(y)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", START_METHODS)
def test_child_creates_parent_allocates(method, copy, map_every_size):
    """A child process creates the object; the parent consumes it."""
    with mp.get_context(method).Pool(1) as pool:
        obj = pool.apply(make_array, (100_000, copy))
    y = shmalloc.allocate_from_shm(obj)
    expected = np.arange(100_000, dtype=np.float64).reshape(-1, 10, order="F") * 3
    assert np.array_equal(y, expected) and y.flags.f_contiguous
    assert y.flags.owndata and (y.base is None)
    assert not os.path.exists("/dev/shm" + obj.name)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", START_METHODS)
def test_parent_creates_child_allocates(method, copy):
    """The parent creates the object; a child consumes it (and unlinks the name)."""
    x = np.arange(200_000, dtype=np.float64).reshape(-1, 10)  # 1.6 MB: mapped with copy=False
    obj = shmalloc.copy2shm(x, copy=copy)
    with mp.get_context(method).Pool(1) as pool:
        total, shape, _, handler = pool.apply(consume, (obj,))
    assert total == float(x.sum()) and shape == x.shape
    assert handler == ("default_allocator" if copy else "shmalloc")
    assert not os.path.exists("/dev/shm" + obj.name)


def _write_in_child(conn, index: int) -> None:
    global _shared
    _shared[index] = -1.0
    conn.send(float(_shared.sum()))
    conn.close()


@pytest.mark.skipif("fork" not in START_METHODS, reason="needs fork")
def test_copy_on_write_after_fork():
    """Writes in a forked child are private to it; the parent's writes are not seen by the child."""
    global _shared
    x = np.ones(1_000_000)
    _shared = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=False)
    ctx = mp.get_context("fork")
    try:
        _shared[0] = 5.0  # before the fork: the child sees it
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_write_in_child, args=(child_end, 1))
        child.start()
        child_sum = parent_end.recv()
        child.join()
        _shared[2] = 7.0  # after the fork: private to the parent
        assert child_sum == x.sum() + 4 - 2  # the child's own write, the parent's earlier write
        assert _shared[1] == 1.0, "the child's write must not reach the parent"
        siblings = []
        for index in (3, 4):
            parent_end, child_end = ctx.Pipe()
            sibling = ctx.Process(target=_write_in_child, args=(child_end, index))
            sibling.start()
            siblings.append(parent_end.recv())
            sibling.join()
        # each sibling sees the parent's writes and its own, never the other's
        assert siblings == [x.sum() + 4 + 6 - 2] * 2
    finally:
        del _shared
