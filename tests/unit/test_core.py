"""copy2shm / allocate_from_shm for numpy arrays, within one process."""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy._core.multiarray import get_handler_name

import shmalloc
from shmalloc import CorruptHandleError, ShmError, ShmObj, _adopt, _posix, _transfer

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128,
    ">i4", ">f8", "<c16", ">U3", "S5", "U7", "V6",
    *[f"M8[{u}]" for u in ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as")],
    *[f"m8[{u}]" for u in ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as")],
    np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]),
    np.dtype({"names": ["x", "y"], "formats": ["u1", "<f4"], "offsets": [0, 4], "itemsize": 12}),
]


def sample(dtype, shape=(4, 6)) -> np.ndarray:
    """Deterministic, non-trivial values of any fixed-size dtype."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(7).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "U":  # only valid code points
        return np.array(["".join(chr(97 + (i + j) % 26) for j in range(dtype.itemsize // 4)) for i in range(int(np.prod(shape)))], dtype).reshape(shape)
    if dtype.kind == "b":
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert b.dtype == a.dtype and b.shape == a.shape
    if a.dtype.names:  # padding bytes between fields carry no value: compare field by field
        for field in a.dtype.names:
            same(a[field], b[field])
        return
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


LAYOUTS = {
    "C": lambda a: np.ascontiguousarray(a),
    "F": lambda a: np.asfortranarray(a),
    "strided": lambda a: a[::2, ::3],
    "negative": lambda a: a[::-1, ::-2],
    "transposed-slice": lambda a: np.asfortranarray(a)[1:, 1:],
}


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "zerocopy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype_and_layout(dtype, layout, copy):
    """Every fixed-size dtype in every layout comes back with the same dtype, shape and bytes."""
    x = LAYOUTS[layout](sample(dtype))
    obj = shmalloc.copy2shm(x)
    y = shmalloc.allocate_from_shm(obj, copy=copy)
    same(x, y)
    assert y.flags.writeable
    if layout == "F":
        assert y.flags.f_contiguous and not y.flags.c_contiguous


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (1, 1), (5,), (2, 3, 4, 5)])
def test_any_shape_including_0d_and_empty(shape, copy):
    """0-d, zero-size and n-d arrays keep their shape."""
    x = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=copy)
    same(x, y)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        dtype=hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    copy=st.booleans(),
    fortran=st.booleans(),
)
def test_roundtrip_hypothesis(x, copy, fortran):
    """Any array hypothesis can draw round-trips bit for bit."""
    if fortran:
        x = np.asfortranarray(x)
    y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=copy)
    same(x, y)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_subclasses_without_state_keep_their_class():
    """recarray and matrix come back as themselves."""
    rec = np.rec.fromarrays([np.arange(3), np.arange(3.0)], names="a,b")
    back = shmalloc.allocate_from_shm(shmalloc.copy2shm(rec))
    assert type(back) is np.recarray and back.a.tolist() == [0, 1, 2]
    m = np.matrix([[1, 2], [3, 4]])
    assert type(shmalloc.allocate_from_shm(shmalloc.copy2shm(m))) is np.matrix


@pytest.mark.parametrize("copy", [True, False])
def test_lists_tuples_and_scalars_keep_their_type(copy):
    """Containers and scalars come back as themselves, arrays inside them as arrays."""
    for x in ([[1, 2], [3, 4]], (np.arange(3), np.arange(3.0)), np.float32(2.5), 7, [np.zeros((2, 2)), np.ones(5000)]):
        back = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=copy)
        assert type(back) is type(x)
        if isinstance(x, (list, tuple)):
            assert len(back) == len(x)
            for a, b in zip(x, back, strict=True):
                assert type(a) is type(b) and np.array_equal(a, b)
        else:
            assert back == x


def test_object_arrays_go_through_pickle():
    """Object arrays are stored as pickled objects and come back equal."""
    x = np.array([1, "a", None, {"k": 2}], dtype=object)
    obj = shmalloc.copy2shm(x)
    assert obj.type == "object"
    assert shmalloc.allocate_from_shm(obj).tolist() == x.tolist()


# ---- the handle ----


def test_type_names_a_dtype_as_str_does_even_after_an_equal_one():
    """The handle's type is str(dtype), also for an aligned struct after an unaligned one that
    compares equal to it (a cached name must not stand for both)."""
    plain = np.dtype({"names": ["a"], "formats": ["<i4"], "offsets": [0], "itemsize": 8})
    aligned = np.dtype({"names": ["a"], "formats": ["<i4"], "offsets": [0], "itemsize": 8}, align=True)
    for dtype in (plain, aligned):
        obj = shmalloc.copy2shm(np.zeros(3, dtype))
        assert obj.type == str(dtype)
        assert shmalloc.allocate_from_shm(obj).dtype == dtype


def test_handle_fields_match_the_seed():
    """name, type, length, size, attributes and copy say what was stored."""
    x = np.zeros((300, 7), dtype=">f4", order="F")
    obj = shmalloc.copy2shm(x, copy=False)
    try:
        assert obj.type == str(x.dtype)
        assert obj.length == x.size
        assert obj.copy is False
        assert obj.size == os.stat("/dev/shm" + obj.name).st_size
        assert obj.attributes["shape"] == (300, 7)
        assert obj.attributes["dtype"] == x.dtype
        assert obj.attributes["order"] == "F"
        assert obj.attributes["class"] == "numpy.ndarray"
        assert "300, 7" in repr(obj) and "KiB" in repr(obj)
        assert "<table" in obj._repr_html_() and obj.name in obj._repr_html_()
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.name = "/other"  # type: ignore[misc]
    finally:
        shmalloc.unlink(obj)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_handle_pickles_small_for_every_protocol(protocol):
    """The pickled handle does not grow with the data and survives every protocol."""
    back = None
    small = shmalloc.copy2shm(np.zeros(10))
    large = shmalloc.copy2shm(np.zeros(2_000_000))
    try:
        # the same up to the digits of the shape and the escaping of random bytes
        assert abs(len(pickle.dumps(large, protocol)) - len(pickle.dumps(small, protocol))) < 32
        assert len(pickle.dumps(large, protocol)) < 1024
        back = pickle.loads(pickle.dumps(large, protocol))
        assert back == large
    finally:
        shmalloc.unlink(small)
        if back is None:
            shmalloc.unlink(large)
    assert shmalloc.allocate_from_shm(back).shape == (2_000_000,)


def test_default_copy_comes_from_the_handle():
    """copy=None uses obj.copy; copy2shm(copy=False) gives a zero-copy result by default."""
    y = shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(1 << 18, dtype=float), copy=False))
    assert get_handler_name(y) == "shmalloc"
    z = shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(1 << 18, dtype=float), copy=False), copy=True)
    assert get_handler_name(z) != "shmalloc"


@pytest.mark.parametrize("nbytes", [8, 4096, 1 << 20])
def test_small_data_is_read_and_large_data_mapped_by_copy_false(nbytes):
    """With copy=False a segment of less than _transfer.MAP_FROM bytes is read into regular memory
    (cheaper than a mapping), a larger one is mapped: both come back equal and writable, and
    nothing maps the segment once a small result is read."""
    x = np.arange(nbytes // 8, dtype=np.float64)
    obj = shmalloc.copy2shm(x)
    y = shmalloc.allocate_from_shm(obj, copy=False)
    mapped = obj.size >= _transfer.MAP_FROM
    assert get_handler_name(y) == ("shmalloc" if mapped else "default_allocator") and y.flags.owndata
    assert np.array_equal(x, y) and y.flags.writeable
    y[0] = -1.0
    assert x[0] == 0.0
    assert (obj.name.lstrip("/") in _mapped_names()) == mapped
    del y
    assert obj.name.lstrip("/") not in _mapped_names()


# ---- lifecycle ----


def test_second_allocate_fails_with_enoent():
    """allocate_from_shm unlinks the name: a second call on the same handle raises ENOENT."""
    obj = shmalloc.copy2shm(np.arange(10))
    shmalloc.allocate_from_shm(obj)
    assert not os.path.exists("/dev/shm" + obj.name)
    with pytest.raises(ShmError) as info:
        shmalloc.allocate_from_shm(obj)
    assert info.value.errno == errno.ENOENT and isinstance(info.value, FileNotFoundError)
    assert info.value.filename == obj.name


def test_unlink_drops_an_unconsumed_handle():
    """unlink removes the object; a later allocate or unlink says ENOENT."""
    obj = shmalloc.copy2shm(np.arange(10))
    shmalloc.unlink(obj.name)
    with pytest.raises(FileNotFoundError):
        shmalloc.unlink(obj)


def test_mode_is_0600(shm_name):
    """Objects are readable and writable by their owner only."""
    obj = shmalloc.copy2shm(np.arange(3), name=shm_name)
    try:
        assert stat.S_IMODE(os.stat("/dev/shm" + shm_name).st_mode) == 0o600
    finally:
        shmalloc.unlink(obj)


def test_existing_name_fails_with_eexist_and_is_untouched(shm_name):
    """overwrite=False refuses an existing name and leaves it as it was."""
    first = shmalloc.copy2shm(np.arange(5), name=shm_name)
    with pytest.raises(ShmError) as info:
        shmalloc.copy2shm(np.ones(50), name=shm_name)
    assert info.value.errno == errno.EEXIST and isinstance(info.value, FileExistsError)
    same(np.arange(5), shmalloc.allocate_from_shm(first))


def test_overwrite_replaces(shm_name):
    """overwrite=True replaces the object; the old handle is then refused, the new one works."""
    old = shmalloc.copy2shm(np.arange(5), name=shm_name)
    new = shmalloc.copy2shm(np.arange(5) * 2, name=shm_name, overwrite=True)
    with pytest.raises(CorruptHandleError, match="replaced"):
        # same size, other token: the replacement is detected before mapping
        shmalloc.allocate_from_shm(old)
    new_again = shmalloc.copy2shm(np.arange(5) * 3, name=shm_name, overwrite=True)
    with pytest.raises(CorruptHandleError):
        shmalloc.allocate_from_shm(new)
    assert not os.path.exists("/dev/shm" + shm_name)
    with pytest.raises(FileNotFoundError):
        shmalloc.allocate_from_shm(new_again)


@pytest.mark.parametrize(
    "name, error",
    [
        ("noslash", ValueError),
        ("/", ValueError),
        ("/a/b", ValueError),
        ("/a\0b", ValueError),
        ("/" + "x" * 254, ValueError),
        ("/..", ValueError),
        (b"/bytes", TypeError),
        (42, TypeError),
    ],
)
def test_bad_names_create_nothing(name, error):
    """A name that is not portable is refused before anything is created."""
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(error):
        shmalloc.copy2shm(np.arange(3), name=name)
    # Names in shmalloc's and multiprocessing's forms are other programs' (none of these names has that form).
    new = {n for n in set(os.listdir("/dev/shm")) - before if not re.match(r"(?:shmalloc|shmtest)_\d+_|sem\.", n)}
    assert new == set()


def test_longest_portable_name_works():
    """'/' plus 253 characters is accepted."""
    name = f"/shmtest_{os.getpid()}_" + "n" * (253 - len(f"shmtest_{os.getpid()}_"))
    assert len(name) == 254
    same(np.arange(3), shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(3), name=name)))


def test_generated_names_are_portable_unique_and_ours():
    """Generated names: under 32 characters, prefix and pid, random part."""
    objs = [shmalloc.copy2shm(np.arange(1)) for _ in range(50)]
    try:
        names = {o.name for o in objs}
        assert len(names) == 50
        for n in names:
            assert n.startswith(f"/shmalloc_{os.getpid()}_") and len(n) <= 31
            assert shmalloc._names.creator_pid(n) == os.getpid()
    finally:
        for o in objs:
            shmalloc.unlink(o)


# ---- bad handles ----


def _damaged(obj: ShmObj, **changes) -> ShmObj:
    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"size": 1},
        {"size": -5},
        {"size": "big"},
        {"length": 11},
        {"length": 10.0},
        {"type": "int32"},
        {"attributes": {"codec": "ndarray", "shape": (10**12,), "dtype": np.dtype("i8"), "order": "C", "class": "numpy.ndarray", "buffer": 0}},
        {"attributes": {}},
        {"attributes": None},
        {"token": b"x" * 16},
        {"token": None},
        {"name": "/not-there-" + "z" * 8},
        {"name": "relative"},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}"[:40],
)
def test_damaged_handle_gives_a_clear_error(changes):
    """Any damaged field is refused with an exception that names the problem; the segment is then gone."""
    obj = shmalloc.copy2shm(np.arange(10))
    with pytest.raises((CorruptHandleError, ShmError, ValueError, TypeError)) as info:
        shmalloc.allocate_from_shm(_damaged(obj, **changes))
    assert str(info.value)
    if os.path.exists("/dev/shm" + obj.name):  # refused before opening (bad name, missing object)
        shmalloc.unlink(obj)


def test_not_a_handle_is_a_type_error():
    with pytest.raises(TypeError, match="ShmObj"):
        shmalloc.allocate_from_shm({"name": "/x"})


@pytest.mark.parametrize("copy", [True, False])
def test_truncated_object_is_detected_before_mapping(copy):
    """A truncated object gives CorruptHandleError, never a SIGBUS."""
    obj = shmalloc.copy2shm(np.arange(100_000))
    os.truncate("/dev/shm" + obj.name, 4096)
    with pytest.raises(CorruptHandleError, match="truncated"):
        shmalloc.allocate_from_shm(obj, copy=copy)
    assert not os.path.exists("/dev/shm" + obj.name)


def test_foreign_segment_is_not_a_shmalloc_segment(shm_name):
    """An object of the right size but not written by shmalloc is refused (bad magic)."""
    obj = shmalloc.copy2shm(np.arange(10), name=shm_name)
    path = "/dev/shm" + shm_name
    with open(path, "r+b") as f:
        f.write(b"NOTOURS!")
    with pytest.raises(CorruptHandleError, match="magic"):
        shmalloc.allocate_from_shm(obj)


def test_object_of_another_user_is_refused(shm_name):
    """A segment owned by another uid is refused (EPERM) and left in place."""
    obj = shmalloc.copy2shm(np.arange(10), name=shm_name)
    path = "/dev/shm" + shm_name
    try:
        os.chown(path, 65534, -1)
    except PermissionError:
        shmalloc.unlink(obj)
        pytest.skip("cannot chown here")
    try:
        with pytest.raises(ShmError) as info:
            shmalloc.allocate_from_shm(obj)
        assert info.value.errno == errno.EPERM and "65534" in str(info.value)
        assert os.path.exists(path)
    finally:
        os.unlink(path)


# ---- zero-copy memory behaviour ----


def _mapped_names() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def test_copy_true_leaves_no_mapping():
    """copy=True: numpy's own allocator, and no mapping of the object remains."""
    obj = shmalloc.copy2shm(np.arange(1_000_000))
    y = shmalloc.allocate_from_shm(obj, copy=True)
    assert obj.name.lstrip("/") not in _mapped_names()
    assert get_handler_name(y) == "default_allocator"
    assert y.flags.owndata


