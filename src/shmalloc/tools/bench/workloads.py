"""What the benchmarks measure, defined once: the data, its seed, the sizes and the names in the tables.

Every benchmark (``python -m shmalloc bench`` and ``benchmarks/plot_sizes.py``)
builds its data here, so that a figure of one can be compared with a figure
of another.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: One seed for all data: the same size gives the same data in every benchmark and run.
SEED = 0
#: bettermc's benchmark frame, the one most tables measure.
FRAME_COLUMNS = "x float64, y bool, z int32"
#: Bytes a row of that frame holds (8 + 1 + 4).
ROW_BYTES = 13


@dataclass(frozen=True)
class Sizes:
    """The sizes a benchmark measures: the full run's, and the smaller ones of ``--quick`` (a smoke test)."""

    full: tuple[int, ...]
    quick: tuple[int, ...]

    def pick(self, quick: bool) -> tuple[int, ...]:
        """The sizes of a quick run or of a full one."""
        return self.quick if quick else self.full


#: core: bytes of the one array filled into and read from a segment.
CORE_ARRAY_BYTES = Sizes(full=(390_000_000,), quick=(4 << 20,))
#: core: bytes of the arrays that allocate_from_shm(copy=False) maps.
CORE_ZERO_COPY_BYTES = Sizes(full=(1 << 20, 100 << 20, 1 << 30), quick=(1 << 20, 100 << 20))
#: core: rows of the small result whose round trip in one process is timed (130 KB).
SMALL_ROWS = 10**4
#: pandas: rows of the frames pickled and moved through shared memory.
PANDAS_ROWS = Sizes(full=(30_000_000,), quick=(1_000_000,))
#: map: what each worker returns: the frame it inherited as it is (bettermc's benchmark), or a new one
#: computed from it (:func:`computed_frame`).
MAP_WORKLOADS = ("inherited", "computed")
#: map: rows of the frame each of the workers returns.
MAP_ROWS = Sizes(full=(10**7, 3 * 10**7), quick=(10**5, 3 * 10**5))
#: results: rows of each result, and how many tasks return one (fewer for the large ones, to keep the run short).
RESULTS_TASKS_BY_ROWS = {10**2: 200, 10**3: 200, 10**4: 200, 10**5: 200, 10**6: 20, 10**7: 4}
RESULTS_QUICK_TASKS_BY_ROWS = {10**2: 50, 10**4: 50}
# The engines section: 8 tasks each return a new frame of this many rows (1e7: 130 MB).
ENGINES_TASKS = 8
ENGINES_ROWS = Sizes(full=(10**7,), quick=(10**5,))
#: plot_sizes.py: rows of the frame one worker returns, for the time-against-size plot.
PLOT_ROWS = (10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7)
#: pandas: each distinct string of the string column repeats this often.
STRING_REPEATS = 30
#: pandas: categories of the category column.
CATEGORIES = 100


def random_bytes(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` random values (the core benchmark's array)."""
    return np.random.default_rng(SEED).integers(0, 255, nbytes, dtype=np.uint8)


def frame(rows: int, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """bettermc's benchmark frame (x float64, y bool, z int32) of ``rows`` rows.

    ``rng`` None: a generator seeded with :data:`SEED`, so the same ``rows``
    give the same frame.
    """
    rng = np.random.default_rng(SEED) if rng is None else rng
    return pd.DataFrame(
        {"x": rng.random(rows), "y": rng.random(rows) < 0.5, "z": rng.integers(0, 2**31 - 1, rows, dtype=np.int32)}
    )


def task_frame(number: int, rows: int) -> pd.DataFrame:
    """The frame task ``number`` computes and returns in the results benchmark: its own data, ``rows`` rows."""
    return frame(rows, np.random.default_rng([SEED, number]))


def compute_task(task: tuple[int, int]) -> pd.DataFrame:
    """A task ``(number, rows)`` of the results and engines benchmarks: its new frame (:func:`task_frame`)."""
    return task_frame(*task)


def compute_task_only(task: tuple[int, int]) -> None:
    """The floor of the results and engines benchmarks: the task's computation, with nothing returned."""
    task_frame(*task)


def computed_frame(source: pd.DataFrame, number: int) -> pd.DataFrame:
    """The new frame task ``number`` computes from ``source`` (a frame of :func:`frame`): x * (number + 1), not y, z + number."""
    columns = [np.empty_like(source[column].to_numpy()) for column in ("x", "y", "z")]
    computed_columns_into(source, number, columns)
    return pd.DataFrame(dict(zip(("x", "y", "z"), columns, strict=True)))


def computed_columns_into(source: pd.DataFrame, number: int, out: Sequence[np.ndarray]) -> None:
    """:func:`computed_frame`'s columns written into ``out`` (x, y, z arrays of ``source``'s length), with no
    allocation: the arithmetic alone, for floors that decide where results are written."""
    x, y, z = (source[column].to_numpy() for column in ("x", "y", "z"))
    np.multiply(x, number + 1, out=out[0])
    np.invert(y, out=out[1])
    np.add(z, np.int32(number), out=out[2])


def pandas_frames(rows: int) -> dict[str, pd.DataFrame]:
    """The pandas benchmark's frames, by the name its table gives them.

    The benchmark frame; the same with a category column; the same with a
    string column of ``rows / 30`` distinct values, each repeated 30 times.
    """
    rng = np.random.default_rng(SEED)
    base = frame(rows, rng)
    distinct = max(rows // STRING_REPEATS, 1)
    words = pd.Series([f"value-{i:07d}" for i in range(distinct)], dtype="str")
    categories = pd.Categorical.from_codes(rng.integers(0, CATEGORIES, rows), pd.Index([f"c{i}" for i in range(CATEGORIES)]))
    return {
        "x, y, z": base,
        "+ category": base.assign(c=categories),
        f"+ str ({distinct:.0e} distinct x {STRING_REPEATS})": base.assign(s=words.take(np.arange(rows) % distinct).to_numpy()),
    }
