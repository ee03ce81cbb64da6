"""ShmArray: construction, numpy behaviour, pickling by reference, lifetime, and real worker processes."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import gc
import multiprocessing as mp
import os
import pickle
import signal
import time

import numpy as np
import pytest

import shmalloc
from shmalloc import ShmArray, ShmError, _names
from shmalloc._shmarray import _rebuild

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


def _exists(name: str) -> bool:
    return os.path.exists("/dev/shm" + name)


# ---- construction ----

DTYPES = ["float64", "int8", "uint64", "bool", "complex128", "datetime64[ns]", "U3", "S5", [("a", "i4"), ("b", "f8")]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constructors_give_shared_arrays_of_the_asked_layout(dtype):
    """empty/zeros/from_array make shared, owned arrays with the asked shape, dtype and contents."""
    dtype = np.dtype(dtype)
    e = ShmArray.empty((3, 4), dtype)
    z = ShmArray.zeros((3, 4), dtype, order="F")
    x = np.zeros((3, 4), dtype)
    x.view(np.uint8).reshape(-1)[::3] = 7  # arbitrary non-zero bytes of any dtype
    f = ShmArray.from_array(x)
    for a in (e, z, f):
        assert type(a) is ShmArray and a.shared and a.owner and a.dtype == dtype and a.shape == (3, 4)
        assert _exists(a.name) and _names.creator_pid(a.name) == os.getpid()
    assert z.flags.f_contiguous and not z.flags.c_contiguous
    assert z.tobytes() == bytes(z.nbytes)
    assert f.tobytes() == x.tobytes()
    assert len({e.name, z.name, f.name}) == 3


def test_from_array_keeps_fortran_order_converts_dtype_and_accepts_lists():
    """from_array copies with order 'K' by default, converts to a given dtype and takes any array_like."""
    x = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    a = ShmArray.from_array(x)
    assert a.flags.f_contiguous and np.array_equal(a, x)
    b = ShmArray.from_array([[1, 2], [3, 4]], dtype=np.float32)
    assert b.dtype == np.float32 and b.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    c = ShmArray.from_array(x[:, ::2])  # non-contiguous input
    assert c.flags.c_contiguous and np.array_equal(c, x[:, ::2])


def test_zero_size_and_zero_dim_arrays():
    """Empty and 0-d arrays work (the segment holds at least one byte) and pickle by reference."""
    a = ShmArray.empty((0, 5), np.int64)
    s = ShmArray.from_array(np.float64(2.5))
    assert a.shape == (0, 5) and a.shared and s.shape == () and float(s) == 2.5
    a2, s2 = pickle.loads(pickle.dumps((a, s)))
    assert a2.shape == (0, 5) and type(s2) is ShmArray and float(s2) == 2.5
    assert np.shares_memory(s, s2)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: ShmArray.empty(3, object), TypeError),
        (lambda: ShmArray.from_array(np.array([1, "a"], dtype=object)), TypeError),
        (lambda: ShmArray.empty(3, [("a", "O")]), TypeError),
        (lambda: ShmArray.empty((2, -1)), ValueError),
        (lambda: ShmArray.empty(2.5), TypeError),
        (lambda: ShmArray.empty(3, order="X"), ValueError),
        (lambda: ShmArray((3,)), TypeError),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error):
    """Object dtypes, bad shapes or orders and the bare constructor are refused, and nothing is left behind."""
    with pytest.raises(error):
        call()


def test_full_dev_shm_gives_enospc_and_leaves_nothing():
    """Asking for more than /dev/shm holds raises ShmError ENOSPC up front (never SIGBUS later)."""
    st = os.statvfs("/dev/shm")
    too_big = st.f_blocks * st.f_frsize + (1 << 30)
    mine = f"shmalloc_{os.getpid()}_"  # this process's names: other programs may use /dev/shm meanwhile
    before = {n for n in os.listdir("/dev/shm") if n.startswith(mine)}
    with pytest.raises(ShmError) as info:
        ShmArray.empty(too_big, np.uint8)
    assert info.value.errno in (28, 12)  # ENOSPC (or ENOMEM where the kernel says so)
    assert {n for n in os.listdir("/dev/shm") if n.startswith(mine)} - before == set()


# ---- numpy behaviour ----


def test_views_stay_shared_and_results_become_plain_arrays():
    """Slices and views are ShmArrays over the same memory; arithmetic, reductions and copies are plain ndarrays."""
    a = ShmArray.from_array(np.arange(12.0).reshape(3, 4))
    for view in (a[1:], a[:, ::-2], a.T, a.reshape(4, 3), a[1], a.view(np.int64)):
        assert type(view) is ShmArray and view.shared and view.name == a.name
        assert np.shares_memory(view, a)
    for result in (a + 1, a * a, np.sqrt(a), a.sum(axis=0), np.sort(a, axis=None), a.copy(), copy.copy(a), copy.deepcopy(a), a[[0, 2]]):
        assert type(result) is np.ndarray, type(result)
        assert not np.shares_memory(result, a)
    assert isinstance(a.sum(), np.floating) and a.sum() == 66.0
    plain = np.asarray(a)
    assert type(plain) is np.ndarray and np.shares_memory(plain, a)


def test_in_place_operations_write_the_shared_memory():
    """Ufuncs with out= a ShmArray (and augmented assignment) keep the ShmArray and change its memory."""
    a = ShmArray.zeros(5)
    b = a
    a += 3
    np.multiply(a, 2, out=a)
    assert b is a and type(a) is ShmArray and a.shared and a.tolist() == [6.0] * 5


def test_plain_views_keep_the_mapping_alive_after_every_shmarray_is_gone():
    """np.asarray(a) keeps the memory valid when no ShmArray refers to it any more; the name goes with the last one."""
    a = ShmArray.from_array(np.arange(1000.0))
    name = a.name
    plain = np.asarray(a)[::10]
    del a
    gc.collect()
    assert plain.sum() == sum(range(0, 1000, 10))  # still mapped
    plain[0] = 5.0
    del plain
    gc.collect()
    assert not _exists(name)


def test_repr_html_describes_the_array_and_escapes():
    """_repr_html_ shows the segment, role, shape, dtype and size, with HTML escaped."""
    a = ShmArray.from_array(np.array(["<b>", "&"], dtype="U3"))
    text = a._repr_html_()
    assert a.name in text and "owner" in text and "(2,)" in text and "&lt;b&gt;" in text and "<b>" not in text
    a.unlink()
    assert "name removed" in a._repr_html_()
    assert "not shared" in np.zeros(2).view(ShmArray)._repr_html_()


# ---- pickling by reference ----


def test_pickle_is_small_and_maps_the_same_memory():
    """A pickled ShmArray holds a reference, not the data; unpickling in this process reuses the mapping."""
    a = ShmArray.zeros((1000, 1000))  # 8 MB
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(a, protocol=protocol)
        assert len(data) < 1000
        b = pickle.loads(data)
        assert type(b) is ShmArray and np.shares_memory(a, b) and b.name == a.name
        b[0, 0] = protocol
        assert a[0, 0] == protocol


@pytest.mark.parametrize(
    "index",
    [np.s_[2:5], np.s_[::-1, 1:], np.s_[:, ::3], np.s_[4], np.s_[1:2, 3:4]],
    ids=["rows", "reversed", "strided", "row", "block"],
)
@pytest.mark.parametrize("order", ["C", "F"])
def test_views_pickle_as_views(index, order):
    """A view pickles as a view of the same memory: same values, layout and address."""
    a = ShmArray.from_array(np.arange(60.0).reshape(6, 10), order=order)
    view = a[index]
    b = pickle.loads(pickle.dumps(view))
    assert type(b) is ShmArray and b.shape == view.shape and b.strides == view.strides
    assert b.__array_interface__["data"][0] == view.__array_interface__["data"][0]
    assert np.array_equal(b, view)


def test_stray_subclass_views_pickle_by_value():
    """A ShmArray whose memory is not shared (a plain array viewed as one) pickles as a plain ndarray."""
    stray = np.arange(4.0).view(ShmArray)
    assert not stray.shared and stray.name is None
    back = pickle.loads(pickle.dumps(stray))
    assert type(back) is np.ndarray and back.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_damaged_references_raise():
    """Unpickling a reference that does not fit its segment raises; it never maps out of bounds."""
    a = ShmArray.zeros(10)
    _, (name, size, inode, shape, dtype, offset, strides) = a.__reduce_ex__(5)
    with pytest.raises(ValueError):
        _rebuild(name, size, inode, (11,), dtype, offset, strides)  # past the end
    with pytest.raises(ValueError):
        _rebuild(name, size, inode, shape, dtype, size, strides)  # offset outside
    with pytest.raises(ValueError):
        _rebuild(name, size, inode, shape, dtype, 0, (-8,))  # walks before the start
    with pytest.raises(TypeError):
        _rebuild(name, size, inode, shape, object, 0, strides)


def test_reference_to_a_replaced_or_missing_segment_raises(shm_name):
    """A reference whose segment is gone gives ENOENT; one whose size or inode differs gives CorruptHandleError."""
    with pytest.raises(FileNotFoundError):
        _rebuild(shm_name, 80, 1, (10,), np.float64, 0, (8,))
    # with: the caught exceptions' tracebacks keep this frame, and so the array, alive until a gc pass
    with ShmArray.zeros(10) as a:
        _, (name, size, inode, shape, dtype, offset, strides) = a.__reduce_ex__(5)
        with pytest.raises(shmalloc.CorruptHandleError):
            _rebuild(name, size, inode + 1, shape, dtype, offset, strides)  # another object under the same name
        # a process that has not mapped it checks the object itself
        with mp.get_context("spawn").Pool(1) as pool, pytest.raises(shmalloc.CorruptHandleError):
            pool.apply(_rebuild, (name, size + 8, inode, shape, dtype, offset, strides))


# ---- lifetime ----


def test_name_removed_when_last_array_dies():
    """The owner removes the name when its last ShmArray over the segment is garbage collected, not before."""
    a = ShmArray.zeros(100)
    name, view = a.name, a[10:20]
    del a
    gc.collect()
    assert _exists(name)
    del view
    gc.collect()
    assert not _exists(name)


def test_unlink_and_with_block_remove_the_name_but_keep_memory():
    """unlink() and leaving a with block remove the name at once; the arrays stay usable; unlink twice is harmless."""
    a = ShmArray.from_array(np.arange(10))
    a.unlink()
    assert not _exists(a.name) and a.unlinked
    a.unlink()
    a[0] = 42
    assert a[0] == 42
    with ShmArray.zeros(3) as b:
        assert _exists(b.name)
    assert not _exists(b.name) and b.sum() == 0


def _receive_gone(conn) -> None:
    """Child: receive an array whose name is gone; report the error it got."""
    try:
        conn.recv()
    except ShmError as exc:
        conn.send((isinstance(exc, FileNotFoundError), exc.errno, exc.filename))
    else:
        conn.send(None)
    conn.close()


def test_unlinked_array_cannot_reach_new_processes():
    """After the name is gone, a process that never mapped the segment gets ShmError ENOENT, with the name."""
    a = ShmArray.zeros(4)
    a.unlink()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receive_gone, args=(child,))
    proc.start()
    parent.send(a)
    not_found, code, name = parent.recv()
    proc.join(30)
    assert not_found and code == 2 and name == a.name


def _sum(a: ShmArray) -> float:
    return float(a.sum())


def _attach_then_wait(conn) -> None:
    """Child: map the array, wait until the owner has unlinked the name, then read and write it."""
    a = conn.recv()
    conn.send(a.owner)
    conn.recv()  # the parent unlinked the name and dropped its arrays
    a[:] += 1
    conn.send(float(a.sum()))
    conn.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_attached_process_keeps_memory_after_owner_unlinks_and_dies(method):
    """An attached process keeps a valid mapping after the owner removed the name and freed its arrays."""
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_attach_then_wait, args=(child,))
    proc.start()
    a = ShmArray.from_array(np.ones(1000))
    name = a.name
    parent.send(a)
    assert parent.recv() is False  # the child is not the owner
    del a
    gc.collect()
    assert not _exists(name)
    parent.send("go")
    assert parent.recv() == 2000.0
    proc.join(30)
    assert proc.exitcode == 0


def _forked_child_drops_array(conn) -> None:
    global _inherited
    del _inherited  # the child's last reference: it must not remove the parent's name
    gc.collect()
    try:
        _inherited_view.unlink()
    except ValueError:
        conn.send("refused")
    else:
        conn.send("unlinked")
    conn.close()


@pytest.mark.skipif("fork" not in START_METHODS, reason="needs fork")
def test_forked_child_never_unlinks_the_parents_segment():
    """A forked child inherits the owner's objects but neither removes the name on exit nor may unlink it."""
    global _inherited, _inherited_view
    _inherited = ShmArray.zeros(10)
    _inherited_view = _inherited[:5]
    name = _inherited.name
    try:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_forked_child_drops_array, args=(child,))
        proc.start()
        assert parent.recv() == "refused"
        proc.join(30)
        assert proc.exitcode == 0 and _exists(name)
    finally:
        del _inherited, _inherited_view
        gc.collect()
    assert not _exists(name)


