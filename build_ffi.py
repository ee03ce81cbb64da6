"""cffi build script (out-of-line API mode) for shmalloc's native core.

cffi executes this file on its own, so it must not import the shmalloc package.
"""
import numpy
from cffi import FFI

# setuptools runs this from the project root; relative paths keep the sdist relocatable.
CORE = "src/shmalloc/_core"

ffibuilder = FFI()
with open(f"{CORE}/shmalloc_core.h") as header:
    ffibuilder.cdef(header.read())
ffibuilder.set_source(
    "shmalloc._native",
    '#include "shmalloc_core.h"',
    sources=[f"{CORE}/shmalloc_core.c", f"{CORE}/shmalloc_arena.c"],
    include_dirs=[CORE, numpy.get_include()],
    # numpy's headers need the full C API, which cffi hides unless told not to.
    define_macros=[("_CFFI_NO_LIMITED_API", None)],
    py_limited_api=False,
    libraries=["rt", "pthread"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
