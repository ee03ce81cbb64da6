"""Hostile or damaged handles and segments: a clear exception or the right data, never a crash, hang or leak.

Allowed outcomes of allocate_from_shm on a damaged handle: the original
object, or TypeError / ValueError (CorruptHandleError is one) / OSError
(ShmError is one). Whatever happens, no mapping stays behind and the
segment's name is gone once allocate_from_shm opened it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import secrets
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import shmalloc
from shmalloc import _format, _posix

SHM = Path("/dev/shm")
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED = (TypeError, ValueError, OSError)
FIELDS = [f.name for f in dataclasses.fields(shmalloc.ShmObj)]


def originals() -> list:
    return [
        np.arange(64, dtype=np.int32).reshape(8, 8),
        np.array([1.5, np.nan, -0.0]),
        pd.DataFrame({"x": np.arange(5.0), "y": list("abcde")}),
        {"key": [1, 2, 3], "blob": b"x" * 5000},
    ]


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b) and list(a.dtypes) == list(b.dtypes)
    return type(a) is type(b) and a == b


def exists(name: object) -> bool:
    """Whether an object other than a directory exists under ``name`` in /dev/shm."""
    if not (isinstance(name, str) and name.startswith("/") and "\0" not in name):
        return False
    try:
        return not stat.S_ISDIR(os.lstat(SHM / name[1:]).st_mode)
    except (OSError, ValueError):  # absent, too long, not encodable
        return False


def consume(handle: shmalloc.ShmObj, original, real_name: str, copy: bool | None = None) -> BaseException | None:
    """allocate_from_shm on a (damaged) handle: check the outcome, then remove the real segment if still there."""
    mapped = _posix.live_mappings()
    try:
        result = shmalloc.allocate_from_shm(handle, copy=copy)
    except ALLOWED as exc:
        outcome: BaseException | None = exc
    else:
        assert same(original, result), "a damaged handle gave wrong data"
        del result
        outcome = None
    finally:
        if exists(real_name):
            shmalloc.unlink(real_name)
    assert _posix.live_mappings() <= mapped, "a mapping stayed behind"
    return outcome


@contextlib.contextmanager
def fresh(original):
    """A new handle to ``original``; its segment is removed if the block leaves early.

    Hypothesis may abandon an example in the middle of a draw (with an
    exception of its own): the segment must not outlive it.
    """
    handle = shmalloc.copy2shm(original)
    try:
        yield handle
    finally:
        if exists(handle.name):
            shmalloc.unlink(handle)


# ---- fuzzing every field of ShmObj ----

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
nested = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=20,
)
names = st.one_of(
    nested,
    st.text(max_size=300).map(lambda s: "/" + s),
    st.sampled_from(["/", "", "/.", "/..", "/../etc/passwd", "//", "/a/b", "/x\0y", "\udcff", "/" + "a" * 254]),
    st.text(alphabet="0123456789abcdef", min_size=12, max_size=12).map(lambda h: f"/shmalloc_1_{h}"),
)


def damaged_value(field: str, original_handle: shmalloc.ShmObj):
    """A strategy for a damaged value of ``field``, near misses of the real value included."""
    real = getattr(original_handle, field)
    if field == "name":
        return names
    if field == "type":
        return st.one_of(nested, st.sampled_from([real + " ", real.upper(), "int64", "object", "DataFrame"]))
    if field == "length":
        return st.one_of(nested, st.sampled_from([real + 1, real - 1, float(real), np.int64(real), -real, 2**63]))
    if field == "size":
        near = [real + 1, real - 1, real + 4096, real - 4096, 0, -1, 64, float(real), True, 2**64]
        return st.one_of(nested, st.sampled_from(near))
    if field == "token":
        return st.one_of(nested, st.binary(min_size=16, max_size=16), st.sampled_from([real[:-1], real + b"\0", b""]))
    return nested  # copy, attributes


@FUZZ
@given(data=st.data(), which=st.integers(0, 3), fields=st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3))
def test_fuzz_handle_fields(data, which, fields):
    """Damaging any one to three fields of a handle gives a clear exception or the right data."""
    original = originals()[which]
    with fresh(original) as handle:
        changes = {f: data.draw(damaged_value(f, handle), label=f) for f in fields}
        if "name" in changes:
            assume(changes["name"] == handle.name or not exists(changes["name"]))  # never consume others' segments
        outcome = consume(dataclasses.replace(handle, **changes), original, handle.name)
    if any(f in changes and not same_field(changes[f], getattr(handle, f)) for f in ("type", "length", "size", "token")):
        assert outcome is not None, "a handle with a wrong type, length, size or token was accepted"


def same_field(a, b) -> bool:
    return type(a) is type(b) and a == b


def mutate(value, path: list, replacement, drop: bool):
    """Return a deep copy of value with the item at path replaced (or dropped)."""
    if not path:
        return replacement
    key, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = dict(value)
        if drop and not rest:
            out.pop(key, None)
        else:
            out[key] = mutate(value.get(key), rest, replacement, drop)
        return out
    if isinstance(value, (list, tuple)) and isinstance(key, int) and 0 <= key < len(value):
        out_list = list(value)
        out_list[key] = mutate(value[key], rest, replacement, drop)
        return type(value)(out_list) if isinstance(value, list) else tuple(out_list)
    return replacement


def paths(value, prefix=()) -> list[tuple]:
    """Every path into nested dicts, lists and tuples."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, prefix + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += paths(v, prefix + (i,))
    return found