def test_zero_copy_owns_its_mapping_and_unmaps_on_gc():
    """copy=False: the array owns a private mapping, unmapped when it and its views are gone."""
    obj = shmalloc.copy2shm(np.arange(1_000_000))
    y = shmalloc.allocate_from_shm(obj, copy=False)
    key = obj.name.lstrip("/")
    assert y.flags.owndata and y.base is None and y.flags.writeable
    assert get_handler_name(y) == "shmalloc"
    assert key in _mapped_names()
    view = y[10:20]
    del y
    assert key in _mapped_names(), "a view must keep the mapping alive"
    assert view[0] == 10
    del view
    assert key not in _mapped_names()


def test_zero_copy_resize_moves_to_regular_memory(map_every_size):
    """arr.resize of a mapped array copies into fresh memory and unmaps."""
    obj = shmalloc.copy2shm(np.arange(10_000))
    y = shmalloc.allocate_from_shm(obj, copy=False)
    y.resize(20_000, refcheck=False)
    assert y[:10_000].tolist() == list(range(10_000)) and (y[10_000:] == 0).all()
    assert obj.name.lstrip("/") not in _mapped_names()
    y.resize(5, refcheck=False)
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_zero_copy_writes_are_private(map_every_size):
    """Writes to a zero-copy array never reach the object (MAP_PRIVATE)."""
    x = np.arange(5000)
    obj = shmalloc.copy2shm(x, name=None)
    # Open the object a second time first, the way another consumer would, to see the bytes.
    fd = os.open("/dev/shm" + obj.name, os.O_RDONLY)
    try:
        y = shmalloc.allocate_from_shm(obj, copy=False)
        y[:] = -1
        assert np.frombuffer(os.pread(fd, x.nbytes, obj.size - (-(-x.nbytes // 4096) * 4096)), x.dtype).tolist() == x.tolist()
    finally:
        os.close(fd)


def test_zero_copy_arrays_survive_mapping_pressure(map_every_size):
    """Thousands of zero-copy arrays free their mappings: none left in the registry."""
    before = _posix.live_mappings()
    for i in range(2000):
        y = shmalloc.allocate_from_shm(shmalloc.copy2shm(np.full(1000, i)), copy=False)
        assert y[999] == i
    del y
    assert _posix.live_mappings() == before


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_many_threads_at_once(request, mapped):
    """Copies and allocations from many threads at once never mix up data, whether small objects are
    mapped or read (the default) with copy=False."""
    if mapped:
        request.getfixturevalue("map_every_size")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(40):
                x = np.full(1000 + seed * 37 + i, seed * 1000 + i, dtype=np.int64)
                y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=bool(i % 2))
                assert y.shape == x.shape and (y == x).all()
                assert get_handler_name(y) == ("shmalloc" if mapped and not i % 2 else "default_allocator")
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_handler_is_restored_after_each_allocation(map_every_size):
    """Arrays made after allocate_from_shm use numpy's default allocator again."""
    shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(10_000)), copy=False)
    assert get_handler_name() == "default_allocator"
    assert get_handler_name(np.empty(100)) == "default_allocator"


@pytest.mark.skipif(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < 16 * 2**30, reason="needs 16 GB of memory")
def test_array_longer_than_2_31_elements():
    """An int8 array of 2**31 + 10 elements round-trips in both modes."""
    n = 2**31 + 10
    x = np.zeros(n, np.int8)
    x[-1] = 7
    x[2**31] = 3
    obj = shmalloc.copy2shm(x)
    del x
    y = shmalloc.allocate_from_shm(obj, copy=False)
    assert y.shape == (n,) and y[-1] == 7 and y[2**31] == 3 and obj.length == n
    del y
    obj = shmalloc.copy2shm(np.ones(n, np.int8))
    y = shmalloc.allocate_from_shm(obj, copy=True)
    assert y.shape == (n,) and y[-1] == 1


# ---- platforms ----


def test_without_the_native_core_on_windows_calls_say_not_supported(monkeypatch):
    """Where the core cannot exist (Windows, emulated), every call says the platform is not supported."""
    monkeypatch.setattr(_posix, "POSIX_PLATFORM", False)
    monkeypatch.setattr(_posix, "lib", None)
    monkeypatch.setattr(sys, "platform", "win32")
    for call in (lambda: shmalloc.copy2shm(np.arange(3)), lambda: shmalloc.unlink("/x")):
        with pytest.raises(NotImplementedError, match="not supported on win32"):
            call()


def test_a_missing_core_on_linux_is_an_import_error_that_names_the_fix():
    """A POSIX build without its core never claims the platform is unsupported: it names the path and the fix."""
    script = (
        "import sys; sys.modules['shmalloc._native'] = None\n"
        "import numpy as np, shmalloc\n"
        "for call in (lambda: shmalloc.copy2shm(np.arange(3)), lambda: shmalloc.unlink('/x')):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, '|', e)\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert line.startswith("ImportError | "), line
        assert "not supported" not in line
        assert "compiled core shmalloc._native" in line and os.path.dirname(shmalloc.__file__) in line
        assert "pip install" in line


def test_macos_rules(monkeypatch, shm_name):
    """On macOS overwrite=True is refused and copy=False copies (emulated here)."""
    import sys

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(_posix, "ZERO_COPY", False)
    with pytest.raises(NotImplementedError, match="macOS"):
        shmalloc.copy2shm(np.arange(3), name=shm_name, overwrite=True)
    assert not os.path.exists("/dev/shm" + shm_name)
    y = shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(10_000)), copy=False)
    assert get_handler_name(y) == "default_allocator" and y.sum() == sum(range(10_000))


