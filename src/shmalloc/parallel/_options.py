"""What a parallel call is asked to do: its arguments checked, functions made portable, and the per-item seeds."""
from __future__ import annotations

import math
import multiprocessing
import pickle
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import cloudpickle
import numpy as np

from .._posix import usable_cpus

#: Results whose data take fewer bytes than this go through the pipe.
PIPE_LIMIT = 64 * 1024


#: How workers start unless told otherwise. Python 3.14 made forkserver Linux's default; shmalloc keeps
#: fork there, as bettermc does: map's workers inherit ``func``, the items and the parent's state
#: without pickling. Elsewhere (macOS, where fork is unsafe) the platform's default.
DEFAULT_START_METHOD = "fork" if sys.platform.startswith("linux") else None


class Portable:
    """A function that travels to workers as plain pickle does (by reference: its module's globals are the
    worker's, shared with the initializer and kept across tasks), or by value with cloudpickle where that
    cannot work (lambdas, closures, functions of an interactive ``__main__`` such as a notebook's);
    calling it calls the function.

    A reference to ``__main__`` resolves in a worker only if the worker's main module defines the name:
    a function defined under ``if __name__ == "__main__":`` is not there when a spawned worker imports the
    script again. Such functions travel both ways, and the worker takes the reference if it can."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    @cached_property
    def pickled(self) -> tuple[bytes | None, bytes | None]:
        """The function pickled once: by reference (or None), and by value where the reference may not
        resolve in a worker (or None); raises what cloudpickle raises."""
        try:
            by_reference = pickle.dumps(self.func)
        except Exception:
            return None, cloudpickle.dumps(self.func)  # a lambda, a closure, a function no module holds
        if b"__main__" not in by_reference:
            return by_reference, None
        main = sys.modules.get("__main__")
        return (by_reference if getattr(main, "__file__", None) else None), cloudpickle.dumps(self.func)

    def __reduce__(self) -> tuple[Any, tuple[bytes | None, bytes | None]]:
        # Unpickled as the function itself: a worker calls it with no wrapper in between.
        return _load_function, self.pickled


#: Functions a worker unpickled, by their pickle: one function by value (a lambda) stays one object
#: across tasks, so that what it keeps in its globals (a cache, a loaded model) lasts. Only small
#: pickles: a large one holds data (a closure's, a joblib batch's arguments), not just code.
_loaded_functions: dict[tuple[bytes | None, bytes | None], Any] = {}
_LOADED_FUNCTIONS = 16
_LOADED_FUNCTION_BYTES = 64 * 1024


def _load_function(by_reference: bytes | None, by_value: bytes | None) -> Any:
    key = (by_reference, by_value)
    func = _loaded_functions.get(key)
    if func is None:
        func = _unpickle_function(by_reference, by_value)
        if len(by_reference or b"") + len(by_value or b"") <= _LOADED_FUNCTION_BYTES:
            if len(_loaded_functions) >= _LOADED_FUNCTIONS:
                del _loaded_functions[next(iter(_loaded_functions))]
            _loaded_functions[key] = func
    return func


def _unpickle_function(by_reference: bytes | None, by_value: bytes | None) -> Any:
    if by_reference is not None:
        try:
            return pickle.loads(by_reference)
        except Exception:
            if by_value is None:
                raise
            # e.g. defined under the main guard: not in the main module a spawned worker imports
    assert by_value is not None, "a function pickled neither way"
    return pickle.loads(by_value)


def portable(func: Callable[..., Any], what: str) -> Portable:
    """``func`` as a :class:`Portable`; TypeError naming ``what`` if it cannot be pickled at all."""
    wrapped = func if isinstance(func, Portable) else Portable(func)
    try:
        _ = wrapped.pickled  # pickled once, here: a failure is the caller's TypeError
    except Exception as exc:
        raise TypeError(f"{what} must be picklable to its workers (with cloudpickle): {exc}") from exc
    return wrapped


@dataclass(frozen=True)
class Options:
    """What every worker of a call needs: the function, the items if inherited, the seed, the pipe limit."""

    func: Callable[[Any], Any]  # a Portable wherever it is pickled to workers
    items: list[Any] | None  # inherited under fork (map only); otherwise each item travels with its task
    seed: np.random.SeedSequence | None
    limit: int


def check_count(label: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be a {'positive' if minimum else 'non-negative'} int, not {value!r}")


#: What a failed item does once its retries are spent: stop the call and raise, or become its result.
ERRORS = ("raise", "return")


def check_failure_policy(errors: Any, retries: Any) -> None:
    """Raise ValueError unless ``errors`` is one of :data:`ERRORS` and ``retries`` a non-negative int."""
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, not {errors!r}")
    check_count("retries", retries, 0)


def check_copy(copy: Any) -> None:
    """Raise TypeError unless ``copy`` is a bool."""
    if not isinstance(copy, bool):
        raise TypeError("copy must be bool")


def resolve_processes(processes: int | None) -> int:
    """How many workers: None is the usable CPUs; a negative count is counted back from them, as in
    joblib (-1: all of them, -2: all but one; at least one); 0 or a non-int is a ValueError."""
    if processes is None:
        return usable_cpus()
    if not isinstance(processes, int) or isinstance(processes, bool) or processes == 0:
        raise ValueError(f"processes must be a positive int, a negative one (-1: every usable CPU) or None, not {processes!r}")
    return processes if processes > 0 else max(1, usable_cpus() + 1 + processes)


def start_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of ``start_method`` (None: the one the program set with
    :func:`multiprocessing.set_start_method`, else :data:`DEFAULT_START_METHOD`), or ValueError."""
    if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {multiprocessing.get_all_start_methods()} or None, not {start_method!r}"
        )
    # A start method the program chose (multiprocessing.set_start_method) goes before shmalloc's default.
    chosen = start_method or multiprocessing.get_start_method(allow_none=True) or DEFAULT_START_METHOD
    return multiprocessing.get_context(chosen)


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
    errors: str = "raise",
    retries: int = 0,
    lazy: bool = False,
) -> tuple[multiprocessing.context.BaseContext, Any, Options]:
    """Check a call's arguments; return its multiprocessing context, its items and the options for its workers.

    ``workers_per_call``: the workers are started for this call, so under
    fork they inherit ``func`` (whatever it is) and the items. ``lazy``: the
    items are read as the call goes (returned as an iterator, never
    inherited).
    """
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    resolve_processes(processes)
    check_failure_policy(errors, retries)
    if chunksize is not None:
        check_count("chunksize", chunksize, 1)
    check_count("pipe_limit", pipe_limit, 0)
    check_copy(copy)
    ctx = start_context(start_method)
    if seed is not None and not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    if lazy:
        items: Any = iter(iterable)  # a TypeError now if it is not iterable
    else:
        items = list(iterable)
    inherit = workers_per_call and ctx.get_start_method() == "fork"
    if not inherit:  # func travels to the workers: by value, checked here
        func = portable(func, "func")
    return ctx, items, Options(func, items if inherit and not lazy else None, seed, pipe_limit)


def pick_chunksize(chunksize: int | None, items: int, processes: int) -> int:
    """``chunksize``, or by default what multiprocessing.Pool.map picks: about four chunks per process."""
    if chunksize is not None:
        return chunksize
    return max(1, math.ceil(items / (4 * processes)))


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


@contextmanager
def seeds_restored() -> Iterator[None]:
    """Restore numpy's and :mod:`random`'s global generators and :func:`item_seed` when the block ends
    (items run serially in this process must not change the state of the item that called them)."""
    global _current_seed
    saved = _current_seed, np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        _current_seed = saved[0]
        np.random.set_state(saved[1])
        random.setstate(saved[2])
