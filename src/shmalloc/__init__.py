"""shmalloc: move numpy arrays and pandas objects between processes through POSIX shared memory.

>>> import numpy as np, shmalloc
>>> handle = shmalloc.copy2shm(np.arange(5))      # in one process
>>> shmalloc.allocate_from_shm(handle)            # in another, once
array([0, 1, 2, 3, 4])
"""
from ._api import allocate_from_shm, copy2shm, unlink
from . import _accessor  # registers .shm on pandas objects
from .tools._cleanup import gc, held_objects, segments
from .errors import (
    CorruptHandleError,
    ShmError,
    ShmFallbackWarning,
    ShmFileExistsError,
    ShmFileNotFoundError,
    ShmPermissionError,
    WorkerDiedError,
    WorkerError,
)
from .parallel._executor import ProcessPoolExecutor
from ._handle import ShmObj
from .parallel._map import map
from .parallel._options import item_seed
from .parallel._pool import Pool
from ._shmarray import ShmArray

__version__ = "0.1.0"
__all__ = [
    "copy2shm", "allocate_from_shm", "unlink", "ShmObj", "ShmError", "ShmFileNotFoundError", "ShmFileExistsError", "ShmPermissionError",
    "CorruptHandleError",
    "map", "Pool", "ProcessPoolExecutor", "item_seed", "WorkerError", "WorkerDiedError", "ShmFallbackWarning",
    "ShmArray", "segments", "held_objects", "gc",
]