def _create_and_hang(conn) -> None:
    a = ShmArray.from_array(np.arange(10))
    conn.send(a.name)
    time.sleep(600)


def test_crashed_creator_leaves_a_name_the_cleanup_finds():
    """If the creator is killed, its segment stays under a name that carries its pid, so cleanup can find it."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_create_and_hang, args=(child,))
    proc.start()
    name = parent.recv()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    try:
        assert _exists(name) and _names.creator_pid(name) == proc.pid
        assert name in set(shmalloc.segments()["name"])
    finally:
        shmalloc.unlink(name)


# ---- real workers: Pool, concurrent.futures, shmalloc.map ----


def _fill_row(a: ShmArray, i: int) -> int:
    """Worker: write row i of the shared array; return the worker's pid."""
    a[i] = i * 10 + np.arange(a.shape[1])
    return os.getpid()


def _fill_view(view: ShmArray, value: float) -> bool:
    """Worker: fill a view it received (pickled as a view); report whether it is a ShmArray."""
    view[...] = value
    return type(view) is ShmArray and not view.owner


def _expected_rows(n: int, m: int) -> np.ndarray:
    return np.arange(n)[:, None] * 10 + np.arange(m)


@pytest.mark.parametrize("method", START_METHODS)
def test_pool_workers_write_the_parents_array(method):
    """multiprocessing.Pool workers (any start method) receive the array by reference and their writes reach the parent."""
    a = ShmArray.zeros((8, 5), np.int64)
    with mp.get_context(method).Pool(2) as pool:
        pids = pool.starmap(_fill_row, [(a, i) for i in range(8)])
        flags = pool.starmap(_fill_view, [(a[:, 4], -1), (a[7:, :2], -2)])
    assert os.getpid() not in pids and all(flags)
    expected = _expected_rows(8, 5)
    expected[:, 4] = -1
    expected[7:, :2] = -2
    assert np.array_equal(a, expected)


