"""A joblib parallel backend named "shmalloc": joblib's (and scikit-learn's ``n_jobs``) results come
back through shared memory.

``import shmalloc.joblib`` registers it (:func:`register` does it again,
e.g. after joblib's registry was reset)::

    import joblib, shmalloc.joblib

    with joblib.parallel_config(backend="shmalloc", n_jobs=2, copy=False):
        frames = joblib.Parallel()(joblib.delayed(make_frame)(i) for i in range(8))

joblib's loky backend pickles every result through a pipe; here each batch
of results is one :func:`shmalloc.copy2shm` segment, consumed by this
process (``copy=True``, the default: into regular memory; ``copy=False``:
arrays that own private mappings of it, no copy), and written into the warm
pages of a consumed one where there is one. The workers are those of a
:class:`shmalloc.ProcessPoolExecutor`, kept across ``Parallel`` calls of the
same number of jobs and options, as loky keeps its executor, until
:func:`shutdown` or the end of the process. Functions travel by
reference where a worker can import them, else by value (cloudpickle), as
with loky.

What joblib users rely on works as with loky: automatic batching (except
that once a batch's results took 32 MB a task or more, the call's batches
hold one task each: see :meth:`ShmallocBackend.compute_batch_size`),
``n_jobs=-1``, ``return_as="generator"`` and ``"generator_unordered"``,
errors re-raised with their type (and the worker's traceback in a note),
the call aborted at the first error, a killed worker reported as
:class:`concurrent.futures.process.BrokenProcessPool` (not a hang), nested
``Parallel`` calls (threads in the workers, then sequential), and
``require="sharedmem"`` running in threads as joblib's contract says.
"""
from __future__ import annotations

import atexit
import multiprocessing
import threading
from concurrent.futures import Future
from typing import Any

from joblib import parallel as _joblib_parallel
from joblib._parallel_backends import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend

from .parallel import _serial
from .parallel._executor import ProcessPoolExecutor
from .parallel._options import Portable, check_copy, resolve_processes, start_context

#: The name under which the backend is registered.
NAME = "shmalloc"
#: Once a batch's results take this many bytes of shared memory a task, batches hold one task.
LARGE_RESULT = 32 << 20


class _Executors:
    """The executors kept across Parallel calls, one per (workers, copy, start method); shut down at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, bool, str | None], ProcessPoolExecutor] = {}

    def get(self, workers: int, copy: bool, start_method: str | None) -> ProcessPoolExecutor:
        key = (workers, copy, start_method)
        with self._lock:
            executor = self._by_key.get(key)
            if executor is None or executor.broken:
                if executor is not None:
                    executor.shutdown(wait=False, cancel_futures=True)
                executor = ProcessPoolExecutor(workers, mp_context=start_context(start_method), copy=copy)
                self._by_key[key] = executor
            return executor

    def discard(self, executor: ProcessPoolExecutor) -> None:
        """Shut ``executor`` down without waiting (queued tasks cancelled); a later call gets a new one."""
        with self._lock:
            for key, kept in list(self._by_key.items()):
                if kept is executor:
                    del self._by_key[key]
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown_all(self) -> None:
        with self._lock:
            executors, self._by_key = list(self._by_key.values()), {}
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)


_executors = _Executors()
atexit.register(_executors.shutdown_all)


class ShmallocBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend "shmalloc": workers of a :class:`shmalloc.ProcessPoolExecutor`, results through
    shared memory.

    Parameters
    ----------
    copy : bool, default True
        True: results are copied out of shared memory into regular memory.
        False: their arrays own private (copy-on-write) mappings of it.
    start_method : {"fork", "forkserver", "spawn"}, optional
        How workers start. Default: forkserver where there is one. The kept
        executor runs threads in this process, and a process with threads
        must not fork (Python 3.12 warns); lambdas travel by value anyway.
    nesting_level, inner_max_num_threads
        Set by joblib.
    """

    supports_retrieve_callback = True
    supports_sharedmem = False  # require="sharedmem" makes joblib use threads instead

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        *,
        copy: bool = True,
        start_method: str | None = None,
        **backend_kwargs: Any,
    ) -> None:
        check_copy(copy)
        if start_method is None and "forkserver" in multiprocessing.get_all_start_methods():
            start_method = "forkserver"
        start_context(start_method)  # a ValueError now for an unknown one
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self.copy = copy
        self.start_method = start_method
        self._executor: ProcessPoolExecutor | None = None
        self._large_results = False  # a batch of this call returned LARGE_RESULT bytes a task or more

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many workers: ``n_jobs``, negative counted back from the usable CPUs (-1: all); 1 inside a
        worker of shmalloc's (it runs nested calls serially)."""
        if n_jobs is None or _serial.in_worker():
            return 1
        try:
            return resolve_processes(n_jobs)
        except ValueError:
            raise ValueError(f"n_jobs == {n_jobs!r} in Parallel has no meaning") from None

    def configure(
        self, n_jobs: int | None = 1, parallel: Any = None, prefer: str | None = None, require: str | None = None, **kwargs: Any
    ) -> int:
        """Get the workers for a Parallel call; return their number."""
        workers = self.effective_n_jobs(n_jobs)
        if workers == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._executor = _executors.get(workers, self.copy, self.start_method)
        self.parallel = parallel
        return workers

    def submit(self, func: Any, callback: Any = None) -> Future:
        """Run a batch of calls in a worker; ``callback`` runs when its result is in."""
        assert self._executor is not None, "submit before configure"
        future = self._executor.submit(Portable(func))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future) -> Any:
        """The batch's results (its exception is raised)."""
        results = future.result()
        tasks = len(results) if isinstance(results, list) else 1
        if getattr(future, "shm_bytes", 0) >= LARGE_RESULT * max(tasks, 1):
            self._large_results = True
        return results

    def compute_batch_size(self) -> int:
        """joblib's automatic batch size; 1 once a batch's results took :data:`LARGE_RESULT` bytes a task.

        Batching saves each task's overhead, a fraction of a millisecond,
        which is little beside moving tens of MB. A batch, though, keeps its
        results alive in the worker until its last task ends: the worker holds
        more memory while the next one computes, and the results come later.
        Measured with 2 workers, tasks returning new frames: batching saved 6%
        at 13 MB a result, nothing at 39 MB, and cost 13% at 130 MB.
        """
        if self._large_results:
            return 1
        return int(super().compute_batch_size())

    def terminate(self) -> None:
        """The Parallel call ended: keep the workers for the next one."""
        self._executor = None
        self._large_results = False
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """An error ended the call: kill its workers (their tasks are of no use), and get new ones if asked."""
        if self._executor is not None:
            _executors.discard(self._executor)
            self._executor = None
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


def shutdown() -> None:
    """Stop the workers the backend keeps between Parallel calls (done at exit too); later calls start new ones."""
    _executors.shutdown_all()


def register() -> None:
    """Register the backend with joblib under the name "shmalloc"."""
    _joblib_parallel.register_parallel_backend(NAME, ShmallocBackend)


register()
