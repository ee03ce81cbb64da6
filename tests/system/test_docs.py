"""The documentation stays true: the notebook and the quick start run, the site builds without warnings,
the README shows what the demo prints."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_notebook_executes(tmp_path):
    """Every cell of docs/notebook.ipynb runs without error in a fresh kernel."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("tqdm")
    notebook = nbformat.read(DOCS / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if one fails
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def _run_python_blocks(page: str, tmp_path) -> subprocess.CompletedProcess:
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    script = tmp_path / page.replace(".md", ".py")
    script.write_text("\n\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_quick_start_code_runs(tmp_path):
    """The python blocks of docs/quickstart.md, joined into one script, run and pass their asserts."""
    assert "ShmObj(name='/shmalloc_" in _run_python_blocks("quickstart.md", tmp_path).stdout


def test_migration_guide_code_runs(tmp_path):
    """The python blocks of docs/migrating.md (mclapply, multiprocessing and mpire users) run and pass their asserts."""
    _run_python_blocks("migrating.md", tmp_path)


def test_docs_build_without_warnings(tmp_path):
    """The Sphinx site, API reference included, builds with warnings as errors."""
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("myst_parser")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "html" / "api.html").read_text()
    documented = (
        "copy2shm", "allocate_from_shm", "unlink", "ShmObj", "ShmArray", "ShmArray.from_array", "ShmError", "CorruptHandleError"
    )
    for name in documented:
        assert f'id="shmalloc.{name}"' in api, f"{name} missing from the API reference"


def test_readme_shows_what_the_demo_prints():
    """The README's sample of the demo's output has the demo's current first lines, table rows and last line."""
    from shmalloc.tools import _demo

    readme = (DOCS.parent / "README.md").read_text()
    sample = re.search(r"it prints:\n\n```text\n(.*?)```", readme, re.S)
    assert sample, "README.md lacks the demo's output after 'it prints:'"
    lines = sample.group(1).splitlines()
    assert "\n".join(lines[:2]) == _demo.intro(_demo.DEFAULT_ROWS)
    labels = [label for label, _ in _demo.METHODS]
    rows = [line for line in lines if line.startswith(tuple(labels))]
    assert [re.split(r"\s{2,}", row)[0] for row in rows] == labels
    assert [line.split(":")[0] for line in lines if line.startswith("Round ")] == [
        f"Round {i}/{_demo.ROUNDS}" for i in range(1, _demo.ROUNDS + 1)
    ]
    assert lines[-1] == "Segments left in /dev/shm by this demo: 0"


def test_integrations_page_code_runs(tmp_path):
    """The python blocks of docs/integrations.md (joblib, scikit-learn, concurrent.futures) run and pass their asserts."""
    pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    _run_python_blocks("integrations.md", tmp_path)
