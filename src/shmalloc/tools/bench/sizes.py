"""Time against size: one worker process returns a data frame to its parent, by several methods.

The frame is bettermc's benchmark frame (:func:`.workloads.frame`). One
forked worker process lives for the whole run and builds the frame for each
size before it is timed, so what is measured is only the return: from the
parent's request to a usable DataFrame in the parent.

Methods:

- shmalloc, copy=True / copy=False: the worker calls ``copy2shm``, the parent
  ``allocate_from_shm``;
- pickle protocol 5 through a pipe: the worker pickles the frame into the
  stream, the parent unpickles it;
- stdlib ``multiprocessing.shared_memory``, copied out, and SharedArray (if
  importable), zero-copy: the peers by hand of :mod:`.peers`.

Methods run interleaved, repetition by repetition. Freeing the previous
result (garbage collection, shmalloc's background release of consumed
objects) happens between measurements, untimed. ``benchmarks/plot_sizes.py``
runs it and writes the table and the plot; this is not a section of
``python -m shmalloc bench``.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Any

import pandas as pd

import shmalloc
from shmalloc import _releaser

from . import peers, workloads

PICKLE = "pickle protocol 5 through a pipe"


def _serve(conn: Connection) -> None:
    """The worker: build frames on request, return them by the method asked for."""
    frame = None
    senders: dict[str, Callable[[pd.DataFrame], Any]] = {
        "shmalloc": shmalloc.copy2shm,
        "stdlib": peers.send_stdlib,
        "sharedarray": peers.send_shared_array,
    }
    while True:
        command, argument = conn.recv()
        if command == "stop":
            return
        if command == "make":
            frame = workloads.frame(argument)
            conn.send("ready")
        elif frame is None:
            raise RuntimeError(f"asked to send by {argument!r} before any frame was made")
        elif argument == "pickle":
            conn.send_bytes(pickle.dumps(frame, protocol=5))
        else:
            conn.send(senders[argument](frame))


def _via_shmalloc(conn: Connection, copy: bool) -> pd.DataFrame:
    conn.send(("send", "shmalloc"))
    return shmalloc.allocate_from_shm(conn.recv(), copy=copy)


def _via_pickle(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "pickle"))
    return pickle.loads(conn.recv_bytes())


def _via_stdlib(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "stdlib"))
    return peers.receive_stdlib(conn.recv())


def _via_shared_array(conn: Connection) -> pd.DataFrame:
    conn.send(("send", "sharedarray"))
    return peers.receive_shared_array(conn.recv())


def methods() -> dict[str, Callable[[Connection], pd.DataFrame]]:
    """The methods measured, by label."""
    found: dict[str, Callable[[Connection], pd.DataFrame]] = {
        "shmalloc, copy=False": lambda conn: _via_shmalloc(conn, False),
        "shmalloc, copy=True": lambda conn: _via_shmalloc(conn, True),
        PICKLE: _via_pickle,
        "stdlib SharedMemory, copied out": _via_stdlib,
    }
    if peers.SharedArray is not None:
        found["SharedArray, zero-copy"] = _via_shared_array
    return found


def _settle() -> None:
    """Free the previous result before the next measurement starts."""
    gc.collect()
    _releaser.wait_for_releases()  # shmalloc closes large consumed objects on a background thread


def measure(conn: Connection, rows: int, repeat: int) -> dict[str, list[float]]:
    """Seconds of each method for ``rows`` rows, ``repeat`` times, interleaved, from the worker at ``conn``."""
    conn.send(("make", rows))
    conn.recv()
    expected = workloads.frame(rows)
    found = methods()
    for method in found.values():  # warm up, and check that every method returns the frame
        pd.testing.assert_frame_equal(method(conn), expected, check_column_type=False, check_index_type=False)
        _settle()
    del expected
    times: dict[str, list[float]] = {label: [] for label in found}
    for _ in range(repeat):
        for label, method in found.items():
            start = time.perf_counter()
            result = method(conn)
            times[label].append(time.perf_counter() - start)
            del result
            _settle()
    return times


def run(sizes: Iterable[int], repeat: int) -> Iterator[tuple[int, dict[str, list[float]]]]:
    """Measure each size in turn with one worker; yield ``(rows, seconds by method)`` as each is done.

    The worker is stopped, and whatever its peers left in /dev/shm removed, when the
    iteration ends, also early or by an exception.
    """
    resource_tracker.ensure_running()  # the worker's SharedMemory blocks register with the parent's tracker
    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.get_context("fork").Process(target=_serve, args=(child,), daemon=True)
    worker.start()
    child.close()
    try:
        for rows in sizes:
            yield rows, measure(parent, rows, repeat)
    finally:
        try:
            parent.send(("stop", None))
        except OSError:  # the worker is gone
            pass
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()
        parent.close()
        peers.remove_leftovers(os.getpid())
