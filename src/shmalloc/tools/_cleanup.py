"""Leftover segments: list shmalloc's segments in /dev/shm and remove those nobody will consume.

A segment is *ours* when its name is one shmalloc generates
(``/shmalloc_<pid>_<12 hex digits>``) and this user owns it. Its creator is
*alive* when a process with that pid exists and started before the segment
was written; a process that started later only reuses the pid (the creator
died, the kernel handed its pid on), so its segment counts as orphaned.

Nothing here ever touches a name shmalloc did not generate, a segment of
another user, or a segment whose creator is alive.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd  # a hard dependency, loaded by `import shmalloc` anyway (its .shm accessor)

from .. import _names, _posix
from .._posix import SHM_DIR
from ..errors import ShmError

# /proc gives a process's start time in clock ticks since boot, and the boot
# time in whole seconds: allow for that rounding before calling a pid reused.
_START_SLACK = 2.0
#: Segments younger than this (seconds) are kept by default: a handle may be in flight for that long.
#: A producer may hand a segment on and exit before its consumer opens it (a worker of
#: concurrent.futures or of a job queue does exactly that), and the consumer may be busy with
#: earlier results for minutes; ten minutes covers queues that deep, while a real leftover
#: of a crash is still collected within the hour.
DEFAULT_OLDER_THAN = 600.0
COLUMNS = ["name", "pid", "alive", "size", "age", "created"]


@dataclass(frozen=True)
class _Entry:
    name: str
    pid: int
    alive: bool
    size: int
    age: float
    created: float


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_stat(pid: int) -> tuple[str, float | None] | None:
    """State letter and wall-clock start time of process ``pid`` from /proc, or None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ")": split after its last ")".
    fields = raw.rsplit(")", 1)[1].split()
    boot = _boot_time()
    start = None if boot is None else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    return fields[0], start


def _exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def creator_alive(pid: int, created: float) -> bool:
    """Whether the process that created a segment at time ``created`` is still running.

    A live process with that pid that started more than a moment after the
    segment was written cannot have written it: the pid was reused. A zombie
    (exited, not yet reaped) is dead.
    """
    if not _exists(pid):
        return False
    info = _proc_stat(pid)
    if info is None:
        return True  # no /proc: trust the pid
    state, started = info
    if state in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return started is None or started <= created + _START_SLACK


def _scan(directory: Path) -> list[_Entry]:
    entries = []
    now = time.time()
    uid = os.geteuid()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for filename in names:
        pid = _names.creator_pid(filename)
        if pid is None:
            continue
        try:
            st = os.lstat(directory / filename)
        except FileNotFoundError:
            continue  # consumed meanwhile
        if st.st_uid != uid or not stat.S_ISREG(st.st_mode):
            continue
        # A segment is written once, when it is created: its mtime is its birth.
        created = st.st_mtime
        entries.append(_Entry("/" + filename, pid, creator_alive(pid, created), st.st_size, now - created, created))
    entries.sort(key=lambda e: e.created)
    return entries


def _frame(entries: list[_Entry]) -> "pd.DataFrame":
    frame = pd.DataFrame(
        {
            "name": pd.Series([e.name for e in entries], dtype=object),
            "pid": pd.Series([e.pid for e in entries], dtype="int64"),
            "alive": pd.Series([e.alive for e in entries], dtype="bool"),
            "size": pd.Series([e.size for e in entries], dtype="int64"),
            "age": pd.Series([e.age for e in entries], dtype="float64"),
            "created": pd.to_datetime(pd.Series([e.created for e in entries], dtype="float64"), unit="s", utc=True),
        },
        columns=COLUMNS,
    )
    return frame


def segments() -> "pd.DataFrame":
    """List this user's shmalloc segments that nobody has consumed yet.

    Returns
    -------
    pandas.DataFrame
        One row per segment, oldest first, with columns ``name`` (as given
        to :func:`allocate_from_shm`, e.g. ``'/shmalloc_4711_0123456789ab'``),
        ``pid`` (of the creating process), ``alive`` (whether that process
        still runs), ``size`` (bytes), ``age`` (seconds since it was written)
        and ``created`` (UTC timestamp). Empty if there are none, or on a
        system without /dev/shm.

    Examples
    --------
    >>> import shmalloc
    >>> list(shmalloc.segments().columns)
    ['name', 'pid', 'alive', 'size', 'age', 'created']
    """
    return _frame(_scan(SHM_DIR))


