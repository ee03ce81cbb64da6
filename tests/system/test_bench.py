"""The benchmarks: one definition of each workload, used by ``python -m shmalloc bench`` and by ``benchmarks/``."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shmalloc.tools import bench
from shmalloc.tools.bench import peers, sizes, workloads

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")


def test_frame_is_the_same_for_the_same_rows():
    """The benchmark frame is x float64, y bool, z int32 (13 bytes a row), and equal for equal sizes."""
    frame = workloads.frame(1000)
    assert list(frame.dtypes.astype(str)) == ["float64", "bool", "int32"]
    assert int(frame.memory_usage(index=False).sum()) == 1000 * workloads.ROW_BYTES
    pd.testing.assert_frame_equal(frame, workloads.frame(1000))


def test_pandas_frames_extend_the_benchmark_frame():
    """The pandas section's frames are the benchmark frame, plus a category column, plus a repeated string column."""
    frames = workloads.pandas_frames(3000)
    assert list(frames) == ["x, y, z", "+ category", "+ str (1e+02 distinct x 30)"]
    base = frames["x, y, z"]
    pd.testing.assert_frame_equal(base, workloads.frame(3000))
    category = frames["+ category"]["c"]
    assert category.dtype == "category" and len(category.cat.categories) == workloads.CATEGORIES
    strings = frames["+ str (1e+02 distinct x 30)"]["s"]
    assert strings.nunique() == 100 and (strings.value_counts() == workloads.STRING_REPEATS).all()
    for frame in frames.values():
        pd.testing.assert_frame_equal(frame[["x", "y", "z"]], base)


def test_quick_sizes_are_smaller():
    """Every benchmark's --quick sizes are at most its full sizes."""
    for name in ("CORE_ARRAY_BYTES", "CORE_ZERO_COPY_BYTES", "PANDAS_ROWS", "MAP_ROWS"):
        choice = getattr(workloads, name)
        assert max(choice.pick(True)) <= max(choice.pick(False)), name


def _assigned_and_called(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    called = {
        n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
    }
    return defined, called


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "src" / "shmalloc" / "tools" / "bench").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))],
    ids=lambda p: p.name,
)
def test_only_workloads_makes_data(path):
    """No benchmark module but workloads.py seeds a generator, or defines a frame builder or a peer of its own."""
    if path.name == "workloads.py":
        return
    defined, called = _assigned_and_called(path)
    assert "default_rng" not in called, f"{path.name} makes its own data: use shmalloc.tools.bench.workloads"
    assert not defined & {"make_frame", "frames", "_peer_name", "_to_stdlib", "_to_shared_array"}, path.name


def test_unknown_section_is_refused():
    """A section name that does not exist stops the run with a message naming the sections."""
    with pytest.raises(SystemExit, match="core, pandas, map"):
        bench.run(["sizes"])


def test_sizes_returns_the_frame_by_every_method_and_leaves_nothing():
    """One forked worker returns the frame by every method (each checked equal), and no peer object stays in /dev/shm."""
    results = dict(sizes.run([2000, 4000], repeat=1))
    assert list(results) == [2000, 4000]
    expected = set(sizes.methods())
    assert {"shmalloc, copy=False", "shmalloc, copy=True", sizes.PICKLE, "stdlib SharedMemory, copied out"} <= expected
    for times in results.values():
        assert set(times) == expected
        assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert not list(SHM.glob(f"{peers.PEER_PREFIX}{os.getpid()}_*"))


def test_stopping_sizes_early_stops_the_worker():
    """Leaving the iteration after the first size stops the worker and removes what its peers left."""
    run = sizes.run([1000, 10**7], repeat=1)
    rows, _ = next(run)
    assert rows == 1000
    leftover = SHM / f"{peers.PEER_PREFIX}{os.getpid()}_{'0' * 12}"
    leftover.write_bytes(b"x")  # as a worker killed mid-send would leave it
    run.close()
    assert not leftover.exists()


def test_peer_names_carry_the_parent_and_are_not_shmallocs():
    """Peer objects carry the benchmark's pid and a prefix of their own, so shmalloc's ls and gc never list them."""
    name = peers.peer_name(os.getpid())
    assert name.startswith(f"{peers.PEER_PREFIX}{os.getpid()}_") and not name.startswith("shmalloc_")


def test_random_bytes_are_uint8_and_reproducible():
    """The core section's array is the same uint8 data for the same size."""
    a, b = workloads.random_bytes(4096), workloads.random_bytes(4096)
    assert a.dtype == np.uint8 and a.size == 4096 and np.array_equal(a, b)


