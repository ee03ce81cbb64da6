"""shmalloc.map: results through shared memory, errors, dead workers, full /dev/shm, no leaks."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shmalloc
import shmalloc.parallel._protocol as protocol_module
from numpy._core.multiarray import get_handler_name

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
ROWS = 20_000  # 260 kB a frame: above the pipe limit


# Module-level functions: spawn and forkserver workers import them by name.


def make_frame(i: int) -> pd.DataFrame:
    """The benchmark's frame (x float64, y bool, z int32), shifted by i."""
    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {"x": rng.random(ROWS) + i, "y": rng.random(ROWS) < 0.5, "z": np.arange(ROWS, dtype=np.int32) * i}
    )


def make_array(i: int) -> np.ndarray:
    return np.arange(50_000, dtype=np.float64).reshape(-1, 10, order="F") * i


def mixed(i: int):
    """Small and large results of many kinds."""
    kinds = [
        lambda: i,
        lambda: None,
        lambda: f"item {i}",
        lambda: list(range(i, i + 20_000)),  # large list of ints: must stay a list
        lambda: (i, np.full(30_000, i), {"frame": make_frame(i)}),
        lambda: np.float32(i),
        lambda: {"small": [i] * 3},
        lambda: np.array([i, i + 1]),
        lambda: pd.Series(np.arange(10_000) * i, name="s"),
        lambda: b"\x00" * 100_000,
    ]
    return kinds[i % len(kinds)]()


def fail_on_three(i: int) -> np.ndarray:
    if i == 3:
        raise ValueError(f"item {i} is bad")
    return np.full(20_000, i)


class UnpicklableError(Exception):
    def __init__(self, a, b):  # pickle calls it with one argument: unpickling fails
        super().__init__(f"{a}-{b}")


def fail_unpicklable(i: int) -> int:
    raise UnpicklableError(i, "x")


def kill_self_on_two(i: int) -> np.ndarray:
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return np.full(20_000, i)


def exit_on_one(i: int) -> int:
    if i == 1:
        os._exit(7)
    return i


def draw(i: int) -> tuple[float, float, int]:
    import random

    return float(np.random.default_rng(shmalloc.item_seed()).random()), float(np.random.random()), random.randrange(10**9)


def pid_of(i: int) -> int:
    return os.getpid()


def _frame_like(i: int) -> pd.DataFrame:
    return make_frame(i)


def _assert_equal(got, want) -> None:
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, np.ndarray):
        assert type(got) is np.ndarray and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert got.flags.f_contiguous == want.flags.f_contiguous
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_equal(g, w)
    elif isinstance(want, dict):
        assert type(got) is dict and got.keys() == want.keys()
        for key in want:
            _assert_equal(got[key], want[key])
    else:
        assert type(got) is type(want) and got == want


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for_workers_to_exit(timeout: float = 10.0) -> None:
    """Workers that delivered everything exit on their own after map returns; they must do so soon."""
    deadline = time.monotonic() + timeout
    while mp.active_children() and time.monotonic() < deadline:  # active_children() also reaps
        time.sleep(0.01)
    assert not mp.active_children()


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", START_METHODS)
def test_frames_and_arrays_every_start_method(method, copy):
    """Frames and arrays come back equal, in input order, from every start method and copy mode."""
    shmalloc.map(abs, [1], start_method=method)  # starts the forkserver or resource tracker, once
    _wait_for_workers_to_exit()
    fds = _open_fds()
    items = list(range(5))
    frames = shmalloc.map(make_frame, items, processes=2, start_method=method, copy=copy)
    arrays = shmalloc.map(make_array, items, processes=2, start_method=method, copy=copy)
    for i in items:
        pd.testing.assert_frame_equal(frames[i], make_frame(i))
        _assert_equal(arrays[i], make_array(i))
        # copy=False: the array owns a private mapping through shmalloc's handler.
        assert (get_handler_name(arrays[i]) == "default_allocator") == copy
        assert arrays[i].flags.owndata and arrays[i].flags.writeable
    del frames, arrays
    _wait_for_workers_to_exit()
    assert _open_fds() <= fds


@pytest.mark.parametrize("copy", [True, False])
def test_mixed_small_and_large_results_keep_their_types(copy):
    """Every kind of result, small or large, comes back as it was returned (a list stays a list)."""
    items = list(range(20))
    got = shmalloc.map(mixed, items, processes=2, chunksize=3, copy=copy)
    for i in items:
        _assert_equal(got[i], mixed(i))


