"""``python -m shmalloc``: the command line (see :mod:`shmalloc._cli`)."""
import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
