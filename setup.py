import sys
from setuptools import setup

# The native core is POSIX only; on Windows the package installs without it and refuses every call.
setup(cffi_modules=[] if sys.platform == "win32" else ["build_ffi.py:ffibuilder"])
