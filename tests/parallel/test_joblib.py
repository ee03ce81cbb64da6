"""joblib's backend "shmalloc": what joblib and scikit-learn users rely on, across real worker processes."""
from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pandas as pd
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed  # noqa: E402

import shmalloc.joblib  # noqa: E402  (registers the backend)

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(autouse=True)
def _stop_kept_workers():
    """The backend keeps its workers (and its executor's threads) between calls: stop them around each test, so that
    no test forks beside another test's threads and later tests see no children."""
    shmalloc.joblib.shutdown()
    yield
    shmalloc.joblib.shutdown()
    assert not multiprocessing.active_children()


def _frame(i: int, rows: int = 20_000) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(rows) * float(i), "y": np.arange(rows) % 2 == 0, "z": np.arange(rows, dtype=np.int32) + i})


def _handler(array: np.ndarray) -> str:
    base = array
    while isinstance(base.base, np.ndarray):
        base = base.base
    from numpy._core.multiarray import get_handler_name

    return get_handler_name(base)


def _kill_self(_: int) -> None:
    os._exit(1)


def _pid(_: int) -> int:
    return os.getpid()


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("copy", [True, False])
def test_parallel_returns_the_frames_a_loop_gives(method, copy):
    """Parallel(...)(delayed(f)(i)) under the backend returns what a loop returns; copy=False arrays are owned by shmalloc's handler."""
    with joblib.parallel_config(backend="shmalloc", n_jobs=2, copy=copy, start_method=method):
        got = Parallel()(delayed(_frame)(i) for i in range(6))
    for i, frame in enumerate(got):
        pd.testing.assert_frame_equal(frame, _frame(i))
    if not copy:
        assert _handler(got[3]["x"].to_numpy()) == "shmalloc"


def test_lambdas_generators_and_auto_batching(monkeypatch):
    """Lambdas travel by value; return_as generator and generator_unordered give every result; many tiny tasks get batched."""
    submitted = []
    submit = shmalloc.joblib.ShmallocBackend.submit
    monkeypatch.setattr(shmalloc.joblib.ShmallocBackend, "submit", lambda self, *a, **k: submitted.append(1) or submit(self, *a, **k))
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        assert list(Parallel(return_as="generator")(delayed(lambda x: x * 2)(i) for i in range(10))) == list(range(0, 20, 2))
        assert sorted(Parallel(return_as="generator_unordered")(delayed(lambda x: -x)(i) for i in range(10))) == list(range(-9, 1))
        submitted.clear()
        assert Parallel(batch_size="auto")(delayed(abs)(-i) for i in range(3000)) == list(range(3000))
    assert len(submitted) < 3000 / 4  # tasks went out in batches


def _sized(i: int, n: int) -> np.ndarray:
    return np.full(n, float(i))


def test_tasks_with_large_results_are_not_batched(monkeypatch):
    """Results of LARGE_RESULT bytes a task make auto batching send one task a batch; smaller ones through shared
    memory are batched; an explicit batch_size holds."""
    monkeypatch.setattr(shmalloc.joblib, "LARGE_RESULT", 1 << 20)
    batches = []
    submit = shmalloc.joblib.ShmallocBackend.submit
    monkeypatch.setattr(shmalloc.joblib.ShmallocBackend, "submit", lambda self, *a, **k: batches.append(1) or submit(self, *a, **k))
    large, medium = (1 << 20) // 8, 20_000  # 1 MB, 160 KB (above the pipe limit) an array
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        got = Parallel(batch_size="auto")(delayed(_sized)(i, large) for i in range(200))
        assert len(batches) == 200
        batches.clear()
        assert Parallel(batch_size="auto")(delayed(_sized)(i, medium) for i in range(300))[-1][0] == 299.0
        assert len(batches) < 300 / 2  # the next call's medium results are batched again
        batches.clear()
        assert Parallel(batch_size=4)(delayed(_sized)(i, large) for i in range(40))[-1][0] == 39.0
        assert len(batches) < 40 / 2  # batched (joblib splits its last batches finer)
    for i, array in enumerate(got):
        np.testing.assert_array_equal(array, np.full(large, float(i)))


def test_n_jobs_minus_one_uses_every_usable_cpu():
    """n_jobs=-1 is every usable CPU, as with loky."""
    cpus = len(os.sched_getaffinity(0))
    assert shmalloc.joblib.ShmallocBackend().effective_n_jobs(-1) == cpus
    with joblib.parallel_config(backend="shmalloc", n_jobs=-1):
        parallel = Parallel(batch_size=1)
        pids = set(parallel(delayed(_pid)(i) for i in range(50)))
    assert parallel.n_jobs == -1 and 1 <= len(pids) <= cpus and os.getpid() not in pids