# ---- regressions ----


@pytest.mark.parametrize("n", [(8 << 20) + 1, (8 << 20) + 3, (16 << 20) + 7])
def test_threaded_copy_keeps_the_last_bytes(n):
    """copy=True splits large copies across threads: lengths that do not divide evenly lose nothing."""
    x = np.random.default_rng(n).integers(1, 256, n, dtype=np.uint8)  # no zero byte: a gap would show
    y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=True)
    assert np.array_equal(x, y)


# The functions of the adoption: mapping, handing parts to arrays, unmapping the rest, and the
# out-parameters that say what is mapped and owned.
_ADOPTION = {
    f"{function.__module__.rsplit('.', 1)[1]}.{function.__qualname__}": function
    for function in (
        _adopt.arrays,
        _posix.MapOut.__init__,
        _posix.MapOut.address.fget,
        _posix.MapOut.owned,
        _posix.map_private,
        _adopt._adopt_all,
        _adopt._adopt_part,
        _posix.adopt,
    )
}


def _adoption_lines() -> list[tuple[str, int]]:
    import inspect

    lines = []
    for label, function in _ADOPTION.items():
        source, first = inspect.getsourcelines(function)
        lines += [
            (label, first + i)
            for i, line in enumerate(source)
            if line.strip() and not line.strip().startswith(("def ", "#", '"""'))
        ]
    return lines


