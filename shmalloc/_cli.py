"""Command line: ``python -m shmalloc {demo,bench,ls,gc}``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m shmalloc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="move a data frame between processes and compare with pickling")
    demo.add_argument("--rows", type=float, default=1e7, help="rows of the demo frame (default 1e7)")

    bench = commands.add_parser("bench", help="measure shmalloc against its peers")
    bench.add_argument("sections", nargs="*", help="sections to run (default: all): core, pandas, map")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke test)")
    bench.add_argument("--repeat", type=int, default=5, help="repeats per measurement; medians are reported")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(int(args.rows))
    if args.command == "bench":
        from .bench import run

        return run(args.sections, quick=args.quick, repeat=args.repeat)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
