"""Benchmarks (``python -m shmalloc bench``): shmalloc against its peers, measured in one run.

Each section is a module here with ``run(quick: bool, repeat: int) -> None``
that prints its own table; times are medians, ratios are against peers
measured in the same run.
"""
from __future__ import annotations

import gc
import importlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

SECTIONS = ("core", "pandas", "map", "results", "engines")


def run(sections: Sequence[str] = (), quick: bool = False, repeat: int = 5) -> int:
    """Run the named sections (all by default); return 0."""
    for section in sections or SECTIONS:
        if section not in SECTIONS:
            raise SystemExit(f"unknown benchmark section {section!r}; choose from {', '.join(SECTIONS)}")
        try:
            module = importlib.import_module(f"{__name__}.{section}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{section}":
                raise
            print(f"[{section}: not available]")
            continue
        module.run(quick=quick, repeat=repeat)
        print()
    return 0


def median_time(func: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``func()`` over ``repeat`` runs (``setup()`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Rounds of calls before the timed ones: a Pool's or executor's tasks compute in their warm spares from
#: about the third call on (the first makes the spares, the second grows them to what the tasks use).
WARM_ROUNDS = 3


def interleaved_medians(methods: Mapping[str, Callable[[], object]], repeat: int, warm: int = 0) -> dict[str, float]:
    """Median wall time of each method over ``repeat`` rounds, the methods run in turn in each round
    (so that all see the same machine), with a garbage collection after each run; ``warm`` rounds
    run untimed first."""
    times: dict[str, list[float]] = {label: [] for label in methods}
    for round_number in range(warm + repeat):
        for label, method in methods.items():
            start = time.perf_counter()
            method()
            if round_number >= warm:
                times[label].append(time.perf_counter() - start)
            gc.collect()
    return {label: statistics.median(t) for label, t in times.items()}


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a GitHub-flavoured markdown table (so it can be pasted into the README)."""
    print(f"### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(v) for v in row) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
