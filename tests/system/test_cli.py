"""The command line: ``ls`` and ``gc`` next to ``demo`` and ``bench``, in-process and as ``python -m shmalloc``."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import shmalloc
from shmalloc.tools import _cleanup
from shmalloc.tools._cli import main

SHM = Path("/dev/shm")
ANCIENT = time.time() - 20 * 365 * 86400


@pytest.fixture
def orphan():
    """A segment of ours whose creator is dead, written twenty years ago."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    name = f"/shmalloc_{child.pid}_{secrets.token_hex(6)}"
    handle = shmalloc.copy2shm(np.arange(3000, dtype=np.int32), name=name)
    os.utime(SHM / name[1:], (ANCIENT, ANCIENT))
    yield handle
    (SHM / name[1:]).unlink(missing_ok=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmalloc", *args], capture_output=True, text=True, timeout=120)


def test_ls_json_in_process(orphan, capsys):
    """`ls --json` prints a JSON list with name, pid, alive, size, age and created of each segment."""
    assert main(["ls", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    row = rows[orphan.name]
    assert row["pid"] == int(orphan.name.split("_")[1]) and row["alive"] is False
    assert row["size"] == orphan.size and row["age"] > 19 * 365 * 86400
    assert int(row["created"][:4]) == time.gmtime(ANCIENT).tm_year


def test_ls_table_in_process(orphan, capsys):
    """`ls` prints a header and one line per segment with its size, age, pid and liveness."""
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "AGE", "PID", "ALIVE"]
    line = next(line for line in lines if line.startswith(orphan.name))
    assert line.split()[-2:] == [orphan.name.split("_")[1], "no"]
    assert "KiB" in line and line.split()[3].endswith("d")


def test_ls_empty(monkeypatch, capsys, tmp_path):
    """With no segments `ls` says so, and `ls --json` prints an empty list."""
    monkeypatch.setattr(_cleanup, "SHM_DIR", tmp_path)
    assert main(["ls"]) == 0
    assert capsys.readouterr().out == "no shmalloc segments\n"
    assert main(["ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_gc_dry_run_then_gc_in_process(orphan, capsys):
    """`gc --dry-run` lists the orphan (name, size, age, creator) and removes nothing; `gc` removes it; both exit 0."""
    assert main(["gc", "--dry-run", "--older-than", "7000d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "AGE", "CREATOR"]
    assert re.match(r"would remove [1-9]\d* segment\(s\), .*; kept \d+", lines[-1])
    row = next(line.split() for line in lines if line.startswith(orphan.name))
    assert row[-1] == orphan.name.split("_")[1] and row[-2].endswith("d") and row[2] == "KiB"
    assert (SHM / orphan.name[1:]).exists()
    assert main(["gc", "--older-than", "7000d"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and re.match(r"removed [1-9]\d* segment\(s\)", out)
    assert not (SHM / orphan.name[1:]).exists()


def test_gc_keeps_young_orphans(orphan, capsys):
    """An orphan younger than --older-than is kept and counted as too young."""
    os.utime(SHM / orphan.name[1:])  # written now
    assert main(["gc", "--older-than", "1d"]) == 0
    assert re.search(r"too young: [1-9]", capsys.readouterr().out)
    assert (SHM / orphan.name[1:]).exists()


def test_gc_failure_exits_1(orphan, monkeypatch, capsys):
    """A removal that fails makes `gc` exit with status 1 and name the segment in its summary."""

    def refuse(name: str) -> None:
        raise shmalloc.ShmError(13, None, name)

    monkeypatch.setattr(_cleanup._posix, "unlink", refuse)
    assert main(["gc", "--older-than", "7000d"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and orphan.name in out and "Permission denied" in out


@pytest.mark.parametrize("bad", ["x", "-5", "1y"])
def test_bad_older_than_is_a_usage_error(bad, capsys):
    """A malformed --older-than is a usage error (exit status 2) that says what is wrong."""
    with pytest.raises(SystemExit) as info:
        main(["gc", "--older-than", bad])
    assert info.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    """Without a subcommand the CLI prints usage and exits 2."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_help_lists_every_command(capsys):
    """demo, bench, ls and gc are all offered, and each has its own help."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "bench", "ls", "gc"):
        assert command in out
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
    assert "--older-than" in capsys.readouterr().out


def test_ls_and_gc_as_module(orphan):
    """`python -m shmalloc ls --json` sees the orphan; `gc --dry-run` lists it; `gc --older-than` removes it;
    exit statuses are 0."""
    listing = run_cli("ls", "--json")
    assert listing.returncode == 0, listing.stderr
    assert orphan.name in {row["name"] for row in json.loads(listing.stdout)}
    dry = run_cli("gc", "--dry-run", "--older-than", "7000d")
    assert dry.returncode == 0 and dry.stdout.splitlines()[-1].startswith("would remove")
    assert any(line.startswith(orphan.name) for line in dry.stdout.splitlines())
    assert (SHM / orphan.name[1:]).exists()
    done = run_cli("gc", "--older-than", "7000d")
    assert done.returncode == 0 and done.stdout.startswith("removed")
    assert not (SHM / orphan.name[1:]).exists()


def test_usage_error_as_module():
    """A bad argument exits 2 with a message on stderr, not a traceback."""
    proc = run_cli("gc", "--older-than", "soon")
    assert proc.returncode == 2
    assert "not a duration" in proc.stderr and "Traceback" not in proc.stderr


# ---- the default of gc, in a private /dev/shm (a forced gc must not touch other programs' segments) ----

_DEFAULT_GC_SCRIPT = textwrap.dedent(
    """
    import io, json, os, subprocess, sys
    from shmalloc.tools._cli import run_gc
    code = "import numpy as np, shmalloc; print(shmalloc.copy2shm(np.arange(1000, dtype=np.int32)).name)"
    names = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
             for _ in range(2)]
    cli = lambda *a: subprocess.run([sys.executable, "-m", "shmalloc", *a], capture_output=True, text=True, timeout=120)
    exists = lambda: [os.path.exists("/dev/shm" + n) for n in names]
    report = {"names": names}
    plain = cli("gc")
    report["plain"] = [plain.returncode, plain.stdout, exists()]
    out = io.StringIO()
    report["plain_in_process"] = [run_gc(out=out), out.getvalue(), exists()]
    dry = cli("gc", "--dry-run", "--older-than", "0")
    report["dry"] = [dry.returncode, dry.stdout, exists()]
    forced = cli("gc", "--older-than", "0")
    report["forced"] = [forced.returncode, forced.stdout, exists()]
    print(json.dumps(report))
    """
)


def test_plain_gc_keeps_young_orphans_and_older_than_0_forces():
    """`gc` keeps young segments of exited creators; `--dry-run` lists each with size, age and creator;
    `--older-than 0` removes them."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev/shm")
    command = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$0" -c "$1"']
    proc = subprocess.run(command + [sys.executable, _DEFAULT_GC_SCRIPT], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    names = report["names"]
    for key in ("plain", "plain_in_process"):
        status, out, exist = report[key]
        assert status == 0 and exist == [True, True], report[key]
        assert out.startswith("removed 0 segment(s)") and "too young: 2" in out, out
    status, out, exist = report["dry"]
    assert status == 0 and exist == [True, True], report["dry"]
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "AGE", "CREATOR"] and lines[-1].startswith("would remove 2 segment(s)")
    for name in names:
        row = next(line.split() for line in lines if line.startswith(name))
        assert row[1:3] == ["8.0", "KiB"] and row[3].endswith("s") and row[4] == name.split("_")[1], row
    status, out, exist = report["forced"]
    assert status == 0 and out.startswith("removed 2 segment(s)") and exist == [False, False], report["forced"]