def _check_interrupted_adoption(result, obj, x, before: int) -> None:
    """Interrupted (``result`` None): no mapping of the segment is left; else the three parts are right."""
    if result is None:
        assert _posix.live_mappings() == before
        assert obj.name.lstrip("/") not in _mapped_names()
    else:
        for i, part in enumerate(result):
            assert np.array_equal(part, x + i)


def _interrupting_tracer(function: str, event: str, where: int):
    """A trace function that raises KeyboardInterrupt in adoption function ``function`` at its
    line ``where`` (event "line") or before its instruction at offset ``where`` (event "opcode")."""
    code = _ADOPTION[function].__code__

    def tracer(frame, ev, arg):
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = event == "opcode"

        def local(frame, ev, arg):
            position = frame.f_lineno if event == "line" else frame.f_lasti
            if ev == event and position == where:
                sys.settrace(None)
                raise KeyboardInterrupt
            return local

        return local

    return tracer


@pytest.mark.parametrize("function, line", _adoption_lines(), ids=lambda v: str(v))
def test_interrupt_anywhere_while_adopting_leaks_nothing_and_frees_nothing_twice(function, line):
    """An interrupt at any line of the adoption (as Ctrl-C may arrive after any C call) leaks no
    mapping, unmaps no part twice or while an array owns it, and leaves numpy's own handler in place."""
    import sys

    x = np.arange(100_000.0)
    obj = shmalloc.copy2shm([x, x + 1, x + 2])  # three buffers: the interrupt may fall between them
    before = _posix.live_mappings()
    failures_before = _posix.unmap_failures()[0]
    sys.settrace(_interrupting_tracer(function, "line", line))
    try:
        result = shmalloc.allocate_from_shm(obj, copy=False)  # the line may not run: then no interrupt
    except KeyboardInterrupt:
        result = None
    finally:
        sys.settrace(None)
    assert get_handler_name() == "default_allocator"
    fresh = np.empty(100_000)
    fresh[:] = 1.0
    assert get_handler_name(fresh) == "default_allocator"
    assert _posix.unmap_failures()[0] == failures_before
    _check_interrupted_adoption(result, obj, x, before)


