"""shmalloc's peers, by hand: how a worker hands a data frame to its parent with them, and back.

Each peer is a pair: a ``send`` the worker runs on its frame (it returns a
small picklable answer) and a ``receive`` the parent runs on that answer (it
returns the frame). Their shared memory objects are named
``/shmbench_<pid>_<hex>`` with the pid of the benchmark's parent process, so
shmalloc's own tools (``ls``, ``gc``) and the test suite's leak check never
take them for shmalloc's, and the parent can remove what a failure left.
"""
from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import SharedArray
except ImportError:  # an optional peer: its method is then left out
    SharedArray = None

PEER_PREFIX = "shmbench_"
StdlibAnswer = tuple[str, list[tuple[str, str, int, int]]]


def peer_name(parent: int | None = None) -> str:
    """A fresh object name (without the leading "/") for a peer, carrying ``parent`` (default: this process's parent)."""
    return f"{PEER_PREFIX}{os.getppid() if parent is None else parent}_{secrets.token_hex(6)}"


def remove_leftovers(parent: int) -> None:
    """Remove the peers' objects named for ``parent`` (what a failed run left in /dev/shm)."""
    for leftover in Path("/dev/shm").glob(f"{PEER_PREFIX}{parent}_*"):
        leftover.unlink(missing_ok=True)


def send_stdlib(frame: pd.DataFrame) -> StdlibAnswer:
    """In the worker: copy each column into one stdlib SharedMemory block; return its name and the column layout."""
    columns, offset = [], 0
    for column in frame.columns:
        values = frame[column].to_numpy()
        columns.append((column, values.dtype.str, offset, len(values)))
        offset += -(-values.nbytes // 64) * 64  # 64-byte aligned columns
    block = shared_memory.SharedMemory(peer_name(), create=True, size=max(offset, 1))
    for column, dtype, start, length in columns:
        np.ndarray(length, dtype, block.buf, start)[:] = frame[column].to_numpy()
    block.close()
    return block.name, columns


def receive_stdlib(answer: StdlibAnswer) -> pd.DataFrame:
    """In the parent: copy the columns out of the block, then close and unlink it (zero-copy would crash on close)."""
    name, columns = answer
    block = shared_memory.SharedMemory(name)
    try:
        data = {column: np.ndarray(length, dtype, block.buf, start).copy() for column, dtype, start, length in columns}
    finally:
        block.close()  # no view may outlive this: the copies above are the result
        block.unlink()
    return pd.DataFrame(data, copy=False)


def send_shared_array(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """In the worker: create and fill one SharedArray per column; return their names."""
    names = []
    for column in frame.columns:
        values = frame[column].to_numpy()
        name = "shm://" + peer_name()
        SharedArray.create(name, values.shape, values.dtype)[:] = values
        names.append((column, name))
    return names


def receive_shared_array(answer: list[tuple[str, str]]) -> pd.DataFrame:
    """In the parent: attach the arrays (zero-copy) and remove their names; the mappings live with the arrays."""
    data = {}
    for column, name in answer:
        data[column] = SharedArray.attach(name)
        SharedArray.delete(name)
    return pd.DataFrame(data, copy=False)
