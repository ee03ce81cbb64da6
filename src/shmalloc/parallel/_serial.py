"""Calls made inside a worker run their items there, one after the other (bettermc's allow.recursive).

A worker is a daemonic process, which multiprocessing forbids to start
children of its own; and every CPU is busy with the outer call already. So
a :func:`shmalloc.map` or :meth:`shmalloc.Pool.map` called from ``func``
runs its items in the calling worker, with the same results, seeds, retries
and ``errors`` policy as the parallel call.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
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
    items: Iterable[Any],
    *,
    seed: np.random.SeedSequence | None,
    errors: str,
    retries: int,
    label: str,
) -> list[Any]:
    """``[func(item) for item in items]`` here, as the parallel call would give it."""
    return list(iterate(func, items, seed=seed, errors=errors, retries=retries, label=label))


def iterate(
    func: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    seed: np.random.SeedSequence | None,
    errors: str,
    retries: int,
    label: str,
) -> Iterator[Any]:
    """Yield ``func(item)`` for each item, here, as the parallel call would."""
    failed = taken = 0
    for index, item in enumerate(items):
        taken += 1
        if seed is None:  # as in a loop: the items draw from the generators in turn
            value, ok = _run_item(func, item, index, seed, retries, label)
        else:
            with seeds_restored():  # each item seeds them: the caller's state is its own again between items
                value, ok = _run_item(func, item, index, seed, retries, label)
        if not ok:
            if errors == "raise":
                raise value
            failed += 1
        yield value
    if failed:
        warnings.warn(f"{failed} of {taken} items failed: their results are their exceptions", FailedItemsWarning, stacklevel=3)


def _run_item(
    func: Callable[[Any], Any], item: Any, index: int, seed: np.random.SeedSequence | None, retries: int, label: str
) -> tuple[Any, bool]:
    """``(func(item), True)``, tried up to ``1 + retries`` times, or ``(the last exception, False)``."""
    for tries_left in range(retries, -1, -1):
        if seed is not None:
            seed_item(seed, index)
        try:
            return func(item), True
        except Exception as exc:
            if tries_left:
                continue
            try:
                exc.add_note(f"{label}: raised by func for item {index}, run serially in this worker")
            except Exception:
                pass  # e.g. a __notes__ that is not a list: the exception as it is
            return exc, False
    raise AssertionError("unreachable: the last try returns")