def _adoption_instructions() -> list[tuple[str, int]]:
    import dis

    return [
        (label, instruction.offset)
        for label, function in _ADOPTION.items()
        for instruction in dis.get_instructions(function)
    ]


class _CheckedUnmaps:
    """The core, except that each unmap from Python is first checked to cover only mapped pages of one object."""

    def __init__(self, object_name: str) -> None:
        self.object_name = object_name
        self.violations: list[str] = []

    def __getattr__(self, name):
        return getattr(_REAL_CORE, name)

    def shmalloc_unmap(self, address, length):
        start = int(_posix.ffi.cast("uintptr_t", address))
        with open("/proc/self/maps") as maps:
            ranges = [
                [int(bound, 16) for bound in line.split()[0].split("-")] for line in maps if self.object_name in line
            ]
        if not any(low <= start and start + length <= high for low, high in ranges):
            self.violations.append(f"unmap of {length} bytes at {start:#x}, which is not (all) mapped")
        return _REAL_CORE.shmalloc_unmap(address, length)


_REAL_CORE = _posix.lib


@pytest.mark.parametrize("function, offset", _adoption_instructions(), ids=lambda v: str(v))
def test_interrupt_at_any_instruction_while_adopting_never_unmaps_twice(map_every_size, monkeypatch, function, offset):
    """An interrupt before any bytecode instruction of the adoption (a signal handler may raise after
    any C call returns, before its result is stored) leaks no mapping, and Python never unmaps a range
    that is not mapped (such as a part its array already unmapped, which another thread may reuse)."""
    x = np.arange(3000.0)
    obj = shmalloc.copy2shm([x, x + 1, x + 2])
    before = _posix.live_mappings()
    checked = _CheckedUnmaps(obj.name)
    monkeypatch.setattr(_posix, "lib", checked)
    sys.settrace(_interrupting_tracer(function, "opcode", offset))
    try:
        result = shmalloc.allocate_from_shm(obj, copy=False)  # the instruction may not run: then no interrupt
    except KeyboardInterrupt:
        result = None
    finally:
        sys.settrace(None)
    monkeypatch.undo()
    assert not checked.violations
    _check_interrupted_adoption(result, obj, x, before)


