"""Core benchmark: copy2shm / allocate_from_shm of plain arrays against raw system calls."""
from __future__ import annotations

import mmap
import os
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

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
