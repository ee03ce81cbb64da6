"""shmalloc: move numpy arrays and pandas objects between processes through POSIX shared memory.

>>> import numpy as np, shmalloc
>>> handle = shmalloc.copy2shm(np.arange(5))      # in one process
>>> shmalloc.allocate_from_shm(handle)            # in another, once
array([0, 1, 2, 3, 4])
"""
from . import _accessor  # noqa: F401  (imported to register .shm on pandas objects)
from ._api import allocate_from_shm, copy2shm, unlink
from ._handle import ShmObj
from ._shmarray import ShmArray
from .errors import (
    CorruptHandleError,
    FailedItemsWarning,
    ShmError,
    ShmFallbackWarning,
    ShmFileExistsError,
    ShmFileNotFoundError,
    ShmPermissionError,
    WorkerDiedError,
    WorkerError,
)
from .parallel._executor import ProcessPoolExecutor
from .parallel._map import imap, map
from .parallel._options import item_seed
from .parallel._pool import Pool
from .tools._cleanup import gc, held_objects, segments

__version__ = "0.1.0"
__all__ = [
    "copy2shm", "allocate_from_shm", "unlink", "ShmObj",
    "ShmError", "ShmFileNotFoundError", "ShmFileExistsError", "ShmPermissionError", "CorruptHandleError",
    "map", "imap", "Pool", "ProcessPoolExecutor", "item_seed", "WorkerError", "WorkerDiedError", "ShmFallbackWarning",
    "FailedItemsWarning",
    "ShmArray", "segments", "held_objects", "gc",
]
