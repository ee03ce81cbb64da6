"""Leftover segments: shmalloc.segments() lists them, shmalloc.gc() removes only orphans of ours.

/dev/shm is shared with whatever else runs on the machine, so removals here
are limited with ``older_than`` to segments whose mtime the test moved two
decades back; a full, unrestricted gc runs in a private /dev/shm (a mount
namespace) at the end.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import shmalloc
from shmalloc.tools import _cleanup

SHM = Path("/dev/shm")
ANCIENT = time.time() - 20 * 365 * 86400
OLDER_THAN = "7000d"  # only the segments these tests made ancient qualify


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def our_name(pid: int) -> str:
    return f"/shmalloc_{pid}_{secrets.token_hex(6)}"


def make_segment(name: str, ancient: bool = True) -> shmalloc.ShmObj:
    handle = shmalloc.copy2shm(np.arange(1000), name=name)
    if ancient:
        os.utime(SHM / name[1:], (ANCIENT, ANCIENT))
    return handle


def exists(name: str) -> bool:
    return (SHM / name[1:]).exists()


def remove(*names: str) -> None:
    # Through the file system, not shmalloc: some tests patch shmalloc's unlink.
    for name in names:
        (SHM / name[1:]).unlink(missing_ok=True)


def listed(name: str):
    frame = shmalloc.segments()
    rows = frame[frame["name"] == name]
    return None if rows.empty else rows.iloc[0]


def test_empty_listing_has_typed_columns():
    """With no segment of ours the listing is an empty frame with the documented columns and dtypes."""
    frame = _cleanup._frame([])
    assert list(frame.columns) == ["name", "pid", "alive", "size", "age", "created"]
    assert str(frame["pid"].dtype) == "int64" and str(frame["alive"].dtype) == "bool"
    assert str(frame["size"].dtype) == "int64" and str(frame["created"].dtype).startswith("datetime64")


def test_crashed_producer_is_listed_dead_and_collected():
    """A segment whose creating process exited unconsumed is listed as dead and gc removes it."""
    code = "import os, numpy as np, shmalloc; h = shmalloc.copy2shm(np.ones(5000)); print(h.name, h.size, flush=True); os._exit(0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    name, size = out.split()
    try:
        row = listed(name)
        assert row is not None
        assert not row["alive"] and row["size"] == int(size) and row["pid"] == int(name.split("_")[1])
        assert 0 <= row["age"] < 3600
        os.utime(SHM / name[1:], (ANCIENT, ANCIENT))
        assert name in set(shmalloc.gc(older_than=OLDER_THAN, dry_run=True)["name"])
        assert exists(name), "dry_run removed a segment"
        removed = shmalloc.gc(older_than=OLDER_THAN)
        assert name in set(removed["name"])
        assert not exists(name)
    finally:
        remove(name)


def test_live_producer_is_kept():
    """A segment whose creator still runs is listed alive and gc keeps it, whatever its age."""
    code = textwrap.dedent(
        """
        import sys, numpy as np, shmalloc
        h = shmalloc.copy2shm(np.ones(100))
        print(h.name, flush=True)
        sys.stdin.read()
        shmalloc.unlink(h)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        row = listed(name)
        assert row is not None and row["alive"] and row["pid"] == child.pid
        assert name not in set(shmalloc.gc(dry_run=True)["name"])
        assert exists(name)
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    assert not exists(name)