def test_large_results_travel_through_shared_memory(monkeypatch):
    """A large result is shipped as a handle, a small one by value (checked in the worker's code path)."""
    assert protocol_module.ship(np.zeros(10), "/unused").handle is None
    shipped = protocol_module.ship(np.zeros(100_000), shmalloc._names.generate())
    assert shipped.handle is not None and not shipped.fell_back
    _assert_equal(protocol_module.receive(shipped, shipped.handle.name, copy=True), np.zeros(100_000))
    boxed = protocol_module.ship([np.zeros(100_000), 1], shmalloc._names.generate())
    assert boxed.boxed
    _assert_equal(protocol_module.receive(boxed, boxed.handle.name, copy=False), [np.zeros(100_000), 1])


def test_lambdas_and_closures_under_fork():
    """Under fork the function is inherited, not pickled: lambdas and closures work."""
    offset = np.arange(30_000)
    got = shmalloc.map(lambda i: offset + i, range(4), processes=2, start_method="fork")
    for i, a in enumerate(got):
        np.testing.assert_array_equal(a, offset + i)
    # Items are inherited too: unpicklable ones work.
    funcs = [lambda: 1, lambda: 2]
    assert shmalloc.map(lambda f: f(), funcs, start_method="fork") == [1, 2]


@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_lambda_under_spawn_is_a_clear_type_error(method):
    """Without fork a lambda cannot reach the workers: a TypeError says so before any worker starts."""
    with pytest.raises(TypeError, match="picklable"):
        shmalloc.map(lambda i: i, range(3), start_method=method)


@pytest.mark.parametrize("method", START_METHODS)
def test_exception_carries_index_and_worker_traceback(method):
    """func's exception is re-raised in the parent with its type, message, item index and worker traceback."""
    with pytest.raises(ValueError, match="item 3 is bad") as info:
        shmalloc.map(fail_on_three, range(8), processes=2, start_method=method)
    notes = "\n".join(info.value.__notes__)
    assert "item 3" in notes and "fail_on_three" in notes and "Traceback" in notes
    assert info.value.shmalloc_index == 3


def test_exception_that_cannot_be_rebuilt_becomes_worker_error():
    """An exception that does not survive pickling gives WorkerError with its message and traceback."""
    with pytest.raises(shmalloc.WorkerError, match="UnpicklableError: 0-x") as info:
        shmalloc.map(fail_unpicklable, [0], processes=1)
    assert info.value.index == 0 and "fail_unpicklable" in info.value.remote_traceback


@pytest.mark.parametrize("method", START_METHODS)
def test_killed_worker_raises_instead_of_hanging(method):
    """A worker killed by SIGKILL gives WorkerDiedError naming the item, and leaves no segment or worker."""
    fds = _open_fds()
    with pytest.raises(shmalloc.WorkerDiedError, match="item 2 was killed by signal SIGKILL") as info:
        shmalloc.map(kill_self_on_two, range(6), processes=2, start_method=method)
    assert info.value.index == 2 and info.value.exitcode == -signal.SIGKILL
    assert not mp.active_children()
    assert _open_fds() <= fds


def test_os_exit_in_worker_names_the_item():
    """os._exit in func ends the worker: the error names the item and the exit code."""
    with pytest.raises(shmalloc.WorkerDiedError, match="item 1 exited with code 7"):
        shmalloc.map(exit_on_one, range(4), processes=2)


def test_worker_killed_after_writing_its_segment_leaves_nothing(monkeypatch):
    """A worker that dies right after creating its result's segment: the parent unlinks that segment."""
    real = protocol_module.copy2shm

    def copy_then_die(x, name=None, **kwargs):
        real(x, name=name, **kwargs)
        assert os.path.exists("/dev/shm" + name)
        os._exit(1)

    monkeypatch.setattr(protocol_module, "copy2shm", copy_then_die)  # inherited by forked workers
    with pytest.raises(shmalloc.WorkerDiedError):
        shmalloc.map(make_array, range(4), processes=2, start_method="fork")
    # The autouse fixture fails the test if a segment is left.


