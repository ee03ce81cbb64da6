"""A full /dev/shm: every path gives ShmError ENOSPC (or the map's pipe fallback), never SIGBUS, and leaves nothing.

Each case runs in a child process inside its own mount namespace
(``unshare -m``) with a small tmpfs over /dev/shm: 8 MB, and Docker's
default of 64 MB. The child reports what happened as JSON; a child killed by
a signal (SIGBUS) fails the test. Skipped where mounting is not permitted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SIZES_MB = [8, 64]

# Run inside the namespace. Every attempt must fail with ENOSPC, leave
# /dev/shm empty, and the process must still move small data afterwards.
_CHILD = textwrap.dedent(
    """
    import errno, json, os, sys, warnings
    import numpy as np, pandas as pd, shmalloc

    mb = int(sys.argv[1])
    big = (mb + 2) << 20          # more than the whole tmpfs
    report = {}

    def leftovers():
        return sorted(n for n in os.listdir("/dev/shm"))

    def round_trip_works():
        x = np.arange(1000.0)
        y = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=False)
        return bool(np.array_equal(x, y))

    def attempt(label, make):
        try:
            handle = make()
        except shmalloc.ShmError as exc:
            outcome = {"error": "ShmError", "errno": exc.errno, "oserror": isinstance(exc, OSError)}
        except BaseException as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc)[:300]}
        else:
            outcome = {"error": None}
            try:
                shmalloc.unlink(handle)
            except Exception:
                pass
        outcome["left"] = leftovers()
        outcome["usable"] = round_trip_works()
        report[label] = outcome

    rows = big // 13 + 1
    frame = pd.DataFrame({"x": np.random.default_rng(0).random(rows), "y": np.ones(rows, bool), "z": np.arange(rows, dtype=np.int32)})
    attempt("ndarray", lambda: shmalloc.copy2shm(np.ones(big // 8)))
    attempt("ndarray fortran", lambda: shmalloc.copy2shm(np.asfortranarray(np.ones((1024, big // 8192)))))
    attempt("ndarray copy=False", lambda: shmalloc.copy2shm(np.ones(big // 8), copy=False))
    attempt("explicit name", lambda: shmalloc.copy2shm(np.ones(big // 8), name="/full_shm_test"))
    attempt("explicit name overwrite", lambda: shmalloc.copy2shm(np.ones(big // 8), name="/full_shm_test", overwrite=True))
    attempt("DataFrame", lambda: shmalloc.copy2shm(frame))
    attempt("Series", lambda: shmalloc.copy2shm(pd.Series(np.ones(big // 8))))
    # unique strings: a codec may store repeated ones once
    attempt("string column", lambda: shmalloc.copy2shm(pd.Series([f"{i:031d}" for i in range(big // 32)])))
    attempt("datetime column", lambda: shmalloc.copy2shm(pd.Series(pd.date_range("2000", periods=big // 8, freq="s"))))
    attempt("object: dict of arrays", lambda: shmalloc.copy2shm({"a": np.ones(big // 16), "b": np.ones(big // 16)}))
    attempt("object: bytes", lambda: shmalloc.copy2shm(b"x" * big))
    attempt("object: list of str", lambda: shmalloc.copy2shm(["a%d" % i for i in range(big // 8)]))

    # Half full already: the segment that fits stays intact, the next fails cleanly.
    half = shmalloc.copy2shm(np.full((mb << 20) // 16, 7.0))
    attempt("second segment", lambda: shmalloc.copy2shm(np.ones((mb << 20) // 8 * 3 // 4)))
    report["second segment"]["left"] = [n for n in report["second segment"]["left"] if "/" + n != half.name]
    kept = shmalloc.allocate_from_shm(half, copy=False)
    report["first segment intact"] = bool((kept == 7.0).all()) and kept.size == (mb << 20) // 16
    del kept

    if hasattr(shmalloc, "ShmArray"):
        attempt("ShmArray", lambda: shmalloc.ShmArray.zeros(big // 8))

    if hasattr(shmalloc, "map"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                results = shmalloc.map(np.ones, [big // 8, 1000], processes=2, start_method="fork")
                outcome = {"error": None, "right": [r.size for r in results] == [big // 8, 1000]}
            except shmalloc.ShmError as exc:
                outcome = {"error": "ShmError", "errno": exc.errno}
            except BaseException as exc:
                outcome = {"error": type(exc).__name__, "message": str(exc)[:300]}
        outcome["warnings"] = sorted({type(w.message).__name__ for w in caught})
        outcome["left"] = leftovers()
        outcome["usable"] = round_trip_works()
        report["map"] = outcome

    report["final leftovers"] = leftovers()
    print(json.dumps(report))
    """
)


def run_in_small_shm(mb: int) -> dict:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    shell = f'mount -t tmpfs -o size={mb}m tmpfs /dev/shm && exec "$0" -c "$1" {mb}'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, sys.executable, _CHILD], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and ("mount" in proc.stderr or "unshare" in proc.stderr) and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"the process died (status {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=SIZES_MB, ids=[f"{mb}MB" for mb in SIZES_MB])
def report(request) -> dict:
    return run_in_small_shm(request.param)


PATHS = [
    "ndarray",
    "ndarray fortran",
    "ndarray copy=False",
    "explicit name",
    "explicit name overwrite",
    "DataFrame",
    "Series",
    "string column",
    "datetime column",
    "object: dict of arrays",
    "object: bytes",
    "object: list of str",
    "second segment",
    "ShmArray",
]


@pytest.mark.parametrize("path", PATHS)
def test_enospc_nothing_left_still_usable(report, path):
    """copy2shm of anything too big for /dev/shm raises ShmError ENOSPC (an OSError), leaves nothing, and later calls work."""
    if path not in report:
        pytest.skip(f"{path} is not available in this build")
    outcome = report[path]
    assert outcome["error"] == "ShmError", outcome
    assert outcome["errno"] == 28 and outcome["oserror"], outcome  # 28: ENOSPC
    assert outcome["left"] == [], outcome
    assert outcome["usable"], outcome


def test_segment_that_fit_is_intact(report):
    """A segment written before /dev/shm filled up is still consumed whole."""
    assert report["first segment intact"]


def test_map_falls_back_or_raises_enospc(report):
    """shmalloc.map with a result too big for /dev/shm sends it through the pipe (with a warning) or raises ENOSPC."""
    if "map" not in report:
        pytest.skip("shmalloc.map is not available in this build")
    outcome = report["map"]
    if outcome["error"] is None:
        assert outcome["right"] and "ShmFallbackWarning" in outcome["warnings"], outcome
    else:
        assert outcome["error"] == "ShmError" and outcome["errno"] == 28, outcome
    assert outcome["left"] == [] and outcome["usable"], outcome


def test_nothing_left_at_the_end(report):
    """After all attempts the private /dev/shm is empty."""
    assert report["final leftovers"] == []
