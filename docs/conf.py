"""Sphinx configuration for shmalloc's documentation (``sphinx-build -W docs docs/_build``)."""
from __future__ import annotations

import shmalloc

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

