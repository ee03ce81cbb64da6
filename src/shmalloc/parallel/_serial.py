"""Calls made inside a worker run their items there, one after the other (bettermc's allow.recursive).

A worker is a daemonic process, which multiprocessing forbids to start
children of its own; and every CPU is busy with the outer call already. So
a :func:`shmalloc.map` or :meth:`shmalloc.Pool.map` called from ``func``
runs its items in the calling worker, with the same results, seeds, retries
and ``errors`` policy as the parallel call.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import FailedItemsWarning
from ._options import seed_item, seeds_restored

_in_worker = False


def enter_worker() -> None:
    """In a worker, at its start: calls made from now on run serially."""
    global _in_worker
    _in_worker = True


def in_worker() -> bool:
    """Whether this process is a worker of shmalloc's (or a process forked from one)."""
    return _in_worker


def run(
    func: Callable[[Any], Any],
    items: list[Any],
    *,
    seed: np.random.SeedSequence | None,
    errors: str,
    retries: int,
    label: str,
) -> list[Any]:
    """``[func(item) for item in items]`` here, as the parallel call would give it."""
    values: list[Any] = []
    failed = 0
    with seeds_restored():
        for index, item in enumerate(items):
            for tries_left in range(retries, -1, -1):
                if seed is not None:
                    seed_item(seed, index)
                try:
                    values.append(func(item))
                    break
                except Exception as exc:
                    if tries_left:
                        continue
                    try:
                        exc.add_note(f"{label}: raised by func for item {index}, run serially in this worker")
                    except Exception:
                        pass  # e.g. a __notes__ that is not a list: the exception as it is
                    if errors == "raise":
                        raise
                    values.append(exc)
                    failed += 1
    if failed:
        warnings.warn(
            f"{failed} of {len(items)} items failed: their results are their exceptions", FailedItemsWarning, stacklevel=3
        )
    return values