@pytest.mark.parametrize("method", START_METHODS)
def test_process_pool_executor_workers_write_the_parents_array(method):
    """concurrent.futures workers (any start method) write into the parent's memory through views they receive."""
    a = ShmArray.zeros((6, 4), np.int64)
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as executor:
        pids = list(executor.map(_fill_row, [a] * 6, range(6)))
    assert os.getpid() not in pids
    assert np.array_equal(a, _expected_rows(6, 4))


def _row_sum(row: ShmArray) -> float:
    return float(row.sum())


def test_shmalloc_map_takes_shmarrays():
    """shmalloc.map passes ShmArray inputs by reference, like any pool."""
    if not hasattr(shmalloc, "map"):
        pytest.skip("shmalloc.map is not available in this build")
    a = ShmArray.from_array(np.arange(20.0).reshape(4, 5))
    sums = list(shmalloc.map(_row_sum, [a[i] for i in range(4)]))
    assert sums == [float(a[i].sum()) for i in range(4)]


def test_pickled_reference_does_not_grow_with_the_data():
    """The bytes sent to a worker are the same size for 1 kB and 64 MB arrays."""
    small = ShmArray.zeros(128)
    big = ShmArray.zeros(8 << 20)
    assert abs(len(pickle.dumps(big)) - len(pickle.dumps(small))) < 16


