"""How shmalloc's objects show themselves to people: byte counts, and the HTML tables of notebooks."""
from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any


def human_size(nbytes: int) -> str:
    """Format a byte count for people: ``'381.5 MiB'``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def html_table(caption: str, rows: Iterable[tuple[str, Any]]) -> str:
    """An HTML table of ``(label, value)`` rows under ``caption`` (labels and values escaped)."""
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table><caption>{caption}</caption>{body}</table>"
