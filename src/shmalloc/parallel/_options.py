"""What a parallel call is asked to do: its arguments checked, and the per-item seeds."""
from __future__ import annotations

import math
import multiprocessing
import pickle
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Results whose data take fewer bytes than this go through the pipe.
PIPE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Options:
    """What every worker of a call needs: the function, the items if inherited, the seed, the pipe limit."""

    func: Callable[[Any], Any]
    items: list[Any] | None  # inherited under fork (map only); otherwise each item travels with its task
    seed: np.random.SeedSequence | None
    limit: int


def check_count(label: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be a {'positive' if minimum else 'non-negative'} int, not {value!r}")


def check_copy(copy: Any) -> None:
    """Raise TypeError unless ``copy`` is a bool."""
    if not isinstance(copy, bool):
        raise TypeError("copy must be bool")


def start_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of ``start_method`` (None: the platform's default), or ValueError."""
    if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {multiprocessing.get_all_start_methods()} or None, not {start_method!r}"
        )
    return multiprocessing.get_context(start_method)


def prepare(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    processes: int | None,
    copy: bool,
    start_method: str | None,
    chunksize: int | None,
    seed: int | np.random.SeedSequence | None,
    pipe_limit: int,
    workers_per_call: bool,
) -> tuple[multiprocessing.context.BaseContext, list[Any], Options]:
    """Check a call's arguments; return its multiprocessing context, its items and the options for its workers.

    ``workers_per_call``: the workers are started for this call, so under
    fork they inherit the items (and ``func``, whatever it is).
    """
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    if processes is not None:
        check_count("processes", processes, 1)
    if chunksize is not None:
        check_count("chunksize", chunksize, 1)
    check_count("pipe_limit", pipe_limit, 0)
    check_copy(copy)
    ctx = start_context(start_method)
    if seed is not None and not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    items = list(iterable)
    inherit = workers_per_call and ctx.get_start_method() == "fork"
    return ctx, items, Options(func, items if inherit else None, seed, pipe_limit)


def pick_chunksize(chunksize: int | None, items: int, processes: int) -> int:
    """``chunksize``, or by default what multiprocessing.Pool.map picks: about four chunks per process."""
    if chunksize is not None:
        return chunksize
    return max(1, math.ceil(items / (4 * processes)))


def check_picklable(func: Callable[[Any], Any], why: str) -> None:
    """Raise TypeError, starting with ``why``, if ``func`` cannot be pickled to a worker."""
    try:
        pickle.dumps(func)
    except Exception as exc:
        raise TypeError(f"{why}: {exc}") from exc


_current_seed: np.random.SeedSequence | None = None


def item_seed() -> np.random.SeedSequence | None:
    """The :class:`numpy.random.SeedSequence` of the item being processed, inside :func:`map`.

    With ``map(..., seed=s)``, item ``i`` gets the child ``i`` of
    ``SeedSequence(s)``, whichever worker runs it; outside such a call this
    returns None. Use it as ``np.random.default_rng(shmalloc.item_seed())``.
    """
    return _current_seed


def seed_item(seed: np.random.SeedSequence, index: int) -> None:
    """In a worker: give item ``index`` its own child of ``seed``; also seed the global generators from it."""
    global _current_seed
    child = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, index), pool_size=seed.pool_size)
    _current_seed = child
    state = child.generate_state(4)
    np.random.seed(state)
    random.seed(int.from_bytes(state.tobytes(), "little"))