def test_errors_keep_their_type_and_the_workers_traceback():
    """The first error is re-raised with its type, and a note giving the worker's traceback; the backend then serves the next call."""
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        with pytest.raises(ZeroDivisionError) as info:
            Parallel()(delayed(lambda x: 1 / x)(i) for i in range(-3, 3))
        assert any("worker's traceback" in note for note in info.value.__notes__)
        assert Parallel()(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def test_a_killed_worker_is_reported_not_a_hang_and_the_next_call_works():
    """A worker that dies raises BrokenProcessPool; the next Parallel call gets new workers."""
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        with pytest.raises(BrokenProcessPool):
            Parallel()(delayed(_kill_self)(i) for i in range(4))
        assert Parallel()(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def test_require_sharedmem_runs_in_threads():
    """require="sharedmem" falls back to threads of this process, as joblib's contract says."""
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        pids = Parallel(require="sharedmem")(delayed(lambda _: (os.getpid(), threading.get_ident()))(i) for i in range(4))
    assert {pid for pid, _ in pids} == {os.getpid()}


def test_nested_parallel_calls_run_in_the_workers():
    """A Parallel call inside a task runs there (threads, then sequential), with the right results."""
    with joblib.parallel_config(backend="shmalloc", n_jobs=2):
        got = Parallel()(delayed(lambda i: Parallel(n_jobs=2)(delayed(abs)(-i * j) for j in range(3)))(i) for i in range(3))
    assert got == [[0, 0, 0], [0, 1, 2], [0, 2, 4]]


def test_bad_backend_arguments_are_refused():
    """copy must be a bool and the start method a known one; n_jobs=0 has no meaning."""
    with pytest.raises(TypeError, match="copy must be bool"):
        joblib.parallel_config(backend="shmalloc", copy="no")
    with pytest.raises(ValueError, match="start_method"):
        joblib.parallel_config(backend="shmalloc", start_method="teleport")
    with joblib.parallel_config(backend="shmalloc"), pytest.raises(ValueError, match="n_jobs"):
        Parallel(n_jobs=0)(delayed(abs)(i) for i in range(2))


def test_register_makes_the_backend_available_again():
    """shmalloc.joblib.register() puts the backend back after joblib's registry lost it."""
    from joblib import parallel as joblib_parallel

    saved = joblib_parallel.BACKENDS.pop("shmalloc")
    try:
        with pytest.raises(ValueError, match="Invalid backend"):
            joblib.parallel_config(backend="shmalloc")
        shmalloc.joblib.register()
        with joblib.parallel_config(backend="shmalloc", n_jobs=2):
            assert Parallel()(delayed(abs)(-1) for _ in range(2)) == [1, 1]
    finally:
        joblib_parallel.BACKENDS["shmalloc"] = saved


def test_scikit_learn_model_selection_runs_unchanged_under_the_backend():
    """cross_validate, GridSearchCV and permutation_importance with n_jobs=2 give the sequential results."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.inspection import permutation_importance
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_validate

    assert sklearn.__version__
    X, y = make_classification(n_samples=400, n_features=8, random_state=0)
    model = LogisticRegression(max_iter=500)
    serial_cv = cross_validate(model, X, y, cv=4, n_jobs=1)["test_score"]
    serial_grid = GridSearchCV(model, {"C": [0.1, 1.0, 10.0]}, cv=3, n_jobs=1).fit(X, y)
    fitted = model.fit(X, y)
    serial_importance = permutation_importance(fitted, X, y, n_repeats=3, random_state=0, n_jobs=1).importances_mean
    with joblib.parallel_config(backend="shmalloc", n_jobs=2, copy=False):
        cv = cross_validate(model, X, y, cv=4, n_jobs=2)["test_score"]
        grid = GridSearchCV(model, {"C": [0.1, 1.0, 10.0]}, cv=3, n_jobs=2).fit(X, y)
        importance = permutation_importance(fitted, X, y, n_repeats=3, random_state=0, n_jobs=2).importances_mean
    np.testing.assert_allclose(cv, serial_cv)
    assert grid.best_params_ == serial_grid.best_params_
    np.testing.assert_allclose(grid.cv_results_["mean_test_score"], serial_grid.cv_results_["mean_test_score"])
    np.testing.assert_allclose(importance, serial_importance)
