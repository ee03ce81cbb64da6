"""shmalloc.dask: Dask's messages between processes of this host carry large objects through shared memory.

Clusters run in a child process: Dask leaves threads (its event loop, its
offload pool) in the process that starts them, and later tests fork. This
process never imports distributed: that would change how exception classes
pickle (distributed installs tblib's reducers for all of them), which other
tests rely on. The serialization tests, in one process, are in
``dask_serialization.py``, run here by a pytest of their own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("distributed") is None:
    pytest.skip("distributed is not installed", allow_module_level=True)


def _ours() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("shmalloc_")}


def _report(script: str, *args: str, timeout: float = 240) -> dict:
    """Run ``script`` in a child Python; return the JSON it printed last (its exit must be clean)."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_serialization_in_a_process_of_its_own():
    """The serialization family's tests (dask_serialization.py) pass, run by pytest in a process that may import distributed."""
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "dask_serialization.py")],
                          capture_output=True, text=True, timeout=600, cwd=here.parent.parent)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]


# --- a full /dev/shm --------------------------------------------------------------------------------------

_FULL_CHILD = textwrap.dedent(
    """
    import json, os, warnings
    import numpy as np
    from distributed.protocol.serialize import deserialize, serialize
    import shmalloc, shmalloc.dask as shm_dask

    value = np.arange(4 << 20, dtype=np.float64)  # 32 MB, the tmpfs holds 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header, frames = serialize(value, serializers=shm_dask.SERIALIZERS, context={"recipient": {"address": "tcp://127.0.0.1:1"}})
    got = deserialize(header, frames)
    print(json.dumps({
        "serializer": header["serializer"],
        "equal": bool(np.array_equal(got, value)),
        "warnings": [type(w.message).__name__ + ": " + str(w.message) for w in caught],
        "fallbacks": shm_dask.transfers()["fallbacks"],
        "left": os.listdir("/dev/shm"),
    }))
    """
)


def test_a_full_dev_shm_falls_back_to_dasks_own_way_with_a_warning_and_leaves_nothing():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    shell = 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$0" -c "$1"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, sys.executable, _FULL_CHILD], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["serializer"] == "dask" and report["equal"]
    assert report["fallbacks"] == 1 and report["left"] == []
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith("ShmFallbackWarning")
    assert "No space left" in report["warnings"][0] or "ENOSPC" in report["warnings"][0]


# --- clusters, in a child process -------------------------------------------------------------------------

_CLUSTER_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, pandas as pd, dask, distributed
    from numpy._core.multiarray import get_handler_name
    import shmalloc.dask as shm_dask

    how, method = sys.argv[1], sys.argv[2]
    dask.config.set({"distributed.worker.multiprocessing-method": method, "distributed.scheduler.work-stealing": False})
    options = {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0", "silence_logs": 50}


    def frame(i, rows=200_000):
        df = pd.DataFrame({"x": np.arange(rows) * float(i), "y": np.arange(rows) % 2 == 0,
                           "c": pd.Categorical(np.array(["a", "b"])[np.arange(rows) % 2])})
        df.attrs["i"] = i
        return df


    def total(df):
        return float(df["x"].sum())


    def handler(array):
        while isinstance(array.base, np.ndarray):
            array = array.base
        return get_handler_name(array)


    def ours():  # made since this script started: another process's leftovers are not this test's
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith("shmalloc_") and n not in already_there)


    already_there = set(os.listdir("/dev/shm"))
    report = {}
    if how == "dropin":
        cluster = shm_dask.LocalCluster(**options)
        client = shm_dask.Client(cluster)
    elif how == "plain-cluster":  # distributed's own cluster: the client's plugins set its workers up
        cluster = distributed.LocalCluster(**options)
        client = shm_dask.Client(cluster)
    else:  # a client that starts its own cluster
        cluster = None
        client = shm_dask.Client(**options)
    workers = sorted(client.scheduler_info()["workers"])

    got = client.gather(client.map(frame, range(4), pure=False))
    report["frames_equal"] = all(got[i].equals(frame(i)) and got[i].attrs == {"i": i} for i in range(4))
    report["frame_handlers"] = sorted({handler(g["x"].to_numpy()) for g in got})
    array = client.submit(np.arange, 500_000.0).result()
    report["array"] = [handler(array), bool(array.flags.writeable), float(array[-1])]
    report["received_after_gather"] = shm_dask.transfers()["received"]
    report["small"] = client.submit(sum, [1, 2]).result()
    report["received_after_small"] = shm_dask.transfers()["received"]

    # worker to worker
    made = client.submit(frame, 3, workers=[workers[0]], pure=False)
    report["worker_to_worker"] = client.submit(total, made, workers=[workers[1]]).result()

    # client to worker
    data = client.scatter(np.ones(400_000), workers=[workers[0]], direct=True)
    report["scattered_sum"] = client.submit(lambda a: float(a.sum()), data, workers=[workers[0]]).result()
    report["client_sent"] = shm_dask.transfers()["sent"]
    report["worker_counts"] = client.run(shm_dask.transfers)

    # through the scheduler, which keeps or relays: Dask's own way, readable again and again
    big = np.arange(300_000.0)
    client.publish_dataset(big=big)
    report["dataset_twice"] = [float(client.get_dataset("big")[-1]) for _ in range(2)]
    report["run"] = sorted(float(a[-1]) for a in client.run(np.arange, 300_000.0).values())
    report["indirect"] = float(client.gather(client.submit(np.arange, 300_000.0, pure=False), direct=False)[-1])
    report["received_in_the_end"] = shm_dask.transfers()["received"]

    del got, array, made, data
    client.close()
    if cluster is not None:
        cluster.close()
    report["left"] = ours()
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("how,method", [
    ("dropin", "spawn"), ("dropin", "forkserver"), ("dropin", "fork"), ("plain-cluster", "spawn"), ("own-cluster", "spawn"),
])
def test_a_cluster_moves_large_results_through_shared_memory_in_every_direction(how, method):
    """Worker to client, worker to worker and client to worker go through shared memory, results exact and zero-copy; nothing left."""
    before = _ours()
    report = _report(_CLUSTER_CHILD, how, method)
    assert report["frames_equal"]
    assert report["frame_handlers"] == ["shmalloc"]
    assert report["array"] == ["shmalloc", True, 499_999.0]
    assert report["received_after_gather"] == 5  # 4 frames and the array
    assert report["small"] == 3 and report["received_after_small"] == 5
    assert report["worker_to_worker"] == float(np.arange(200_000).sum() * 3.0)
    counts = report["worker_counts"]
    assert sum(c["received"] for c in counts.values()) >= 2  # the frame from its peer, the scattered array
    assert sum(c["sent"] for c in counts.values()) >= 6
    assert report["scattered_sum"] == 400_000.0 and report["client_sent"] == 1
    assert report["dataset_twice"] == [299_999.0, 299_999.0]
    assert report["run"] == [299_999.0, 299_999.0] and report["indirect"] == 299_999.0
    assert report["received_in_the_end"] == 5  # none of those three went through shared memory
    assert report["left"] == []
    assert _ours() == before