# ---- ShmArrays returned by workers: the parent takes the name over ----


def _make_shmarray(i: int) -> ShmArray:
    """Worker: a fresh 800 kB ShmArray, owned by the worker until it is handed over."""
    return ShmArray.from_array(np.arange(100_000, dtype=np.float64) * i)


def _make_nested(i: int) -> dict:
    """Worker: a container with a ShmArray, a view of it and a large plain array (the container goes through shm)."""
    a = ShmArray.from_array(np.arange(100_000, dtype=np.int64) + i)
    return {"array": a, "view": a[10:20], "plain": np.full(50_000, i)}


def _first(a: ShmArray) -> float:
    return float(a[0])


def _check_received(arrays: list, n: int) -> list[str]:
    """The arrays arrived intact, owned here, writable, and a worker sees a write made here."""
    names = []
    for i, a in enumerate(arrays):
        assert type(a) is ShmArray and a.owner and a.flags.writeable
        np.testing.assert_array_equal(a, np.arange(100_000, dtype=np.float64) * i)
        a[0] = -1.0 - i
        names.append(a.name)
        assert _exists(a.name)
    assert shmalloc.map(_first, arrays, processes=2, start_method="fork") == [-1.0 - i for i in range(n)]
    return names


def _gone_after_collect(names: list[str]) -> bool:
    gc.collect()
    return not any(_exists(name) for name in names)


