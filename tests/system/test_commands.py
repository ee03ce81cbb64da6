"""The command line's first impression: help, version, prog, and a demo that checks what it prints."""
from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shmalloc
from shmalloc.tools import _demo
from shmalloc.tools._cli import main

SHM = Path("/dev/shm")
MODULE_PROG = f"{os.path.basename(sys.executable)} -m shmalloc"
CONSOLE_SCRIPT = Path(sys.executable).with_name("shmalloc")


def run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, cwd=Path.home())


def test_help_is_plain_text(capsys):
    """`--help` names the console script as prog and shows no reStructuredText markup."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shmalloc [-h] [--version] {demo,bench,ls,gc}")
    assert "``" not in out and "--version" in out
    assert "Run 'shmalloc COMMAND --help'" in " ".join(out.split())


def test_version(capsys):
    """`--version` prints `shmalloc <version>`, the version the installed distribution carries."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"shmalloc {shmalloc.__version__}\n"
    assert importlib.metadata.version("shmalloc") == shmalloc.__version__


def test_module_prog_as_subprocess():
    """`python -m shmalloc` shows itself as `<python> -m shmalloc` in help and usage errors, not as __main__.py."""
    helped = run(sys.executable, "-m", "shmalloc", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {MODULE_PROG} [-h]")
    assert "``" not in helped.stdout and "__main__" not in helped.stdout
    wrong = run(sys.executable, "-m", "shmalloc", "demo", "--rows", "many")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith(f"usage: {MODULE_PROG} demo")
    assert "not a number of rows" in wrong.stderr and "Traceback" not in wrong.stderr
    version = run(sys.executable, "-m", "shmalloc", "--version")
    assert (version.returncode, version.stdout) == (0, f"shmalloc {shmalloc.__version__}\n")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the shmalloc console script is not installed beside python")
def test_console_script_names_itself():
    """The installed `shmalloc` script says `shmalloc` in its usage and prints the version."""
    helped = run(CONSOLE_SCRIPT, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: shmalloc [-h]")
    assert "python -m" not in helped.stdout
    version = run(CONSOLE_SCRIPT, "--version")
    assert (version.returncode, version.stdout) == (0, f"shmalloc {shmalloc.__version__}\n")
    wrong = run(CONSOLE_SCRIPT, "gc", "--older-than", "soon")
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: shmalloc gc")


@pytest.mark.parametrize("args", [["--rows", "0"], ["--rows", "1.5"], ["--rows", "x"], ["--rows", "1e6", "--large"]])
def test_bad_demo_size_is_a_usage_error(args, capsys):
    """A demo size that is not a whole number of rows, or both --rows and --large, exits 2 with a message."""
    with pytest.raises(SystemExit) as info:
        main(["demo", *args])
    assert info.value.code == 2
    assert "error: argument --" in capsys.readouterr().err


def test_demo_as_subprocess():
    """The demo shows progress, a table of three methods against pickling, equal results and 0 leftovers."""
    done = run(sys.executable, "-m", "shmalloc", "demo", "--rows", "2000")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 worker processes each build a data frame of 2,000 rows")
    assert any(re.fullmatch(r"Starting the workers .* done in \d+\.\d s\.", line) for line in lines)
    rounds = [line for line in lines if line.startswith("Round ")]
    assert [r.split(":")[0] for r in rounds] == ["Round 1/3", "Round 2/3", "Round 3/3"]
    assert all(re.search(r"pickled [\d.]+ s +copy=True [\d.]+ s +copy=False [\d.]+ s$", r) for r in rounds)
    header = lines.index(next(line for line in lines if line.startswith("method ")))
    assert lines[header].split() == ["method", "seconds", "vs.", "pickling"]
    table = lines[header + 1 : header + 4]
    assert [re.split(r"\s{2,}", row)[0] for row in table] == [label for label, _ in _demo.METHODS]
    assert table[0].endswith(" 1.0x") and all(re.search(r" \d+\.\d\d +\d+\.\dx$", row) for row in table)
    assert any(line.startswith("All results are equal") for line in lines)
    assert lines[-1] == "Segments left in /dev/shm by this demo: 0"


# Both tests below leave segments whose creators are dead: in the shared /dev/shm, a concurrent test run's
# leak check would take them for its own and remove them. A private /dev/shm keeps them to these tests.
PRIVATE_SHM = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -c "$1"']


def run_in_private_shm(script: str) -> str:
    """Run ``script`` with this Python in a mount namespace of its own, with an empty /dev/shm; return its stdout."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev/shm")
    done = subprocess.run([*PRIVATE_SHM, sys.executable, textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a private /dev/shm: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_demo_counts_what_its_workers_leave():
    """Segments the demo's forked workers leave, named by their own pid or any other, are counted and named."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    out = run_in_private_shm(
        """
        import io, json, os, secrets, subprocess, sys
        import numpy as np, shmalloc
        from shmalloc.tools import _demo

        real_copy2shm = shmalloc.copy2shm
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()

        def leaky_copy2shm(obj, **kwargs):
            # Runs in the workers (inherited through fork): each call leaves two extra segments behind.
            real_copy2shm(np.arange(3))
            real_copy2shm(np.arange(3), name=f"/shmalloc_{dead.pid}_{secrets.token_hex(6)}")
            return real_copy2shm(obj, **kwargs)

        shmalloc.copy2shm = leaky_copy2shm
        out = io.StringIO()
        status = _demo.run_demo(rows=100, rounds=1, out=out)
        left = sorted("/" + name for name in os.listdir("/dev/shm"))
        print(json.dumps({"status": status, "text": out.getvalue(), "left": left, "me": os.getpid(), "dead": dead.pid}))
        """
    )
    result = json.loads(out.splitlines()[-1])
    left, text = result["left"], result["text"]
    # Two workers, two shared memory rounds (copy=True, copy=False), two leaks a call.
    assert len(left) == 8 and sum(name.startswith(f"/shmalloc_{result['dead']}_") for name in left) == 4
    assert result["me"] not in {int(name.split("_")[1]) for name in left}
    assert result["status"] == 1, text
    assert "Segments left in /dev/shm by this demo: 8\n" in text
    assert re.findall(r"^  (/shmalloc_\S+)$", text, re.M) == left


def test_leftovers_spare_other_live_programs():
    """A new segment of another live process is not the demo's; once that process is dead, it is."""
    out = run_in_private_shm(
        """
        import json, os, subprocess, sys, time
        import shmalloc
        from shmalloc.tools._demo import leftover_segments

        since = time.time() - 1.0
        before = set(shmalloc.segments()["name"])
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import numpy, shmalloc, sys; print(shmalloc.copy2shm(numpy.arange(3)).name, flush=True); sys.stdin.read()",
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        name = child.stdout.readline().strip()
        me = {os.getpid()}
        seen = {
            "alive, not ours": name in leftover_segments(before, me, since),
            "alive, its pid ours": name in leftover_segments(before, me | {child.pid}, since),
        }
        child.stdin.close()
        child.wait()
        seen["dead"] = name in leftover_segments(before, me, since)
        seen["dead, listed before"] = name in leftover_segments(before | {name}, me, since)
        seen["dead, written before since"] = name in leftover_segments(before, me, time.time() + 60)
        print(json.dumps({"name": name, "pid": child.pid, "seen": seen}))
        """
    )
    result = json.loads(out.splitlines()[-1])
    assert result["name"].startswith(f"/shmalloc_{result['pid']}_")
    assert result["seen"] == {
        "alive, not ours": False,
        "alive, its pid ours": True,
        "dead": True,
        "dead, listed before": False,
        "dead, written before since": False,
    }