_LEFTOVERS_CHILD = textwrap.dedent(
    """
    import json, os, pickle, signal, sys, time
    import numpy as np, dask
    from distributed.protocol.serialize import serialize
    import shmalloc, shmalloc.dask as shm_dask

    case = sys.argv[1]
    settings = {"shmalloc.sweep-interval": 0.2}
    if case == "collected-while-running":
        settings["shmalloc.leftover-age"] = 0
    if case == "lost-message":
        settings["shmalloc.linger"] = 0.5
    dask.config.set(settings)


    def exists(name):
        return os.path.exists("/dev/shm" + name)


    def wait_gone(name, seconds):
        deadline = time.monotonic() + seconds
        while exists(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not exists(name)


    def leave_a_segment():
        # what a worker leaves when it dies after handing an object out in a message never read
        return shmalloc.copy2shm(np.ones(300_000)).name


    def hand_out_for_nobody():
        header, frames = serialize(np.ones(300_000), serializers=["shmalloc"], context={"recipient": {"address": "tcp://127.0.0.1:9"}})
        return pickle.loads(frames[0]).name


    already_there = set(os.listdir("/dev/shm"))  # another process's leftovers are not this test's
    report = {}
    with shm_dask.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=50) as cluster:
        with shm_dask.Client(cluster) as client:
            if case == "lost-message":
                name = client.submit(hand_out_for_nobody, pure=False).result()
                report["gone_while_running"] = wait_gone(name, 20)
            else:
                name = client.submit(leave_a_segment, pure=False).result()
                (pid,) = client.run(os.getpid).values()
                time.sleep(0.3)  # the nanny notes its worker's pid every 50 ms
                os.kill(pid, signal.SIGKILL)  # the worker is a child of its nanny, which runs here
                report["exists_after_kill"] = exists(name)
                if case == "collected-while-running":
                    report["gone_while_running"] = wait_gone(name, 20)
                else:
                    time.sleep(1.0)
                    report["kept_while_running"] = exists(name)
                client.wait_for_workers(1, timeout=60)
                report["restarted"] = client.submit(lambda: 1 + 1).result(timeout=60) == 2
    report["left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith("shmalloc_") and n not in already_there)
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("case", ["collected-while-running", "collected-at-close", "lost-message"])
def test_a_killed_worker_or_a_lost_message_leaves_nothing(case):
    """A killed worker's segments are removed by its nanny (after leftover-age) or when the cluster closes; a lost message's by its sender."""
    before = _ours()
    report = _report(_LEFTOVERS_CHILD, case)
    if case == "lost-message":
        assert report["gone_while_running"]
    else:
        assert report["exists_after_kill"] and report["restarted"]
        assert report.get("gone_while_running", True) and report.get("kept_while_running", True)
    assert report["left"] == []
    assert _ours() == before


_FORK_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from distributed.protocol.serialize import deserialize, serialize
    import shmalloc.dask as shm_dask

    header, frames = serialize(np.arange(300_000.0), serializers=shm_dask.SERIALIZERS, context={"recipient": {"address": "tcp://127.0.0.1:1"}})
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: atexit handlers run in the child
    os.waitpid(pid, 0)
    got = deserialize(header, frames)
    print(json.dumps({"intact": bool(got[-1] == 299_999.0)}))
    """
)