@pytest.mark.parametrize("method", START_METHODS)
def test_map_hands_returned_shmarrays_over_to_the_parent(method):
    """ShmArrays returned through map arrive intact, owned by the parent, and are unlinked when it drops them."""
    arrays = shmalloc.map(_make_shmarray, range(5), processes=2, start_method=method)
    names = _check_received(arrays, 5)
    del arrays
    assert _gone_after_collect(names)


@pytest.mark.parametrize("chunksize", [1, 2, 4])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_hands_returned_shmarrays_over_at_any_chunksize(method, chunksize):
    """ShmArrays returned through Pool.map (any chunksize) arrive intact; nothing is left after close and release."""
    with shmalloc.Pool(2, method) as pool:
        for _ in range(2):
            arrays = pool.map(_make_shmarray, range(6), chunksize=chunksize)
            names = _check_received(arrays, 6)
            del arrays
            assert _gone_after_collect(names)
        kept = pool.map(_make_shmarray, range(3), chunksize=chunksize)
    names = _check_received(kept, 3)
    del kept
    assert _gone_after_collect(names)


def test_containers_of_shmarrays_and_views_are_handed_over():
    """A container holding a ShmArray, a view of it and a large array comes back whole, sharing one segment."""
    with shmalloc.Pool(2) as pool:
        got = pool.map(_make_nested, range(4), chunksize=2)
    got += shmalloc.map(_make_nested, range(4, 6), processes=2, start_method="spawn")
    names = []
    for i, d in enumerate(got):
        np.testing.assert_array_equal(d["array"], np.arange(100_000) + i)
        np.testing.assert_array_equal(d["plain"], np.full(50_000, i))
        assert d["view"].name == d["array"].name and d["array"].owner
        d["array"][10] = -5
        assert d["view"][0] == -5  # the same memory
        names.append(d["array"].name)
    del got, d
    assert _gone_after_collect(names)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_executor_hands_returned_shmarrays_over(method):
    """ShmArrays returned through the executor arrive intact and owned by the parent; nothing is left after shutdown."""
    with shmalloc.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
        arrays = [f.result(timeout=60) for f in [pool.submit(_make_shmarray, i) for i in range(4)]]
    names = _check_received(arrays, 4)
    del arrays
    assert _gone_after_collect(names)