# ---------------------------------------------------------------------------
# Objects held open after their name was removed: a Pool's spares, the objects
# under copy=False results. `ls /dev/shm` does not show them, `df` counts them.


HELD_COLUMNS = ["name", "size", "pid", "command", "fds", "maps", "inode"]
_DELETED = " (deleted)"


@dataclass(frozen=True)
class _Held:
    name: str
    size: int
    pid: int
    command: str
    fds: int
    maps: int
    inode: int


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def _held_by_fds(pid: int, prefix: str, device: int, objects: dict[int, list]) -> None:
    """Add the unlinked objects that process ``pid`` holds by descriptor: inode -> [name, size, fds, maps]."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not (target.startswith(prefix) and target.endswith(_DELETED)):
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")  # the object itself, through the descriptor
        except OSError:
            continue  # closed meanwhile
        if st.st_dev != device or st.st_nlink != 0 or not stat.S_ISREG(st.st_mode):
            continue  # another mount's /dev/shm, or a name was given to it again
        entry = objects.setdefault(st.st_ino, ["/" + target[len(prefix) : -len(_DELETED)], st.st_size, 0, 0])
        entry[2] += 1


def _held_by_maps(pid: int, prefix: str, device: int, objects: dict[int, list]) -> None:
    """Add the unlinked objects that process ``pid`` maps (arrays of ``copy=False`` results, workers' refills)."""
    with open(f"/proc/{pid}/maps") as maps:
        lines = [line for line in maps if line.rstrip("\n").endswith(_DELETED) and prefix in line]
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(prefix):
            continue
        major, minor = (int(part, 16) for part in fields[3].split(":"))
        if os.makedev(major, minor) != device:
            continue
        inode, name = int(fields[4]), "/" + fields[5].rstrip("\n")[len(prefix) : -len(_DELETED)]
        if inode not in objects:
            try:  # the object's size; map_files is readable only with enough privilege
                size = os.stat(f"/proc/{pid}/map_files/{fields[0]}").st_size
            except OSError:
                start, end = (int(part, 16) for part in fields[0].split("-"))
                size = int(fields[2], 16) + end - start  # at least what this mapping reaches
            objects[inode] = [name, size, 0, 0]
        objects[inode][3] += 1


def _scan_held(directory: Path) -> list[_Held]:
    """Unlinked objects of ``directory``'s file system that this user's live processes hold open or mapped."""
    try:
        device = os.stat(directory).st_dev
        pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    except OSError:
        return []  # no /dev/shm or no /proc (macOS)
    prefix, uid = str(directory).rstrip("/") + "/", os.geteuid()
    found: list[_Held] = []
    for pid in pids:
        objects: dict[int, list] = {}  # inode -> [name, size, descriptors, mappings]
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            _held_by_fds(pid, prefix, device, objects)
            _held_by_maps(pid, prefix, device, objects)
        except OSError:
            if not objects:
                continue  # exited meanwhile, or not ours to read
        if objects:
            command = _command(pid)
            found.extend(_Held(name, size, pid, command, fds, maps, inode) for inode, (name, size, fds, maps) in objects.items())
    return found


def held_objects() -> "pd.DataFrame":
    """List shared memory objects whose name is gone but that this user's processes still hold or map.

    A :class:`shmalloc.Pool` keeps such objects as spares, and the objects of
    consumed segments stay while arrays of ``copy=False`` results map them:
    ``ls /dev/shm`` and :func:`segments` do not show them, but they take
    space (``df``). Found through ``/proc/<pid>/fd`` and ``/proc/<pid>/maps``
    of this user's live processes (Linux).

    Returns
    -------
    pandas.DataFrame
        One row per object and holding process, largest first, with columns
        ``name`` (the name the object had), ``size`` (bytes), ``pid`` and
        ``command`` of the holder, ``fds`` and ``maps`` (its descriptors and
        mappings of the object) and ``inode`` (the same inode under several
        pids is one object).
        Empty where there is no /proc.
    """
    found = sorted(_scan_held(SHM_DIR), key=lambda h: (-h.size, h.pid, h.inode))
    return pd.DataFrame(
        {
            "name": pd.Series([h.name for h in found], dtype=object),
            "size": pd.Series([h.size for h in found], dtype="int64"),
            "pid": pd.Series([h.pid for h in found], dtype="int64"),
            "command": pd.Series([h.command for h in found], dtype=object),
            "fds": pd.Series([h.fds for h in found], dtype="int64"),
            "maps": pd.Series([h.maps for h in found], dtype="int64"),
            "inode": pd.Series([h.inode for h in found], dtype="int64"),
        },
        columns=HELD_COLUMNS,
    )


def _parse_age(value: float | str | None) -> float:
    if value is None:
        return DEFAULT_OLDER_THAN
    if isinstance(value, bool):
        raise TypeError("older_than must be a number of seconds or a duration string, not bool")
    seconds = parse_duration(value) if isinstance(value, str) else float(value)
    if seconds != seconds or seconds < 0:
        raise ValueError(f"older_than must be a non-negative number of seconds, not {value!r}")
    return seconds


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``'90'``, ``'90s'``, ``'15m'``, ``'2h'`` or ``'1d'``."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 15m, 2h, 1d)") from None
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 15m, 2h, 1d)")
    return seconds