def test_simulated_enospc_falls_back_to_the_pipe_with_one_warning(monkeypatch):
    """ENOSPC in the worker: results come through the pipe, right, with exactly one warning."""

    def full(x, name=None, **kwargs):
        raise shmalloc.ShmError(errno.ENOSPC, None, name)

    monkeypatch.setattr(protocol_module, "copy2shm", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = shmalloc.map(make_frame, range(4), processes=2, start_method="fork")
    for i in range(4):
        pd.testing.assert_frame_equal(got[i], make_frame(i))
    fallbacks = [w for w in caught if issubclass(w.category, shmalloc.ShmFallbackWarning)]
    assert len(fallbacks) == 1 and "4 of 4" in str(fallbacks[0].message)


_FULL_SHM_SCRIPT = textwrap.dedent(
    """
    import os, warnings
    import numpy as np
    import shmalloc
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        # 3 MB results into an 8 MB /dev/shm, copy=False keeps them mapped: some cannot fit.
        got = shmalloc.map(lambda i: np.full(375_000, i, dtype=np.float64), range(8), processes=2, copy=False)
    assert all(a.shape == (375_000,) and (a == i).all() for i, a in enumerate(got)), "wrong results"
    n = sum(issubclass(w.category, shmalloc.ShmFallbackWarning) for w in caught)
    left = os.listdir("/dev/shm")
    print("warnings", n, "left", left)
    assert n == 1, n
    assert not left, left
    """
)


def test_full_dev_shm_in_a_mount_namespace():
    """With a real 8 MB /dev/shm, results that do not fit come through the pipe; all are right, none left."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    command = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} -c '{_FULL_SHM_SCRIPT}'"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warnings 1 left []" in done.stdout


def test_many_items_and_chunks():
    """Thousands of items with chunks come back complete and in order; no descriptor is left open."""
    fds = _open_fds()
    assert shmalloc.map(abs, range(-1500, 1500), processes=2, chunksize=37) == [abs(i) for i in range(-1500, 1500)]
    got = shmalloc.map(make_array, range(60), processes=2, chunksize=4, copy=False)
    assert [float(a[1, 0]) for a in got] == [float(i) for i in range(60)]
    del got
    _wait_for_workers_to_exit()
    assert _open_fds() <= fds


def test_generators_empty_inputs_and_more_processes_than_items():
    """Any iterable works; an empty one gives []; surplus processes are not started."""
    assert shmalloc.map(abs, (i for i in range(-3, 0))) == [3, 2, 1]
    assert shmalloc.map(abs, []) == []
    assert len(set(shmalloc.map(pid_of, [1], processes=8))) == 1


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"processes": 0}, ValueError),
        ({"processes": 1.5}, ValueError),
        ({"chunksize": 0}, ValueError),
        ({"start_method": "thread"}, ValueError),
        ({"copy": "yes"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    """Bad arguments give clear exceptions before any worker starts."""
    with pytest.raises(error):
        shmalloc.map(abs, [1], **kwargs)
    with pytest.raises(TypeError, match="callable"):
        shmalloc.map(42, [1])


def test_seed_makes_results_independent_of_processes_and_chunks():
    """With a seed, each item's random numbers depend only on the seed and its index."""
    one = shmalloc.map(draw, range(12), processes=1, seed=2024)
    two = shmalloc.map(draw, range(12), processes=2, chunksize=5, seed=2024)
    assert one == two
    assert len({r[0] for r in one}) == 12  # each item has its own stream
    assert shmalloc.map(draw, range(3), seed=7) != one[:3]
    assert shmalloc.item_seed() is None


def test_progress_bar(capsys):
    """progress=True draws a tqdm bar that reaches the total, and changes no result."""
    pytest.importorskip("tqdm")
    assert shmalloc.map(abs, range(-5, 0), progress=True) == [5, 4, 3, 2, 1]
    assert "5/5" in capsys.readouterr().err


_INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import shmalloc

    def slow(i):
        if i >= 2:
            time.sleep(60)
        return np.full(100_000, i)

    print(os.getpid(), flush=True)
    shmalloc.map(slow, range(6), processes=2, chunksize=1)
    """
)


def test_keyboard_interrupt_stops_workers_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the process group) during map: KeyboardInterrupt, workers gone, no segment left."""
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPT_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    pid = int(child.stdout.readline())
    deadline = time.monotonic() + 30
    while len(_children_of(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children_of(pid)
    assert len(workers) == 2
    time.sleep(0.5)  # let items 0 and 1 come back through shared memory
    os.killpg(pid, signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"shmalloc_{pid}_")]


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def unpicklable_result(i: int):
    if i > 1:
        return i
    gen = (x for x in range(3))
    if i == 0:
        return gen  # not measurable: goes the shared memory way, where pickling fails
    holder = np.empty(1, dtype=object)
    holder[0] = gen
    return holder  # measured as small: goes the pipe way, where pickling fails


@pytest.mark.parametrize("kind", [0, 1])
def test_unpicklable_result_is_an_error_naming_the_item(kind):
    """A result that cannot be pickled fails with the item's index, through shared memory or the pipe."""
    with pytest.raises(TypeError, match="generator") as info:
        shmalloc.map(unpicklable_result, [7, 7, kind], processes=1)
    assert info.value.shmalloc_index == 2
