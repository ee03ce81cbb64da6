"""Threads of shmalloc's own: waiting until they are really gone before a fork.

Python 3.12+ warns at every fork of a process with more than one OS thread (a
child of a multi-threaded process may deadlock), and it counts the OS threads
(/proc/self/task on Linux), not the Python ones.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable


def wait_until_gone(native_ids: Iterable[int | None], limit: float = 1.0) -> None:
    """Wait (at most ``limit`` seconds in all) until the OS threads ``native_ids`` have exited.

    ``Thread.join`` returns a moment before the OS thread ends.
    """
    if not os.path.exists("/proc/self/task"):
        return
    tasks = [f"/proc/self/task/{native_id}" for native_id in native_ids if native_id is not None]
    deadline = time.monotonic() + limit
    for task in tasks:
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0001)


def native_ids() -> set[int | None]:
    """The OS thread ids of the live Python threads of this process."""
    return {thread.native_id for thread in threading.enumerate()}