# ---- error messages ----


def test_consuming_a_handle_twice_says_a_handle_is_consumed_once():
    """The second consumption of a handle raises shmalloc.ShmFileNotFoundError (a FileNotFoundError
    and a ShmError) saying that a handle can be consumed once; so does unlinking it afterwards."""
    obj = shmalloc.copy2shm(np.arange(10))
    shmalloc.allocate_from_shm(obj)
    for again in (lambda: shmalloc.allocate_from_shm(obj), lambda: shmalloc.unlink(obj)):
        with pytest.raises(shmalloc.ShmFileNotFoundError) as info:
            again()
        error = info.value
        assert isinstance(error, FileNotFoundError) and isinstance(error, ShmError) and error.errno == errno.ENOENT
        assert "already consumed (a handle can be consumed once)" in str(error) and obj.name in str(error)
        assert type(pickle.loads(pickle.dumps(error))) is shmalloc.ShmFileNotFoundError
    assert "ShmFileNotFoundError" in shmalloc.__all__


def test_error_classes_are_one_per_builtin_and_exported():
    """Each errno with a builtin OSError subclass maps to one exported ShmError subclass of it."""
    assert type(ShmError(errno.EPERM)) is type(ShmError(errno.EACCES)) is shmalloc.ShmPermissionError
    assert type(ShmError(errno.EEXIST)) is shmalloc.ShmFileExistsError
    assert isinstance(ShmError(errno.EEXIST), FileExistsError)
    assert type(ShmError(errno.ENOSPC)) is ShmError


