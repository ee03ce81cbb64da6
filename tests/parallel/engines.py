"""Thin adapters that run shmalloc.map, shmalloc.Pool and shmalloc.ProcessPoolExecutor through one interface.

The contract suite (test_contract.py) states each behaviour once and runs it against every engine through
:class:`Engine`. Where the engines legitimately differ (the executor names no item and breaks for good when a
worker dies, as concurrent.futures does), the difference is an attribute of the adapter, not a skip.

Only shmalloc's public API is used, so that its internals can move freely. The module is imported by name
(tests/parallel is on sys.path under pytest's default import mode, and a script can put it there), so that
spawn and forkserver workers find the functions below.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import shmalloc

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
KINDS = ["map", "pool", "executor"]
PROCESSES = 2
# Seconds the executor's adapter waits for one result: a hang fails the test instead of blocking the run.
RESULT_TIMEOUT = 120.0


class Engine:
    """One engine with one start method: ``run(func, items, copy=..., pipe_limit=...) -> list`` and what it reports.

    Attributes
    ----------
    kind : str
        "map", "pool" or "executor".
    method : str
        The start method of its workers.
    died : type
        The exception raised when a worker dies while working on an item.
    names_items : bool
        Whether errors name the failing item's index (the executor's tasks have none).
    survives_dead_worker : bool
        Whether the engine serves the next call after a worker died (a broken executor does not).
    keeps_workers : bool
        Whether workers outlive a call (map reaps its workers before it returns).
    """

    kind = ""
    died: type[BaseException] = shmalloc.WorkerDiedError
    names_items = True
    survives_dead_worker = True
    keeps_workers = True

    def __init__(self, method: str) -> None:
        self.method = method

    def run(self, func: Callable[[Any], Any], items: Iterable[Any], *, copy: bool = True, pipe_limit: int | None = None) -> list:
        """``[func(item) for item in items]``, computed by the engine's workers."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop every worker this adapter started (and wait for them)."""

    def index_of(self, index: int) -> int | None:
        """The item index the engine's errors carry for item ``index`` (None where it names no item)."""
        return index if self.names_items else None

    def subject(self, index: int) -> str:
        """How error notes name item ``index``."""
        return f"item {index}" if self.names_items else "the task"

    def __repr__(self) -> str:
        return f"{self.kind}-{self.method}"


class MapEngine(Engine):
    """``shmalloc.map``: fresh workers for every call."""

    kind = "map"
    keeps_workers = False

    def run(self, func, items, *, copy=True, pipe_limit=None):
        limit = {} if pipe_limit is None else {"pipe_limit": pipe_limit}
        return shmalloc.map(func, items, processes=PROCESSES, start_method=self.method, copy=copy, **limit)


class PoolEngine(Engine):
    """``shmalloc.Pool``: one persistent pool per pipe limit, shared by the calls of a test."""

    kind = "pool"

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.pools: dict[int | None, shmalloc.Pool] = {}

    def run(self, func, items, *, copy=True, pipe_limit=None):
        if pipe_limit not in self.pools:
            limit = {} if pipe_limit is None else {"pipe_limit": pipe_limit}
            self.pools[pipe_limit] = shmalloc.Pool(PROCESSES, self.method, **limit)
        return self.pools[pipe_limit].map(func, items, copy=copy)

    def close(self):
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


class ExecutorEngine(Engine):
    """``shmalloc.ProcessPoolExecutor``: one executor, kept while the calls of a test use the same copy and pipe limit.

    Only one lives at a time: forking the workers of a second one beside the threads of the first
    would fork a multi-threaded process.
    """

    kind = "executor"
    died = BrokenProcessPool
    names_items = False
    survives_dead_worker = False

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.executor: shmalloc.ProcessPoolExecutor | None = None
        self.knobs: tuple[bool, int | None] | None = None

    def run(self, func, items, *, copy=True, pipe_limit=None):
        if self.executor is None or self.knobs != (copy, pipe_limit):
            self.close()
            limit = {} if pipe_limit is None else {"pipe_limit": pipe_limit}
            context = mp.get_context(self.method)
            self.executor = shmalloc.ProcessPoolExecutor(PROCESSES, mp_context=context, copy=copy, **limit)
            self.knobs = (copy, pipe_limit)
        # Executor.map submits every item (shmalloc's submit) and yields the results in order.
        return list(self.executor.map(func, items, timeout=RESULT_TIMEOUT))

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.executor = self.knobs = None


def make(kind: str, method: str) -> Engine:
    """The adapter of engine ``kind`` ("map", "pool", "executor") with start method ``method``."""
    return {"map": MapEngine, "pool": PoolEngine, "executor": ExecutorEngine}[kind](method)


def map_on(engine: str, method: str, func: Callable[[Any], Any], items: Iterable[Any], processes: int = 2, **kwargs: Any) -> list:
    """``func`` over ``items`` with ``shmalloc.map`` (``engine`` "map") or on a new ``shmalloc.Pool`` ("pool")."""
    if engine == "map":
        return shmalloc.map(func, items, processes=processes, start_method=method, **kwargs)
    with shmalloc.Pool(processes, start_method=method) as pool:
        return pool.map(func, items, **kwargs)


def wait_until(condition: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` once ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def wait_for_no_workers(timeout: float = 30.0) -> list:
    """Reap finished child processes until none is left or ``timeout`` passes; return those still alive."""
    deadline = time.monotonic() + timeout
    while mp.active_children() and time.monotonic() < deadline:  # active_children() also reaps
        time.sleep(0.01)
    return mp.active_children()
