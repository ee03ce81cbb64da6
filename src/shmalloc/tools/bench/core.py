"""Core benchmark: copy2shm / allocate_from_shm of plain arrays against raw system calls."""
from __future__ import annotations

import mmap
import os
import pickle
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pandas as pd

import shmalloc

from . import print_table, workloads


def _raw_pwrite(x: np.ndarray) -> str:
    """The floor for copy2shm: create a fresh object and pwrite the bytes into it."""
    name = f"/shmalloc_{os.getpid()}_{secrets.token_hex(6)}"
    fd = os.open("/dev/shm" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view, offset = x.data.cast("B"), 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset : offset + (1 << 30)], offset)
    finally:
        os.close(fd)
    return name


def _mmap_memcpy(name: str, nbytes: int) -> np.ndarray:
    """The floor for allocate_from_shm(copy=True): map the object and copy it out with numpy."""
    fd = os.open("/dev/shm" + name, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    out = np.empty(nbytes, np.uint8)
    np.copyto(out, np.frombuffer(mapping, np.uint8))
    mapping.close()
    return out


def _raw_round_trip(columns: list[np.ndarray]) -> list[np.ndarray]:
    """The floor for a small result's round trip: the columns pwritten into a fresh object, which is
    opened, checked (fstat), unlinked and mapped privately, one mapping per column, every page touched."""
    name = "/dev/shm" + f"/shmalloc_{os.getpid()}_{secrets.token_hex(6)}"
    page = mmap.PAGESIZE
    offsets = np.cumsum([0] + [-(-c.nbytes // page) * page for c in columns])
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for column, offset in zip(columns, offsets, strict=False):
            os.pwrite(fd, column.data.cast("B"), int(offset))
    except BaseException:
        os.unlink(name)
        raise
    finally:
        os.close(fd)
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fstat(fd)
        os.unlink(name)
        views = []
        for column, offset in zip(columns, offsets, strict=False):
            mapping = mmap.mmap(fd, column.nbytes, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=int(offset))
            views.append(np.frombuffer(mapping, column.dtype))
    finally:
        os.close(fd)
    for view in views:
        _touch(view)
    return views


def _touch(array: np.ndarray) -> None:
    """Read a byte of every page, as a user reading the result would."""
    array.view(np.uint8)[:: mmap.PAGESIZE].sum()


def _touch_frame(frame: pd.DataFrame) -> None:
    """Read a byte of every page of every column (the benchmark's frames have unique labels)."""
    for column in frame.columns:
        _touch(frame[column].to_numpy())


def _small_round_trips(repeat: int) -> list[list[object]]:
    """Microseconds of one round trip in one process, for the frame of SMALL_ROWS rows and its float column."""
    frame = workloads.frame(workloads.SMALL_ROWS)
    array = frame["x"].to_numpy()
    columns = [frame[c].to_numpy() for c in frame.columns]

    def shm_frame(copy: bool) -> None:
        _touch_frame(shmalloc.allocate_from_shm(shmalloc.copy2shm(frame), copy=copy))

    def shm_array() -> None:
        _touch(shmalloc.allocate_from_shm(shmalloc.copy2shm(array), copy=False))

    def raw_frame() -> None:
        views = _raw_round_trip(columns)
        _touch_frame(pd.DataFrame(dict(zip(frame.columns, views, strict=True)), copy=False))

    # Every method's result is read the same way (what a user reading it pays, pages included).
    methods: dict[str, Callable[[], object]] = {
        "frame: pickle dumps + loads": lambda: _touch_frame(pickle.loads(pickle.dumps(frame, protocol=5))),
        "frame: shmalloc, copy=False": lambda: shm_frame(False),
        "frame: shmalloc, copy=True": lambda: shm_frame(True),
        "frame: floor (os calls by hand, DataFrame of the mappings)": raw_frame,
        "float64 column: pickle dumps + loads": lambda: _touch(pickle.loads(pickle.dumps(array, protocol=5))),
        "float64 column: shmalloc, copy=False": shm_array,
        "float64 column: floor (os calls by hand)": lambda: _raw_round_trip([array]),
    }
    times: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(max(repeat, 1) * 40):  # interleaved
        for label, method in methods.items():
            seconds, _ = _timed(method)
            times[label].append(seconds)
    medians = {label: float(np.median(t)) * 1e6 for label, t in times.items()}
    rows = []
    for label, us in medians.items():
        kind = label.split(":")[0]
        pickled = medians[f"{kind}: pickle dumps + loads"]
        floor = next(v for k, v in medians.items() if k.startswith(f"{kind}: floor"))
        rows.append([label, us, us / pickled, us / floor])
    return rows


_T = TypeVar("_T")


def _timed(func: Callable[..., _T], *args: object) -> tuple[float, _T]:
    start = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - start, result


def run(quick: bool = False, repeat: int = 5) -> None:
    """Print the core tables: filling and reading segments, zero-copy allocation time by size."""
    (nbytes,) = workloads.CORE_ARRAY_BYTES.pick(quick)
    x = workloads.random_bytes(nbytes)
    fill: dict[str, list[float]] = {"copy2shm": [], "raw pwrite": []}
    read: dict[str, list[float]] = {"allocate_from_shm(copy=True)": [], "mmap + numpy copy": []}
    for _ in range(repeat):  # interleaved, so both see the same machine
        seconds, obj = _timed(shmalloc.copy2shm, x)
        fill["copy2shm"].append(seconds)
        seconds, name = _timed(_raw_pwrite, x)
        fill["raw pwrite"].append(seconds)
        seconds, _ = _timed(_mmap_memcpy, name, nbytes)
        read["mmap + numpy copy"].append(seconds)
        os.unlink("/dev/shm" + name)
        seconds, _ = _timed(shmalloc.allocate_from_shm, obj, True)
        read["allocate_from_shm(copy=True)"].append(seconds)
    rows = []
    for table in (fill, read):
        floor = float(np.median(list(table.values())[1]))
        for method, times in table.items():
            t = float(np.median(times))
            rows.append([method, t * 1e3, nbytes / t / 1e9, floor / t])
    print_table(
        f"Filling and reading one array of {nbytes / 1e6:.0f} MB (median of {repeat})",
        ["method", "ms", "GB/s", "throughput vs. floor"],
        rows,
    )
    print()
    sizes = workloads.CORE_ZERO_COPY_BYTES.pick(quick)
    rows = []
    for size in sizes:
        times = []
        for _ in range(repeat):
            obj = shmalloc.copy2shm(np.ones(size, np.uint8))
            seconds, array = _timed(shmalloc.allocate_from_shm, obj, False)
            times.append(seconds)
            del array
        rows.append([f"{size >> 20} MiB", float(np.median(times)) * 1e3])
    print_table("allocate_from_shm(copy=False): time to a usable array", ["size", "ms"], rows)
    print()
    print_table(
        f"One small result's round trip in one process: the benchmark frame of {workloads.SMALL_ROWS:.0e} rows"
        " and its float64 column, every page of the result read (median of many)",
        ["round trip", "µs", "x pickle", "x floor"],
        _small_round_trips(repeat),
    )
