"""Shared fixtures: every test must leave /dev/shm as it found it."""
from __future__ import annotations

import os
import re
import secrets
import sys
import threading
import time
import warnings
from pathlib import Path

# Threads of other libraries would make every fork of this process warn (see no_fork_with_threads):
# numpy's OpenBLAS starts a pool at import, pyarrow's jemalloc a background thread. Without
# them, a fork that warns means a thread of shmalloc, or of the test itself.
_QUIET_LIBRARIES = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
if ("numpy" in sys.modules or "pyarrow" in sys.modules) and any(
    os.environ.get(name) != value for name, value in _QUIET_LIBRARIES.items()
):
    raise RuntimeError(
        "numpy or pyarrow was imported before tests/conftest.py could switch their threads off: set "
        + " ".join(f"{name}={value}" for name, value in _QUIET_LIBRARIES.items())
        + " in the environment"
    )
for _name, _value in _QUIET_LIBRARIES.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

from shmalloc import _posix  # noqa: E402
from shmalloc._threads import wait_until_gone  # noqa: E402

SHM_DIR = Path("/dev/shm")
# Names made by shmalloc (/shmalloc_<pid>_...) and by these tests (/shmtest_<pid>_...).
_OWNED = re.compile(r"^(?:shmalloc|shmtest)_(\d+)_")


def _segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if not n.startswith("sem.")}
    except FileNotFoundError:
        return set()


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _belongs_to_other_run(name: str) -> bool:
    """Whether a new segment is someone else's: not named by shmalloc or these tests, or made
    by a live process outside this process tree (a concurrent run)."""
    match = _OWNED.match(name)
    if not match:
        return True
    pid = int(match.group(1))
    me = os.getpid()
    seen = 0
    while pid and seen < 64:
        if pid == me:
            return False
        parent = _parent_of(pid)
        if parent is None:
            return False  # dead creator: it was ours if it was made during the test
        pid, seen = parent, seen + 1
    return True


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail the test if it leaves a new shared memory object behind (and remove it)."""
    before = _segments()
    yield
    leaked = sorted(n for n in _segments() - before if not _belongs_to_other_run(n))
    # A segment whose creator died may be a concurrent run's result that its parent is about to
    # consume (the process tree of a dead creator is unknown): give such segments a moment to go.
    deadline = time.monotonic() + 2.0
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [n for n in leaked if (SHM_DIR / n).exists() and not _belongs_to_other_run(n)]
    for name in leaked:
        try:
            (SHM_DIR / name).unlink()
        except OSError:
            pass
    if leaked:
        pytest.fail(f"test leaked shared memory objects: {leaked}", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_unmap_failures: the test makes freeing an array fail to unmap, on purpose")
    config.addinivalue_line(
        "markers", "allow_fork_with_threads: the test forks while threads of its own run, on purpose"
    )


# Python 3.12+ warns after a fork in the parent if the process had other threads. It warns from C
# once the child exists, so -W error cannot make it an exception: the warnings are recorded instead.
FORK_WITH_THREADS = re.compile(r"is multi-threaded, use of fork\(\)")
# What other threads the process had at its latest fork: named in the failure, to find whose they were.
_threads_at_fork: list[str] = []


def _record_threads_at_fork() -> None:
    python_threads = [t for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = -1
    _threads_at_fork[:] = [f"{t.name} (native id {t.native_id})" for t in python_threads] + [f"{tasks} OS threads"]


os.register_at_fork(before=_record_threads_at_fork)


def _wait_for_ended_threads(limit: float = 1.0) -> None:
    """A thread that an earlier test joined (a standard executor's manager thread, say) may live on a moment
    as an OS thread, and the next test's first fork would count it: wait until it is gone."""
    if threading.active_count() > 1:
        return  # live Python threads: the test's own business
    try:
        tasks = {int(task) for task in os.listdir("/proc/self/task")}
    except OSError:  # no /proc: nothing to wait for
        return
    wait_until_gone(tasks - {threading.get_native_id()}, limit)


@pytest.fixture(autouse=True)
def no_fork_with_threads(request):
    """Fail the test if the process forked while it had other threads (none of shmalloc's may be alive at a fork)."""
    _wait_for_ended_threads()
    with warnings.catch_warnings(record=True) as caught:
        # only this warning's filter changes: the others keep pytest's and the test's settings
        warnings.filterwarnings("always", message=".*" + FORK_WITH_THREADS.pattern, category=DeprecationWarning)
        yield
    forks = [w for w in caught if FORK_WITH_THREADS.search(str(w.message))]
    for w in caught:  # hand the others on to pytest's own warning capture
        if w not in forks:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if forks and not request.node.get_closest_marker("allow_fork_with_threads"):
        pytest.fail(
            f"{len(forks)} forks while the process had other threads: {forks[0].message}"
            f" (at the latest fork: {', '.join(_threads_at_fork)})",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def no_failed_unmaps(request):
    """Fail the test if an array freed during it could not unmap its mapping (the core counts such failures)."""
    before, _ = _posix.unmap_failures()
    yield
    after, last = _posix.unmap_failures()
    if after != before and not request.node.get_closest_marker("allow_unmap_failures"):
        pytest.fail(f"{after - before} mappings failed to unmap (last errno {last})", pytrace=False)


@pytest.fixture
def shm_name() -> str:
    """A fresh explicit name that the leak check recognises as this run's."""
    return f"/shmtest_{os.getpid()}_{secrets.token_hex(6)}"


@pytest.fixture
def map_every_size(monkeypatch):
    """Make allocate_from_shm(copy=False) map, and copy=True copy from a mapping, whatever the size: small
    segments are otherwise read with pread (see shmalloc._transfer and _adopt), and the tests of mappings
    use small arrays. In this process and in the children it forks."""
    from shmalloc import _adopt, _transfer

    monkeypatch.setattr(_transfer, "MAP_FROM", 0)
    monkeypatch.setattr(_adopt, "READ_LIMIT", -1)