@dataclass(frozen=True)
class GcResult:
    """What a collection did: segments removed (or that would be), kept, and failures."""

    removed: "pd.DataFrame"
    kept: "pd.DataFrame"
    failed: dict[str, ShmError]


def collect(older_than: float | str | None = DEFAULT_OLDER_THAN, dry_run: bool = False) -> GcResult:
    """Do the work of :func:`gc` and report everything (used by the command line)."""
    min_age = _parse_age(older_than)
    removed, kept, failed = [], [], {}
    for entry in _scan(SHM_DIR):
        if entry.alive or entry.age < min_age:
            kept.append(entry)
            continue
        if not dry_run:
            try:
                _posix.unlink(entry.name)
            except ShmError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: consumed meanwhile, nothing left to do
                    failed[entry.name] = exc
                continue
        removed.append(entry)
    return GcResult(_frame(removed), _frame(kept), failed)


def gc(older_than: float | str | None = DEFAULT_OLDER_THAN, dry_run: bool = False) -> "pd.DataFrame":
    """Remove this user's shmalloc segments whose creating process is dead and that are not young.

    Never touches names shmalloc did not generate, segments of other users,
    or segments whose creator still runs (it may yet hand them on).

    A process may hand a segment on and exit before the receiver consumes it
    (a worker of ``concurrent.futures`` returning a result does exactly
    that): such a segment looks orphaned until it is consumed. So by default
    segments younger than ten minutes are kept; ``older_than=0`` removes
    every orphan, which is safe only when nothing else uses shmalloc.

    Parameters
    ----------
    older_than : float or str, default 600 (ten minutes)
        Only remove segments at least this old: seconds, or a string such as
        ``'90s'``, ``'15m'``, ``'2h'``, ``'1d'``. ``0``: any age. None: the
        default.
    dry_run : bool, default False
        Only report what would be removed.

    Returns
    -------
    pandas.DataFrame
        The segments removed (or, with ``dry_run``, that would be), with the
        columns of :func:`segments`.

    Raises
    ------
    ShmError
        The first failure, if a segment could not be removed (the others are
        removed all the same).
    ValueError
        For a negative or malformed ``older_than``.

    Examples
    --------
    >>> import shmalloc
    >>> list(shmalloc.gc(dry_run=True).columns)  # what a plain gc would remove
    ['name', 'pid', 'alive', 'size', 'age', 'created']
    """
    result = collect(older_than, dry_run)
    if result.failed:
        raise next(iter(result.failed.values()))
    return result.removed