@FUZZ
@given(data=st.data(), which=st.integers(0, 3), drop=st.booleans(), copy=st.booleans())
def test_fuzz_attributes_deep(data, which, drop, copy):
    """Replacing or dropping any item at any depth of `attributes` is refused (CorruptHandleError) unless equal."""
    original = originals()[which]
    with fresh(original) as handle:
        check_attributes(data, original, handle, drop, copy)


def check_attributes(data, original, handle: shmalloc.ShmObj, drop: bool, copy: bool) -> None:
    path = list(data.draw(st.sampled_from(paths(handle.attributes)[1:] or [("codec",)]), label="path"))
    replacement = data.draw(
        st.one_of(
            nested,
            st.sampled_from(
                [np.dtype("int64"), np.dtype(">i4"), np.dtype("V8"), (10**9, 10**9), (-1,), "pickled", "ndarray", 10**6]
            ),
        ),
        label="replacement",
    )
    damaged_attributes = mutate(handle.attributes, path, replacement, drop)
    outcome = consume(dataclasses.replace(handle, attributes=damaged_attributes), original, handle.name, copy)
    if not _pickled_equal(damaged_attributes, handle.attributes):
        assert isinstance(outcome, shmalloc.CorruptHandleError), f"damaged attributes gave {outcome!r}"


@pytest.mark.parametrize(
    "path, replacement",
    [(("dtype",), None), (("buffer",), False), (("shape", 0), 3.0), (("shape",), [3]), (("order",), np.str_("C"))],
)
def test_attribute_of_another_type_that_compares_equal_is_refused(path, replacement):
    """An attribute replaced by a value of another type that == calls equal (dtype('f8') == None) is refused."""
    original = np.array([1.5, np.nan, -0.0])
    with fresh(original) as handle:
        damaged = mutate(handle.attributes, list(path), replacement, False)
        outcome = consume(dataclasses.replace(handle, attributes=damaged), original, handle.name)
    assert isinstance(outcome, shmalloc.CorruptHandleError)


def _pickled_equal(a, b) -> bool:
    try:
        return pickle.dumps(a, protocol=5) == pickle.dumps(b, protocol=5)
    except Exception:
        return False


def test_attributes_that_resist_comparison():
    """Attributes that cannot be pickled, compare, or are nested beyond the recursion limit give CorruptHandleError."""

    class Angry:
        def __eq__(self, other):
            raise RuntimeError("no comparing me")

        __hash__ = object.__hash__

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for attributes in ({"codec": lambda: None}, {"codec": Angry()}, deep, Angry()):
        x = np.arange(10)
        handle = shmalloc.copy2shm(x)
        outcome = consume(dataclasses.replace(handle, attributes=attributes), x, handle.name)
        assert isinstance(outcome, shmalloc.CorruptHandleError)


