"""Command line: ``shmalloc`` or ``python -m shmalloc``, with the commands demo, bench, ls and gc."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .. import __version__

if TYPE_CHECKING:
    import pandas as pd

DESCRIPTION = (
    "Move numpy arrays and pandas data frames between processes through POSIX shared memory."
    " Run '%(prog)s COMMAND --help' for a command's options."
)


def module_prog() -> str:
    """How a user runs the command line as a module: ``python -m shmalloc`` (with their interpreter's name)."""
    return f"{os.path.basename(sys.executable) or 'python'} -m shmalloc"


def main(argv: Sequence[str] | None = None, prog: str = "shmalloc") -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    ``prog`` is the command shown in usage and help: ``shmalloc`` for the console
    script, :func:`module_prog` for ``python -m shmalloc``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"shmalloc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="move a data frame between processes and compare with pickling")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--rows", type=_rows, default=None, help="rows of each worker's frame, e.g. 1e6 (default: 5e6)")
    size.add_argument(
        "--large", action="store_true", help="1e7 rows a frame, as in bettermc's benchmark (takes about twice as long)"
    )

    bench = commands.add_parser("bench", help="measure shmalloc against its peers")
    bench.add_argument("sections", nargs="*", help="sections to run (default: all): core, pandas, map, results, engines")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke test)")
    bench.add_argument("--repeat", type=int, default=5, help="repeats per measurement; medians are reported")

    ls = commands.add_parser(
        "ls",
        help="list this user's shmalloc segments in /dev/shm, and objects held open after unlink",
        description="List this user's shmalloc segments in /dev/shm, then the shared memory objects whose name"
        " is gone but that this user's processes hold open (a Pool's spares, objects under copy=False results):"
        " df counts them, ls /dev/shm does not show them.",
    )
    ls.add_argument(
        "--json", action="store_true", help="print a JSON list instead of a table (held objects have \"linked\": false)"
    )

    gc = commands.add_parser(
        "gc",
        help="remove shmalloc segments whose creating process is dead (and at least 10 minutes old)",
        description="Remove this user's shmalloc segments whose creating process is dead and that are at least"
        " 10 minutes old. Younger ones may be handles in flight: a producer may exit before its consumer opens"
        " its result. Never touches other names, other users' segments, or segments whose creator runs.",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="only list what would be removed: name, size, age and creator pid"
    )
    gc.add_argument(
        "--older-than",
        metavar="AGE",
        default=None,
        type=_duration,
        help="only segments at least this old: 90, 90s, 15m, 2h, 1d (default 10m; 0 removes every orphan,"
        " safe only when nothing else uses shmalloc)",
    )

    args = parser.parse_args(argv)
    if args.command == "ls":
        return run_ls(as_json=args.json)
    if args.command == "gc":
        return run_gc(older_than=args.older_than, dry_run=args.dry_run)
    if args.command == "demo":
        from ._demo import DEFAULT_ROWS, LARGE_ROWS, run_demo

        return run_demo(LARGE_ROWS if args.large else args.rows or DEFAULT_ROWS)
    if args.command == "bench":
        from .bench import run

        return run(args.sections, quick=args.quick, repeat=args.repeat)
    parser.error(f"unknown command {args.command}")
    return 2


def _rows(text: str) -> int:
    try:
        rows = float(text)
    except ValueError:
        rows = float("nan")
    if not (1 <= rows <= 1e9) or rows != int(rows):
        raise argparse.ArgumentTypeError(f"not a number of rows from 1 to 1e9: {text!r}")
    return int(rows)


def _duration(text: str) -> float:
    from ._cleanup import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _records(frame: pd.DataFrame) -> Iterator[Any]:
    """The rows of ``frame`` as named tuples (typed Any: their fields are the frame's columns)."""
    return frame.itertuples(index=False)


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0.0):.0f}s"


def run_ls(as_json: bool = False, out: TextIO | None = None) -> int:
    """Print this user's shmalloc segments, then the objects held open after unlink; return 0."""
    from .._display import human_size
    from ._cleanup import held_objects, segments

    out = out or sys.stdout
    frame, held = segments(), held_objects()
    if as_json:
        rows = [
            {
                "name": row.name,
                "pid": int(row.pid),
                "alive": bool(row.alive),
                "size": int(row.size),
                "age": float(row.age),
                "created": row.created.isoformat(),
                "linked": True,
            }
            for row in _records(frame)
        ]
        rows += [
            {
                "name": row.name,
                "pid": int(row.pid),
                "size": int(row.size),
                "command": row.command,
                "fds": int(row.fds),
                "maps": int(row.maps),
                "inode": int(row.inode),
                "linked": False,
            }
            for row in _records(held)
        ]
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    if frame.empty:
        out.write("no shmalloc segments\n")
    else:
        width = max(len("NAME"), *(len(n) for n in frame["name"]))
        out.write(f"{'NAME':<{width}}  {'SIZE':>10}  {'AGE':>7}  {'PID':>7}  ALIVE\n")
        for row in _records(frame):
            alive = "yes" if row.alive else "no"
            out.write(f"{row.name:<{width}}  {human_size(row.size):>10}  {_human_age(row.age):>7}  {row.pid:>7}  {alive}\n")
    if not held.empty:
        total = int(held.drop_duplicates("inode")["size"].sum())
        out.write(
            f"\nheld open after unlink (df counts them, /dev/shm does not list them):"
            f" {held['inode'].nunique()} object(s), {human_size(total)}\n"
        )
        width = max(len("NAME"), *(len(n) for n in held["name"]))
        out.write(f"{'NAME':<{width}}  {'SIZE':>10}  {'PID':>7}  {'FDS':>4}  {'MAPS':>4}  COMMAND\n")
        for row in _records(held):
            command = " ".join(row.command.split())  # a -c script spans lines
            command = command if len(command) <= 60 else command[:57] + "..."
            out.write(f"{row.name:<{width}}  {human_size(row.size):>10}  {row.pid:>7}  {row.fds:>4}  {row.maps:>4}  {command}\n")
    return 0


def run_gc(older_than: float | None = None, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Remove orphaned segments and print a one-line summary; return 0, or 1 if a removal failed.

    ``older_than`` None: the default age (:data:`shmalloc.tools._cleanup.DEFAULT_OLDER_THAN`). With
    ``dry_run`` each segment that would be removed is listed before the summary.
    """
    from .._display import human_size
    from ._cleanup import collect

    out = out or sys.stdout
    result = collect(older_than=older_than, dry_run=dry_run)
    if dry_run and not result.removed.empty:
        width = max(len("NAME"), *(len(n) for n in result.removed["name"]))
        out.write(f"{'NAME':<{width}}  {'SIZE':>10}  {'AGE':>7}  {'CREATOR':>7}\n")
        for row in _records(result.removed):
            out.write(f"{row.name:<{width}}  {human_size(row.size):>10}  {_human_age(row.age):>7}  {row.pid:>7}\n")
    verb = "would remove" if dry_run else "removed"
    alive = int(result.kept["alive"].sum())
    young = len(result.kept) - alive
    line = (
        f"{verb} {len(result.removed)} segment(s), {human_size(int(result.removed['size'].sum()))};"
        f" kept {len(result.kept)} (creator alive: {alive}, too young: {young})"
    )
    if result.failed:
        line += f"; failed {len(result.failed)}: " + ", ".join(f"{n} ({e.strerror})" for n, e in result.failed.items())
    out.write(line + "\n")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