def test_a_forked_child_that_exits_does_not_remove_what_its_parent_handed_out():
    """The sender's at-exit sweep runs in a forked child too: there it must not remove the parent's objects in flight."""
    assert _report(_FORK_CHILD, timeout=120) == {"intact": True}


_ASYNC_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, signal
    import numpy as np
    import shmalloc, shmalloc.dask as shm_dask


    def leave_a_segment():
        return shmalloc.copy2shm(np.ones(300_000)).name


    async def main():
        report = {}
        options = {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0", "silence_logs": 50}
        async with shm_dask.LocalCluster(asynchronous=True, **options) as cluster:
            async with shm_dask.Client(cluster, asynchronous=True) as client:
                await client.set_up_workers()
                got = await client.gather(client.map(np.arange, [300_000.0, 400_000.0], pure=False))
                report["got"] = [float(a[-1]) for a in got]
                report["received"] = shm_dask.transfers()["received"]
                name = await client.submit(leave_a_segment, pure=False)
                (pid,) = (await client.run(os.getpid)).values()
                await asyncio.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.5)
                report["left_while_running"] = os.path.exists("/dev/shm" + name)
        report["left"] = os.path.exists("/dev/shm" + name)
        try:
            shm_dask.Client(asynchronous=True)
        except ValueError as exc:
            report["own_cluster_refused"] = str(exc)
        return report


    print(json.dumps(asyncio.run(main())))
    """
)


def test_asynchronous_cluster_and_client_move_results_and_leave_nothing():
    """async with LocalCluster / Client: results through shared memory; a killed worker's segment removed when the cluster exits."""
    before = _ours()
    report = _report(_ASYNC_CHILD)
    assert report["got"] == [299_999.0, 399_999.0] and report["received"] == 2
    assert report["left_while_running"] and not report["left"]
    assert "needs a cluster or an address" in report["own_cluster_refused"]
    assert _ours() == before


_WORKER_CLASS_CHILD = textwrap.dedent(
    """
    import json, distributed, numpy as np
    import shmalloc.dask as shm_dask

    report = {}
    for label, options in {"worker-class": {"worker_class": distributed.Worker}, "threads": {"processes": False}}.items():
        with shm_dask.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=50, **options) as cluster:
            with shm_dask.Client(cluster) as client:
                report[label] = float(client.submit(np.arange, 300_000.0).result()[-1])
    print(json.dumps(report))
    """
)


def test_clusters_without_nannies_work():
    """worker_class=distributed.Worker and processes=False: no nanny to preload into, results still right."""
    assert _report(_WORKER_CLASS_CHILD) == {"worker-class": 299_999.0, "threads": 299_999.0}


_CONFIGURED_ADDRESS_CHILD = textwrap.dedent(
    """
    import json, dask, distributed
    import shmalloc.dask as shm_dask

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=50) as cluster:
        with dask.config.set({"scheduler-address": cluster.scheduler_address}), shm_dask.Client() as client:
            print(json.dumps({"same": client.scheduler.address == cluster.scheduler_address}))
    """
)


def test_a_client_without_an_address_joins_the_configured_scheduler():
    """Client() with Dask's scheduler-address set connects there, as distributed's does, instead of starting a cluster."""
    assert _report(_CONFIGURED_ADDRESS_CHILD) == {"same": True}


_CLOSE_CHILD = textwrap.dedent(
    """
    import json, os, pickle, dask, distributed, numpy as np
    from distributed.protocol.serialize import serialize
    import shmalloc.dask as shm_dask


    def hand_out_for_nobody():
        header, frames = serialize(np.ones(300_000), serializers=["shmalloc"], context={"recipient": {"address": "tcp://127.0.0.1:9"}})
        return pickle.loads(frames[0]).name


    # forked workers end without atexit, and distributed's own cluster collects nothing when it closes
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=50) as cluster:
        with shm_dask.Client(cluster) as client:
            name = client.submit(hand_out_for_nobody, pure=False).result()
            with shm_dask.Client(cluster):  # registers the plugins again: the worker's objects must stay
                running = os.path.exists("/dev/shm" + name)
    print(json.dumps({"while_running": running, "after_close": os.path.exists("/dev/shm" + name)}))
    """
)


def test_a_worker_that_closes_removes_what_nobody_consumed():
    """A worker's handed-out objects whose messages were lost stay while a second client sets the worker up again, and are removed when it closes, also where no atexit runs."""
    assert _report(_CLOSE_CHILD) == {"while_running": True, "after_close": False}
