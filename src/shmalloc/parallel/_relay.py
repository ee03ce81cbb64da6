"""What an item says besides its result: its warnings and its output, captured in the worker and
replayed in the parent.

In the worker, :func:`capture` runs the item with ``sys.stdout`` and
``sys.stderr`` replaced and every warning recorded (the parent's filters
decide, not the worker's). What it gathered is a tuple of builtins
(:data:`Events`), so that it travels in an answer's header and is replayed
even when the result itself cannot be rebuilt. In the parent,
:func:`replay` writes the item's output whole to ``sys.stdout`` /
``sys.stderr`` (so into a notebook's cell, never interleaved with another
item's) and re-issues each warning with its category, at its place in
``func``'s code and in its module, with the item named at the end of the
message: the parent's filters then act on it as they would in a loop
(``catch_warnings``, ``pytest.warns``, ``simplefilter("error")``, filters
by message, category or module), except that the "default" action shows
a warning once per item rather than once.

Only text written to ``sys.stdout`` / ``sys.stderr`` is captured: bytes
written to their ``buffer``, and output that a C library or a subprocess
writes to the descriptors 1 and 2, go straight through, as without a pool.
What an item has said is sent to the parent early when its code flushes
the stream, so that flushed output survives the worker's death.
"""
from __future__ import annotations

import importlib
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

OUT, ERR, WARNING = "out", "err", "warning"

#: What an item said, in order: ``("out", text)``, ``("err", text)`` and
#: ``("warning", (category's module, its qualname), message, filename, lineno, module name or None)``.
Events = tuple[tuple[Any, ...], ...]


class _Item:
    """What the item running in this process has said so far (None between items), the warnings it issued
    (recorded, ``taken`` of them moved to its events), and how to send it early."""

    def __init__(self) -> None:
        self.events: list[list[Any]] | None = None
        self.records: list[warnings.WarningMessage] = []
        self.taken = 0
        self.on_flush: Callable[[Events], None] | None = None

    def take_warnings(self) -> None:
        """Move the warnings recorded since last time to the events, after the text said before them."""
        if self.events is not None:
            for record in self.records[self.taken :]:
                self.events.append([WARNING, *_describe_warning(record)])
            self.taken = len(self.records)


_item = _Item()
# Threads of func may flush while the item ends: one at a time, and never once its answer is made.
_item_lock = threading.Lock()


class _Stream:
    """This worker's ``sys.stdout`` or ``sys.stderr`` for good: while an item runs, text goes to its events
    (consecutive writes joined); between items, and for anything but text (``buffer``, ``fileno``), to the
    stream it replaced. Code that kept a reference to it (a logging handler made in an item) stays captured."""

    def __init__(self, kind: str, original: Any) -> None:
        self.kind, self.original = kind, original

    def write(self, text: str) -> int:
        events = _item.events
        if events is None:
            return self.original.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            if events and events[-1][0] == self.kind:
                events[-1][1].append(text)  # joined once, when sent: many small writes stay linear
            else:
                events.append([self.kind, [text]])
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Between items: flush the stream below. In an item: send what it said so far to the parent (where
        the worker can), so that it is not lost if the worker dies, as flushed output would not be."""
        with _item_lock:
            if _item.events is None:
                self.original.flush()
                return
            _item.take_warnings()
            if _item.on_flush is not None and _item.events:
                said, _item.events[:] = _said(_item.events), []
                _item.on_flush(said)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _install_streams() -> None:
    if not isinstance(sys.stdout, _Stream):
        sys.stdout = _Stream(OUT, sys.stdout)
    if not isinstance(sys.stderr, _Stream):
        sys.stderr = _Stream(ERR, sys.stderr)


def _said(events: list[list[Any]]) -> Events:
    return tuple((event[0], "".join(event[1])) if event[0] != WARNING else tuple(event) for event in events)


def capture(
    run: Callable[[], _T], on_flush: Callable[[Events], None] | None = None
) -> tuple[Callable[[], _T], Callable[[], Events]]:
    """In a worker: ``run`` wrapped to capture its output and warnings, and a function returning what it
    said (since the last flush).

    ``on_flush``: called with what the item said so far when its code
    flushes ``sys.stdout`` or ``sys.stderr`` (``print(..., flush=True)``,
    a logging handler). The wrapped function raises what ``run`` raises;
    what was said before is kept all the same.
    """
    events: list[list[Any]] = []

    def captured() -> _T:
        _install_streams()
        try:
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")  # the parent's filters decide
                with _item_lock:
                    _item.events, _item.records, _item.taken, _item.on_flush = events, records, 0, on_flush
                return run()
        finally:
            with _item_lock:
                _item.take_warnings()
                _item.events, _item.records, _item.on_flush = None, [], None

    return captured, lambda: _said(events)


def _describe_warning(record: warnings.WarningMessage) -> tuple[tuple[str, str], str, str, int, str | None]:
    category = record.category
    try:
        text = str(record.message)
    except Exception:
        text = f"<{category.__name__} whose str() raised>"
    lineno = record.lineno if isinstance(record.lineno, int) else 0
    filename = str(record.filename)
    return (str(category.__module__), str(category.__qualname__)), text, filename, lineno, _module_named(filename)


_module_names: dict[str, str | None] = {}


def _module_named(filename: str) -> str | None:
    """The name of the module whose file ``filename`` is (what ``warnings.warn`` matches the filters'
    ``module`` against); a spawned worker's ``__mp_main__`` is the parent's ``__main__``."""
    if filename not in _module_names:
        found = None
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) == filename:
                found = "__main__" if name == "__mp_main__" else name
                break
        _module_names[filename] = found
    return _module_names[filename]


def replay(events: Events, subject: str) -> None:
    """In the parent: write the item's output and re-issue its warnings, in order; ``subject``: e.g. "item 3".

    The subject ends the warning's message, so that the filters' message
    patterns (matched at its start) apply as to the original. A warning
    turned into an error by the parent's filters is raised here.
    """
    for event in events:
        kind = event[0]
        if kind == OUT:
            sys.stdout.write(event[1])
        elif kind == ERR:
            sys.stderr.write(event[1])
        elif kind == WARNING:
            (module, qualname), text, filename, lineno, module_name = event[1:]
            category = _category(module, qualname)
            if category is None:  # not known here: keep its name in the message
                category, text = UserWarning, f"{module}.{qualname}: {text}"
            warnings.warn_explicit(f"{text} ({subject})", category, filename, lineno, module=module_name)


def _category(module: str, qualname: str) -> type[Warning] | None:
    """The warning class ``module.qualname``, if it can be found here (importing its module like pickle would)."""
    try:
        found: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        return None
    return found if isinstance(found, type) and issubclass(found, Warning) else None