def _shmarray_or_fail(i: int) -> ShmArray:
    if i == 5:  # last of its chunk: the parent stops workers that have finished their arrays
        time.sleep(0.2)  # let the other worker's arrays arrive first, or not: nothing may be left either way
        raise KeyError("item five")
    return _make_shmarray(i)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_shmarrays_of_a_failed_call_leave_nothing(chunksize):
    """When a call fails, the ShmArrays other items returned (read or not) leave nothing in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(KeyError):
        shmalloc.map(_shmarray_or_fail, range(8), processes=2, start_method="fork", chunksize=chunksize)
    with shmalloc.Pool(2) as pool, pytest.raises(KeyError):
        pool.map(_shmarray_or_fail, range(8), chunksize=chunksize)
    gc.collect()
    assert not _new_names_of_dead_or_this_process(before)


def _new_names_of_dead_or_this_process(before: set[str]) -> list[str]:
    """Segments made since ``before`` by this process or by processes that are gone (a concurrent run's are alive)."""
    new = {"/" + n for n in set(os.listdir("/dev/shm")) - before}
    return [
        n for n in new
        if _names.creator_pid(n) is not None
        and (_names.creator_pid(n) == os.getpid() or not os.path.exists(f"/proc/{_names.creator_pid(n)}"))
    ]


@pytest.mark.parametrize("method", START_METHODS)
def test_returned_shmarrays_are_named_for_the_receiver(method):
    """Names of ShmArrays made in workers carry the receiver's pid: cleanup tools see them alive after the worker is gone."""
    arrays = shmalloc.map(_make_shmarray, range(3), processes=2, start_method=method)
    with shmalloc.Pool(1, method) as pool:
        arrays += pool.map(_make_shmarray, range(2))
    with shmalloc.ProcessPoolExecutor(1, mp_context=mp.get_context(method)) as pool:
        arrays.append(pool.submit(_make_shmarray, 1).result(timeout=60))
    assert not mp.active_children()  # every worker is gone
    names = [a.name for a in arrays]
    assert all(_names.creator_pid(name) == os.getpid() for name in names)
    listed = shmalloc.segments()
    alive = dict(zip(listed["name"], listed["alive"], strict=True))
    assert all(alive[name] for name in names)
    del arrays
    assert _gone_after_collect(names)


_kept_in_worker: list = []


def _make_and_keep(i: int) -> str:
    """Worker: make a ShmArray and keep it (not returned); report its name."""
    _kept_in_worker.append(ShmArray.zeros(1000))
    return _kept_in_worker[-1].name


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shmarrays_a_worker_keeps_are_gone_when_it_exits(method):
    """ShmArrays a worker made and kept are unlinked when the worker exits (map's end, Pool.close)."""
    names = shmalloc.map(_make_and_keep, range(4), processes=2, start_method=method)
    pool = shmalloc.Pool(2, method)
    names += pool.map(_make_and_keep, range(4))
    assert all(_exists(name) for name in names[4:])
    pool.close()
    assert not any(_exists(name) for name in names)


def test_shmarray_passed_to_a_worker_stays_owned_by_its_creator():
    """An argument ShmArray returned by the worker stays the parent's: same segment, still owned, not unlinked by the worker."""
    a = ShmArray.from_array(np.arange(100_000.0))
    back = shmalloc.map(copy.copy, [a], start_method="spawn")  # copy.copy of a ShmArray is plain: a control
    assert type(back[0]) is np.ndarray
    with shmalloc.Pool(1, "spawn") as pool:
        same = pool.map(_identity, [a])[0]
    assert same.name == a.name and a.owner and _exists(a.name)
    same[5] = -1
    assert a[5] == -1
    a.unlink()


def _identity(x):
    return x


def _names_under(pid: int) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{pid}_")}


@contextlib.contextmanager
def _new_names_of_this_pid():
    """Yield a function listing the names made under this process's pid since entry; remove them at exit."""
    before = _names_under(os.getpid())

    def new() -> set[str]:
        return _names_under(os.getpid()) - before

    try:
        yield new
    finally:
        for name in new():
            try:
                os.unlink("/dev/shm/" + name)
            except FileNotFoundError:
                pass


def _made_then_wait(i):
    import os
    import time

    import shmalloc

    if i == 0:
        kept = shmalloc.ShmArray.zeros(1000)  # noqa: F841 (held while the item runs)
        time.sleep(60)  # still working when item 1 fails; the parent terminates this worker
        return None
    deadline = time.monotonic() + 30
    mine = f"shmalloc_{os.getppid()}_"
    while not any(n.startswith(mine) for n in os.listdir("/dev/shm")) and time.monotonic() < deadline:
        time.sleep(0.01)
    raise ValueError("item 1 fails once item 0 made its ShmArray")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shmarray_of_a_terminated_map_worker_is_not_left_under_the_parents_pid(method):
    """A ShmArray made by a map worker that is terminated before answering does not stay in /dev/shm as a live process's name."""
    with _new_names_of_this_pid() as new_names:
        with pytest.raises(ValueError, match="item 1 fails"):
            shmalloc.map(_made_then_wait, [0, 1], processes=2, start_method=method)
        shmalloc.gc(older_than=0)
        assert not new_names(), f"left in /dev/shm under this live process's pid: {new_names()}"


def _make_and_wait(_):
    import time

    import shmalloc

    kept = shmalloc.ShmArray.zeros(1000)  # noqa: F841 (held while the item runs)
    time.sleep(60)  # the parent terminates the pool meanwhile


def test_shmarray_of_a_pool_worker_stopped_by_terminate_is_unlinked():
    """Pool.terminate() while a worker holds a ShmArray it made leaves no name under this process's pid."""
    with _new_names_of_this_pid() as new_names:
        pool = shmalloc.Pool(1, start_method="fork")
        with cf.ThreadPoolExecutor(1) as runner:
            running = runner.submit(pool.map, _make_and_wait, [0])
            deadline = time.monotonic() + 30
            while not new_names() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert new_names(), "the worker made no ShmArray"
            pool.terminate()
            with pytest.raises(RuntimeError, match="terminate"):
                running.result(timeout=60)
        assert not new_names(), f"left in /dev/shm under this live process's pid: {new_names()}"


def test_a_name_is_among_the_owned_ones_while_its_object_is_created(monkeypatch):
    """A SIGTERM handler running while a ShmArray's object is being created finds its name among the owned ones, and a failed creation removes it."""
    from shmalloc import _ownership, _shared

    seen = []
    real = _shared.create_shared

    def watched(name, size):
        seen.append(name in _ownership._owned_names)
        return real(name, size)

    monkeypatch.setattr(_shared, "create_shared", watched)
    with ShmArray.zeros(10) as a:
        assert seen == [True] and a.name in _ownership._owned_names
    assert a.name not in _ownership._owned_names  # unlinked: no longer owned

    def failing(name, size):
        raise ShmError(28, "full", name)

    monkeypatch.setattr(_shared, "create_shared", failing)
    before = set(_ownership._owned_names)
    with pytest.raises(ShmError):
        ShmArray.zeros(10)
    assert _ownership._owned_names == before


def _keep_a_shmarray(_):
    import os

    import shmalloc

    global _kept_in_worker
    _kept_in_worker = shmalloc.ShmArray.zeros(1000)  # owned by this worker, named for the parent
    return os.getpid(), _kept_in_worker.name


def test_shmarray_kept_by_a_terminated_executor_worker_is_unlinked():
    """An executor worker terminated (SIGTERM, as a broken pool does) unlinks the ShmArray names it owns."""
    with _new_names_of_this_pid() as new_names:
        pool = shmalloc.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
        try:
            pid, name = pool.submit(_keep_a_shmarray, 0).result(timeout=60)
            assert os.path.exists("/dev/shm" + name)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while os.path.exists("/dev/shm" + name) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not os.path.exists("/dev/shm" + name), "the terminated worker left its ShmArray's name"
        finally:
            pool.shutdown(wait=True)
        assert new_names() == set()