class _MapFailsWith:
    """The core, except that every mmap fails with the given errno."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __getattr__(self, name):
        return getattr(_REAL_LIB, name)

    def _fail(self, *args):
        _posix.ffi.errno = self.code
        return _posix.ffi.NULL

    shmalloc_map = shmalloc_map_parts = shmalloc_map_shared = shmalloc_map_populated = _fail


_REAL_LIB = _posix.lib


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "zerocopy"])
def test_running_out_of_mappings_names_vm_max_map_count_and_what_to_do(monkeypatch, map_every_size, copy):
    """When mmap fails with ENOMEM, the error names vm.max_map_count with its value, the count of
    mappings shmalloc's arrays hold, and the ways out; the segment is consumed and nothing stays mapped."""
    keep = shmalloc.allocate_from_shm(shmalloc.copy2shm(np.arange(5000)), copy=False)  # one live mapping
    obj = shmalloc.copy2shm(np.arange(10_000))
    monkeypatch.setattr(_posix, "lib", _MapFailsWith(errno.ENOMEM))
    with pytest.raises(ShmError) as info:
        shmalloc.allocate_from_shm(obj, copy=copy)
    monkeypatch.undo()
    message = str(info.value)
    with open("/proc/sys/vm/max_map_count") as limit:
        assert f"vm.max_map_count is {limit.read().strip()}" in message
    assert info.value.errno == errno.ENOMEM and obj.name in message
    assert f"{_posix.live_mappings()} of them owned by zero-copy shmalloc arrays" in message
    assert "copy=True" in message and "sysctl" in message
    assert not os.path.exists("/dev/shm" + obj.name)
    assert obj.name.lstrip("/") not in _mapped_names()
    del keep


def test_other_mmap_failures_keep_their_plain_message(monkeypatch, map_every_size):
    """An mmap failure other than ENOMEM is reported as itself, without the mapping-limit hint."""
    obj = shmalloc.copy2shm(np.arange(10_000))
    monkeypatch.setattr(_posix, "lib", _MapFailsWith(errno.EACCES))
    with pytest.raises(ShmError) as info:
        shmalloc.allocate_from_shm(obj, copy=False)
    monkeypatch.undo()
    assert info.value.errno == errno.EACCES and "max_map_count" not in str(info.value)
