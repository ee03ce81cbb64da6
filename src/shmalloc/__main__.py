"""``python -m shmalloc``: the command line (see :mod:`shmalloc.tools._cli`)."""
import sys

from .tools._cli import main, module_prog

if __name__ == "__main__":
    sys.exit(main(prog=module_prog()))