@FUZZ
@given(token=st.binary(min_size=0, max_size=64))
def test_forged_tokens_are_refused(token):
    """A handle whose token was guessed or forged never yields data, and the segment is still consumed."""
    x = np.arange(100.0)
    handle = shmalloc.copy2shm(x)
    if token == handle.token:  # 2**-128: a test that never runs, kept for exactness
        shmalloc.unlink(handle)
        return
    outcome = consume(dataclasses.replace(handle, token=token), x, handle.name)
    assert isinstance(outcome, shmalloc.CorruptHandleError)


def test_handle_that_is_not_a_shmobj():
    """Look-alikes of ShmObj (dicts, tuples, other dataclasses) are a TypeError and consume nothing."""
    x = np.arange(3)
    handle = shmalloc.copy2shm(x)
    try:
        for fake in (dataclasses.asdict(handle), dataclasses.astuple(handle), handle.name, None):
            with pytest.raises(TypeError):
                shmalloc.allocate_from_shm(fake)
        assert exists(handle.name)
    finally:
        shmalloc.unlink(handle)


# ---- damaged segments (the same user wrote garbage into one) ----

_DAMAGE_SCRIPT = textwrap.dedent(
    """
    import json, random, sys, collections, numpy as np, shmalloc
    random.seed(int(sys.argv[1]))
    x = np.arange(64, dtype=np.int32)
    outcomes = collections.Counter()
    for i in range(int(sys.argv[2])):
        h = shmalloc.copy2shm(x)
        with open("/dev/shm" + h.name, "r+b") as f:
            for _ in range(random.randrange(1, 4)):
                f.seek(random.randrange(0, 400))
                f.write(bytes([random.randrange(256)]))
        try:
            y = shmalloc.allocate_from_shm(h, copy=bool(i % 2))
            outcomes["right data" if np.array_equal(x, y) else "WRONG DATA"] += 1
            del y
        except Exception as e:
            outcomes[type(e).__name__] += 1
    print(json.dumps(outcomes))
    """
)