def test_reused_pid_counts_as_dead():
    """A live process that started after the segment was written is not its creator: the segment is an orphan."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    name = our_name(sleeper.pid)
    try:
        make_segment(name)  # written "twenty years ago", long before the sleeper started
        row = listed(name)
        assert row is not None and not row["alive"]
        assert name in set(shmalloc.gc(older_than=OLDER_THAN)["name"])
        assert not exists(name)
    finally:
        sleeper.stdin.close()
        sleeper.wait(timeout=60)
        remove(name)


def test_zombie_creator_counts_as_dead():
    """A creator that exited but was not yet reaped by its parent (a zombie) is dead."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: make a segment, report its name, exit without consuming it
        os.close(read)
        os.write(write, shmalloc.copy2shm(np.arange(10)).name.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        name = pipe.read().decode()
    try:
        zombie, deadline = Path(f"/proc/{pid}/stat"), time.monotonic() + 60
        while zombie.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        row = listed(name)
        assert row is not None and row["pid"] == pid and not row["alive"]
    finally:
        os.waitpid(pid, 0)
        remove(name)


def test_own_fresh_segment_is_alive():
    """A segment this process just wrote under its own pid is alive, and gc leaves it."""
    handle = make_segment(our_name(os.getpid()), ancient=False)
    try:
        row = listed(handle.name)
        assert row is not None and row["alive"]
        assert handle.name not in set(shmalloc.gc(dry_run=True)["name"])
    finally:
        remove(handle.name)


def test_older_than_spares_young_orphans():
    """gc(older_than=...) removes an old orphan and keeps a young one of the same dead creator."""
    pid = dead_pid()
    old, young = our_name(pid), our_name(pid)
    try:
        make_segment(old)
        make_segment(young, ancient=False)
        removed = set(shmalloc.gc(older_than=OLDER_THAN)["name"])
        assert old in removed and young not in removed
        assert not exists(old) and exists(young)
        assert listed(young) is not None and not listed(young)["alive"]
    finally:
        remove(old, young)


def test_foreign_names_are_never_touched(shm_name):
    """Names shmalloc does not generate are neither listed nor removed, even if they look close."""
    pid = dead_pid()
    hexpart = "a" + secrets.token_hex(6)[1:]  # a letter, so that its upper case is not a name shmalloc makes
    names = [
        shm_name,
        f"/shmalloc_{pid}_{hexpart.upper()}",
        f"/shmalloc_{pid}_{hexpart}0",
        f"/shmalloc_{pid}_{hexpart[:-1]}",
        f"/shmalloc_{pid}x_{hexpart}",
        f"/xshmalloc_{pid}_{hexpart}",
    ]
    try:
        for name in names:
            make_segment(name)
        frame = shmalloc.segments()
        assert not set(names) & set(frame["name"])
        shmalloc.gc(older_than=OLDER_THAN)
        assert all(exists(n) for n in names)
    finally:
        remove(*names)


def test_other_users_segments_are_never_touched():
    """A segment with our name pattern but owned by another user is neither listed nor removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a segment to another user")
    name = our_name(dead_pid())
    try:
        make_segment(name)
        os.chown(SHM / name[1:], 65534, 65534)
        assert listed(name) is None
        shmalloc.gc(older_than=OLDER_THAN)
        assert exists(name)
    finally:
        remove(name)


def test_directory_with_our_name_is_ignored():
    """Only regular objects count: a directory named like a segment is skipped, not removed."""
    name = our_name(dead_pid())
    path = SHM / name[1:]
    path.mkdir()
    try:
        os.utime(path, (ANCIENT, ANCIENT))
        assert listed(name) is None
        shmalloc.gc(older_than=OLDER_THAN)
        assert path.is_dir()
    finally:
        path.rmdir()


def test_consumed_meanwhile_is_not_an_error(monkeypatch):
    """A segment consumed between listing and removal (ENOENT) is skipped silently."""
    name = our_name(dead_pid())
    make_segment(name)
    real_unlink = _cleanup._posix.unlink

    def consumed_first(n: str) -> None:
        if n == name:
            real_unlink(n)  # the consumer wins the race
        real_unlink(n)

    monkeypatch.setattr(_cleanup._posix, "unlink", consumed_first)
    try:
        result = _cleanup.collect(older_than=OLDER_THAN)
        assert not result.failed and name not in set(result.removed["name"])
    finally:
        remove(name)


def test_failure_is_reported_and_others_still_removed(monkeypatch):
    """If one removal fails, gc removes the rest and raises that failure (ShmError with its errno)."""
    pid = dead_pid()
    stuck, loose = our_name(pid), our_name(pid)
    make_segment(stuck)
    make_segment(loose)
    real_unlink = _cleanup._posix.unlink

    def refuse(n: str) -> None:
        if n == stuck:
            raise shmalloc.ShmError(13, None, n)
        real_unlink(n)

    monkeypatch.setattr(_cleanup._posix, "unlink", refuse)
    try:
        with pytest.raises(PermissionError) as info:
            shmalloc.gc(older_than=OLDER_THAN)
        assert isinstance(info.value, shmalloc.ShmError) and info.value.filename == stuck
        assert exists(stuck) and not exists(loose)
    finally:
        remove(stuck, loose)


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("1.5m", 90), ("2h", 7200), ("1d", 86400), (" 3H ", 10800), ("0", 0)]
)
def test_parse_duration(text, seconds):
    """Durations accept plain seconds and s/m/h/d suffixes."""
    assert _cleanup.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "-1", "1y", "nan", "inf", "1e400"])
def test_bad_durations_raise(bad):
    """Malformed, negative or infinite durations give ValueError."""
    with pytest.raises(ValueError):
        _cleanup.parse_duration(bad)
    with pytest.raises(ValueError):
        shmalloc.gc(older_than=bad, dry_run=True)


def test_negative_older_than_raises():
    """A negative or NaN number of seconds is refused before anything is removed."""
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            shmalloc.gc(older_than=bad)


# ---- an unrestricted gc, in a private /dev/shm ----


def run_in_private_shm(script: str, *args: str) -> dict:
    """Run ``script`` in its own mount namespace over a fresh 16 MB /dev/shm; return its last line as JSON."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev/shm")
    command = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$0" -c "$@"']
    proc = subprocess.run(command + [sys.executable, script, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


_YOUNG_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, shmalloc
    code = "import numpy as np, shmalloc; print(shmalloc.copy2shm(np.arange(1000)).name)"
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    report = {"name": name, "listed_dead": not shmalloc.segments().set_index("name").loc[name, "alive"]}
    report["plain"] = list(shmalloc.gc()["name"])
    report["none"] = list(shmalloc.gc(older_than=None)["name"])
    report["after_plain"] = os.path.exists("/dev/shm" + name)
    report["forced"] = list(shmalloc.gc(older_than=0)["name"])
    report["after_forced"] = os.path.exists("/dev/shm" + name)
    print(json.dumps(report))
    """
)


def test_plain_gc_keeps_a_young_orphan():
    """gc() with no argument keeps a young segment whose creator exited (a handle in flight); older_than=0 removes it."""
    report = run_in_private_shm(_YOUNG_ORPHAN_SCRIPT)
    assert report["listed_dead"]
    assert report["plain"] == [] and report["none"] == [] and report["after_plain"]
    assert report["forced"] == [report["name"]] and not report["after_forced"]


def test_default_age_is_ten_minutes():
    """The default that gc() and collect() apply is ten minutes, and a bool is not an age."""
    assert _cleanup.DEFAULT_OLDER_THAN == 600.0
    with pytest.raises(TypeError):
        shmalloc.gc(older_than=True, dry_run=True)

_PRIVATE_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, numpy as np, shmalloc
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    orphan = shmalloc.copy2shm(np.arange(10), name=f"/shmalloc_{dead.pid}_0123456789ab")
    mine = shmalloc.copy2shm(np.arange(10))
    foreign = shmalloc.copy2shm(np.arange(10), name=f"/other_{dead.pid}_0123456789ab")
    other_user = shmalloc.copy2shm(np.arange(10), name=f"/shmalloc_{dead.pid}_ba9876543210")
    os.chown("/dev/shm" + other_user.name, 65534, 65534)
    removed = list(shmalloc.gc(older_than=0)["name"])
    left = sorted("/" + n for n in os.listdir("/dev/shm"))
    print(json.dumps({"removed": removed, "left": left, "orphan": orphan.name, "mine": mine.name,
                      "foreign": foreign.name, "other_user": other_user.name}))
    """
)


def test_unrestricted_gc_in_private_shm():
    """In a private /dev/shm, gc(older_than=0) removes exactly the dead creator's segment of this user."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev/shm")
    command = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$0" -c "$1"']
    proc = subprocess.run(command + [sys.executable, _PRIVATE_SCRIPT], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["removed"] == [result["orphan"]]
    assert result["left"] == sorted([result["mine"], result["foreign"], result["other_user"]])
