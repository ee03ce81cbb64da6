"""The command line: ``ls`` and ``gc`` next to ``demo`` and ``bench``, in-process and as ``python -m shmalloc``."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shmalloc
from shmalloc import _cleanup
from shmalloc._cli import main

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
    """`gc --dry-run` only reports; `gc` removes the orphan; each prints one summary line and exits 0."""
    assert main(["gc", "--dry-run", "--older-than", "7000d"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and re.match(r"would remove [1-9]\d* segment\(s\), .*; kept \d+", out)
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

    monkeypatch.setattr(_cleanup._segment, "unlink", refuse)
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
    """`python -m shmalloc ls --json` sees the orphan; `gc --older-than` removes it; exit statuses are 0."""
    listing = run_cli("ls", "--json")
    assert listing.returncode == 0, listing.stderr
    assert orphan.name in {row["name"] for row in json.loads(listing.stdout)}
    dry = run_cli("gc", "--dry-run", "--older-than", "7000d")
    assert dry.returncode == 0 and dry.stdout.startswith("would remove")
    assert (SHM / orphan.name[1:]).exists()
    done = run_cli("gc", "--older-than", "7000d")
    assert done.returncode == 0 and done.stdout.startswith("removed")
    assert not (SHM / orphan.name[1:]).exists()


def test_usage_error_as_module():
    """A bad argument exits 2 with a message on stderr, not a traceback."""
    proc = run_cli("gc", "--older-than", "soon")
    assert proc.returncode == 2
    assert "not a duration" in proc.stderr and "Traceback" not in proc.stderr