def test_bench_command_prints_the_core_and_pandas_tables(capsys):
    """`shmalloc bench --quick core pandas` prints each section's markdown tables, with the workloads' names and sizes."""
    from shmalloc.tools._cli import main

    assert main(["bench", "--quick", "--repeat", "1", "core", "pandas"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("### ")]
    assert headings == [
        "### Filling and reading one array of 4 MB (median of 1)",
        "### allocate_from_shm(copy=False): time to a usable array",
        "### One small result's round trip in one process: the benchmark frame of 1e+04 rows and its float64 column,"
        " every page of the result read (median of many)",
        "### pandas: 1e+06 rows, seconds (median of 1)",
    ]
    first_cells = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert first_cells == [
        "method", "copy2shm", "raw pwrite", "allocate_from_shm(copy=True)", "mmap + numpy copy",
        "size", "1 MiB", "100 MiB",
        "round trip", "frame: pickle dumps + loads", "frame: shmalloc, copy=False", "frame: shmalloc, copy=True",
        "frame: floor (os calls by hand, DataFrame of the mappings)", "float64 column: pickle dumps + loads",
        "float64 column: shmalloc, copy=False", "float64 column: floor (os calls by hand)",
        "frame", "x, y, z", "+ category", "+ str (3e+04 distinct x 30)",
    ]


def test_results_section_prints_every_method_against_multiprocessing_pool(capsys):
    """`shmalloc bench --quick results` checks every method's frames, then prints one table: each method's
    time over multiprocessing.Pool's (1 for the pool itself), and the pool's milliseconds."""
    from shmalloc.tools._cli import main

    assert main(["bench", "--quick", "--repeat", "1", "results"]) == 0
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    assert list(rows) == [
        "shmalloc.Pool, copy=False",
        "shmalloc.Pool, copy=True",
        "shmalloc.ProcessPoolExecutor, copy=False",
        "shmalloc.map (starts its workers), copy=False",
        "multiprocessing.Pool",
        "multiprocessing.Pool (started per call)",
        "concurrent.futures",
        "floor: the tasks compute, return nothing (multiprocessing.Pool)",
        "multiprocessing.Pool: ms",
    ]
    assert rows["multiprocessing.Pool"] == ["1", "1"]
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells)


def test_engines_section_prints_every_engine_against_joblibs_loky():
    """`shmalloc bench --quick engines` checks every engine's frames, then prints one table with loky's row at 1.

    In a process of its own: the peers (loky, Dask) keep threads of theirs alive after they are shut down."""
    pytest.importorskip("joblib")
    done = subprocess.run(
        [sys.executable, "-m", "shmalloc", "bench", "--quick", "--repeat", "1", "engines"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in done.stdout.splitlines() if line.startswith("| ")}
    assert rows["joblib, loky backend"] == "1"
    engines = ["shmalloc.Pool, copy=False", "joblib, shmalloc backend, copy=False", "multiprocessing.Pool kept open",
               "floor: the tasks compute, return nothing (multiprocessing.Pool kept open)"]
    if importlib.util.find_spec("distributed") is not None:
        engines += ["Dask LocalCluster, client.gather", "shmalloc.dask LocalCluster, client.gather"]
    for engine in engines:
        assert float(rows[engine]) > 0


def test_map_section_prints_both_workloads_by_every_method():
    """`shmalloc bench --quick map` checks every method's frames for both workloads (inherited, computed), then
    prints a table for each with multiprocessing.Pool's row at 1, the goals and the peak memory.

    In a process of its own: Ray, where installed, runs in the benchmark's process."""
    done = subprocess.run(
        [sys.executable, "-m", "shmalloc", "bench", "--quick", "--repeat", "1", "map"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "SIGTERM" not in done.stderr  # Ray's handler does not reach the workers the pools terminate
    headings = [line for line in done.stdout.splitlines() if line.startswith("### ")]
    assert [heading.split(":")[0] for heading in headings] == [
        "### map, inherited", "### map, computed", "### map", "### map"
    ]
    tables = done.stdout.split("### ")[1:3]
    methods = ["floor: the workers compute, return nothing (shmalloc.Pool)",
               "floor: the workers write the result by hand into warm shared memory", "shmalloc.map, copy=False",
               "shmalloc.Pool (persistent, warm), copy=False", "multiprocessing.Pool", "stdlib SharedMemory by hand, copied out"]
    if importlib.util.find_spec("ray") is not None:
        methods.append("Ray object store (warm), zero-copy")
    for table in tables:
        rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines() if line.startswith("| ")}
        assert [cell.strip() for cell in rows["multiprocessing.Pool"][2:]] == ["1", "1"]
        for method in methods:
            assert all(float(cell) > 0 for cell in rows[method]), method


def test_computed_frame_is_new_and_differs_from_its_source():
    """The map section's computed workload returns a new frame (no memory shared with its input), changed in every column."""
    source = workloads.frame(1000)
    computed = workloads.computed_frame(source, 2)
    assert list(computed.dtypes.astype(str)) == ["float64", "bool", "int32"]
    np.testing.assert_array_equal(computed["x"], source["x"] * 3)
    np.testing.assert_array_equal(computed["y"], ~source["y"])
    np.testing.assert_array_equal(computed["z"], source["z"] + 2)
    for column in computed:
        assert not np.shares_memory(computed[column].to_numpy(), source[column].to_numpy())


def test_computed_columns_into_writes_what_computed_frame_returns():
    """The warm floor of the map section does computed_frame's arithmetic into given arrays: the same values."""
    source = workloads.frame(1000)
    for number in (0, 3):
        expected = workloads.computed_frame(source, number)
        out = [np.full(len(source), 7, dtype) for dtype in expected.dtypes]
        workloads.computed_columns_into(source, number, out)
        for column, array in zip(expected.columns, out, strict=True):
            np.testing.assert_array_equal(array, expected[column].to_numpy())