def test_damaged_segment_header_or_recipe():
    """Random bytes written over a segment's header and recipe give CorruptHandleError (or a codec's
    ValueError that the stored array does not match its attributes) or the right data."""
    proc = subprocess.run([sys.executable, "-c", _DAMAGE_SCRIPT, "1", "300"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died: {proc.returncode} {proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout.splitlines()[-1])
    assert set(outcomes) <= {"right data", "CorruptHandleError", "ValueError"}, outcomes


def test_damaged_segment_never_crashes():
    """Whatever garbage is in the header and recipe, the process survives and leaves nothing behind."""
    proc = subprocess.run([sys.executable, "-c", _DAMAGE_SCRIPT, "2", "300"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died: {proc.returncode} {proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout.splitlines()[-1])
    assert sum(outcomes.values()) == 300 and "WRONG DATA" not in outcomes


# ---- segments changed between copy2shm and allocate_from_shm ----

_PRODUCER = "import pickle, sys, numpy as np, shmalloc; sys.stdout.buffer.write(pickle.dumps(shmalloc.copy2shm(np.arange(5000.0))))"


def produce() -> shmalloc.ShmObj:
    """A handle made by another process."""
    return pickle.loads(subprocess.run([sys.executable, "-c", _PRODUCER], capture_output=True, check=True).stdout)


@pytest.mark.parametrize("change", [+1, -1, +4096, -4096, "empty"])
@pytest.mark.parametrize("copy", [True, False])
def test_resized_segment_is_refused_before_mapping(change, copy):
    """A segment resized after copy2shm gives CorruptHandleError; nothing is mapped and the name is gone."""
    handle = produce()
    path = SHM / handle.name[1:]
    os.truncate(path, 0 if change == "empty" else handle.size + change)
    outcome = consume(handle, np.arange(5000.0), handle.name, copy)
    assert isinstance(outcome, shmalloc.CorruptHandleError) and "bytes" in str(outcome)
    assert not path.exists()


@pytest.mark.parametrize("copy", [True, False])
def test_replaced_segment_is_refused(copy):
    """A segment replaced by another shmalloc object of the same size is caught by the token."""
    handle = produce()
    shmalloc.unlink(handle)
    replacement = shmalloc.copy2shm(np.arange(5000.0)[::-1].copy(), name=handle.name)
    assert replacement.size == handle.size
    outcome = consume(handle, np.arange(5000.0), handle.name, copy)
    assert isinstance(outcome, shmalloc.CorruptHandleError) and "token" in str(outcome)


def test_replaced_by_foreign_bytes_is_refused():
    """A segment replaced by a file of the right size that shmalloc did not write is refused (bad magic)."""
    handle = produce()
    path = SHM / handle.name[1:]
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_bytes(handle.size))
    os.close(fd)
    outcome = consume(handle, np.arange(5000.0), handle.name)
    assert isinstance(outcome, shmalloc.CorruptHandleError) and "magic" in str(outcome)


# ---- other users ----

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as, or give a segment to, another user")


def test_segments_are_private_and_exclusive(shm_name):
    """Segments are created with mode 0600, and an existing name is never overwritten by default."""
    handle = shmalloc.copy2shm(np.arange(10), name=shm_name)
    try:
        assert (SHM / shm_name[1:]).stat().st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            shmalloc.copy2shm(np.zeros(10), name=shm_name)
        assert same(np.arange(10), shmalloc.allocate_from_shm(handle))
    finally:
        if exists(shm_name):
            shmalloc.unlink(shm_name)


@needs_root
@pytest.mark.parametrize("copy", [True, False])
def test_segment_of_another_user_is_refused(copy):
    """A segment owned by another user is refused with PermissionError (EPERM), left in place, never mapped."""
    x = np.arange(1000)
    handle = shmalloc.copy2shm(x)
    path = SHM / handle.name[1:]
    os.chown(path, 65534, 65534)
    mapped = _posix.live_mappings()
    try:
        with pytest.raises(PermissionError) as info:
            shmalloc.allocate_from_shm(handle, copy=copy)
        assert isinstance(info.value, shmalloc.ShmError) and info.value.errno == errno.EPERM
        assert path.exists(), "another user's segment was unlinked"
        assert _posix.live_mappings() == mapped
    finally:
        path.unlink(missing_ok=True)


_OTHER_USER = textwrap.dedent(
    """
    import os, pickle, sys, pandas, shmalloc  # imported while still allowed to read them
    handle = pickle.loads(bytes.fromhex(sys.argv[1]))
    os.setgid(65534); os.setuid(65534)
    try:
        shmalloc.allocate_from_shm(handle)
    except shmalloc.ShmError as exc:
        print(type(exc).__name__, exc.errno)
    shmalloc.gc()
    """
)


@needs_root
def test_another_user_cannot_read_or_remove():
    """Another user's process can neither read a segment (EACCES) nor remove it, with a handle or with gc."""
    x = np.arange(1000)
    handle = shmalloc.copy2shm(x)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _OTHER_USER, pickle.dumps(handle).hex()], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["ShmPermissionError", str(errno.EACCES)]
        assert same(x, shmalloc.allocate_from_shm(handle)), "the segment did not survive intact"
    finally:
        if exists(handle.name):
            shmalloc.unlink(handle)


# ---- names ----

ESCAPES = [
    "/../etc/passwd",
    "/../../tmp/shmalloc_escape",
    "/..",
    "/.",
    "/",
    "",
    "etc/passwd",
    "shmalloc_1_0123456789ab",
    "//tmp",
    "/a/../b",
    "/tmp/x",
    "/x\0/../../etc/passwd",
    "/" + "a" * 254,
    "/\udcff",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_names_cannot_escape_dev_shm(name):
    """Names with a path, NUL, no leading '/', or too long are refused by every entry point, touching nothing."""
    with pytest.raises(ValueError):
        shmalloc.copy2shm(np.arange(3), name=name)
    with pytest.raises(ValueError):
        shmalloc.unlink(name)
    handle = dataclasses.replace(shmalloc.ShmObj("/placeholder", "int64", 3, 8192, {}, True, b"t" * 16), name=name)
    with pytest.raises(ValueError):
        shmalloc.allocate_from_shm(handle)
    assert not Path("/tmp/shmalloc_escape").exists()


@pytest.mark.parametrize("name", [5, b"/bytes_name", ["/x"]])
def test_names_of_wrong_type(name):
    """A name that is not a str is a TypeError."""
    with pytest.raises(TypeError):
        shmalloc.copy2shm(np.arange(3), name=name)
    with pytest.raises(TypeError):
        shmalloc.unlink(name)
    with pytest.raises(TypeError):
        shmalloc.unlink(None)


def test_symlink_in_dev_shm_is_not_followed(shm_name, tmp_path):
    """A symlink planted under a segment's name is not followed: no read of, or write to, its target."""
    target = tmp_path / "target"
    target.write_bytes(b"secret" * 2000)
    link = SHM / shm_name[1:]
    link.symlink_to(target)
    try:
        handle = shmalloc.ShmObj(shm_name, "int64", 3, target.stat().st_size, {}, True, b"t" * 16)
        with pytest.raises(shmalloc.ShmError) as info:
            shmalloc.allocate_from_shm(handle)
        assert info.value.errno == errno.ELOOP
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(FileExistsError):
            shmalloc.copy2shm(np.arange(3), name=shm_name)
        handle = shmalloc.copy2shm(np.arange(3), name=shm_name, overwrite=True)
        assert not link.is_symlink()
        shmalloc.unlink(handle)
        assert target.read_bytes() == b"secret" * 2000
    finally:
        link.unlink(missing_ok=True)


def test_directory_under_a_segment_name(shm_name):
    """A directory where a segment should be gives ShmError EINVAL, and stays."""
    path = SHM / shm_name[1:]
    path.mkdir()
    try:
        handle = shmalloc.ShmObj(shm_name, "int64", 3, 8192, {}, True, b"t" * 16)
        with pytest.raises(shmalloc.ShmError) as info:
            shmalloc.allocate_from_shm(handle)
        assert info.value.errno == errno.EINVAL
        assert path.is_dir()
    finally:
        path.rmdir()


_FIFO = textwrap.dedent(
    """
    import sys, shmalloc
    try:
        shmalloc.allocate_from_shm(shmalloc.ShmObj(sys.argv[1], "int64", 3, 8192, {}, True, b"t" * 16))
    except shmalloc.ShmError as exc:
        print("ShmError", exc.errno)
    """
)


def test_fifo_under_a_segment_name_does_not_hang(shm_name):
    """A FIFO planted under a segment's name (any user can make one in /dev/shm) gives an error, not a hang."""
    path = SHM / shm_name[1:]
    os.mkfifo(path)
    try:
        proc = subprocess.run([sys.executable, "-c", _FIFO, shm_name], capture_output=True, text=True, timeout=5)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == "ShmError"
    except subprocess.TimeoutExpired:
        pytest.fail("allocate_from_shm hung on a FIFO")
    finally:
        path.unlink(missing_ok=True)


def test_generated_names_are_unpredictable():
    """Generated names carry the pid and 48 random bits: no two of 10000 are alike."""
    from shmalloc import _names

    generated = {_names.generate() for _ in range(10_000)}
    assert len(generated) == 10_000
    assert all(_names.creator_pid(n) == os.getpid() for n in generated)


@pytest.mark.parametrize(
    "dtype, shape",
    [(np.uint8, (0, 2**70)), (np.float64, (0, 2**62)), (np.uint8, (0,) * 65), (np.int32, (0, 2**40, 2**40))],
)
def test_empty_buffer_shapes_numpy_refuses_are_a_damaged_table(dtype, shape):
    """An empty buffer whose shape numpy cannot make is refused as a damaged buffer table, not a bare ValueError."""
    with pytest.raises(shmalloc.CorruptHandleError, match="damaged buffer table entry"):
        _format._checked_layouts("/shmtest_layout", [(0, np.dtype(dtype), shape, False)], 0)
    fine = (0, np.dtype(dtype), (0, 3), False)
    assert _format._checked_layouts("/shmtest_layout", [fine], 0) == [_format.BufferLayout(*fine)]
