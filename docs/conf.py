"""Sphinx configuration for shmalloc's documentation (``sphinx-build -W docs docs/_build``)."""
from __future__ import annotations

import re
from pathlib import Path

import shmalloc

HERE = Path(__file__).parent

project = "shmalloc"
author = "shmalloc developers"
copyright = "shmalloc developers"
release = version = shmalloc.__version__

extensions = ["sphinx.ext.autodoc", "numpydoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebook.ipynb"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_typehints = "none"  # numpydoc sections already give the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
html_theme = "alabaster"
html_title = f"shmalloc {release}"

# Pages and API entries written later, by other parts of the project: they
# appear in the navigation and the reference once they exist, and their
# absence is not an error (the build runs with warnings as errors).
OPTIONAL_PAGES = ["pandas", "benchmarks", "design", "threat-model", "sanitizers"]
OPTIONAL_FUNCTIONS = ["map", "segments", "gc"]


def _optional_pages() -> str:
    return "\n".join(page for page in OPTIONAL_PAGES if (HERE / f"{page}.md").exists() or (HERE / f"{page}.rst").exists())


def _optional_functions() -> str:
    blocks = []
    for name in OPTIONAL_FUNCTIONS:
        if callable(getattr(shmalloc, name, None)):
            blocks.append(f"```{{eval-rst}}\n.. autofunction:: shmalloc.{name}\n```\n")
    return "\n".join(blocks) or "*(none in this version)*"


def _page_link(match: "re.Match[str]") -> str:
    page = match.group(1)
    if (HERE / f"{page}.md").exists() or (HERE / f"{page}.rst").exists():
        return f"See also {{doc}}`{page}`."
    return ""


def _fill_placeholders(app, docname: str, source: list[str]) -> None:
    text = source[0].replace("%OPTIONAL_PAGES%", _optional_pages())
    text = text.replace("%OPTIONAL_FUNCTIONS%", _optional_functions())
    source[0] = re.sub(r"%LINK:([\w-]+)%", _page_link, text)


def setup(app) -> None:
    app.connect("source-read", _fill_placeholders)
