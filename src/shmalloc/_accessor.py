"""The ``.shm`` accessor on pandas DataFrame, Series and Index (registered when shmalloc is imported).

>>> import pandas as pd, shmalloc
>>> df = pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]})
>>> obj = df.shm.export()                 # in one process
>>> shmalloc.allocate_from_shm(obj).equals(df)   # in another, once
True
"""
from __future__ import annotations

import pandas as pd

from . import _api, _format, codecs
from ._handle import ShmObj


class ShmAccessor:
    """Move this pandas object to another process through POSIX shared memory.

    ``obj.shm.export()`` is :func:`shmalloc.copy2shm` for ``obj``; its
    counterpart is :func:`shmalloc.allocate_from_shm`, called once on the
    handle, usually in another process. The accessor holds no state.
    """

    def __init__(self, obj: pd.DataFrame | pd.Series | pd.Index) -> None:
        if not isinstance(obj, (pd.DataFrame, pd.Series, pd.Index)):
            raise AttributeError(f".shm is available on DataFrame, Series and Index, not on {type(obj).__name__}")
        self._obj = obj

    def export(self, name: str | None = None, overwrite: bool = False, copy: bool = True) -> ShmObj:
        """Copy the object into a new POSIX shared memory object.

        Parameters
        ----------
        name : str, optional
            Name of the shared memory object ("/" followed by 1 to 253
            characters, none of them "/"). By default a fresh name
            ``/shmalloc_<pid>_<random>``.
        overwrite : bool, default False
            Replace an existing object of that name.
        copy : bool, default True
            Default of ``copy`` for :func:`shmalloc.allocate_from_shm`.

        Returns
        -------
        ShmObj
            A small picklable handle; :func:`shmalloc.allocate_from_shm`
            rebuilds an equal object from it, once.

        Raises
        ------
        ShmError
            If the object cannot be created or filled (EEXIST, ENOSPC, ...).

        See Also
        --------
        shmalloc.copy2shm : the same for any object.
        shmalloc.allocate_from_shm : the counterpart.

        Examples
        --------
        >>> import pandas as pd, shmalloc
        >>> obj = pd.Series([1, 2, 3], name="n").shm.export(copy=False)
        >>> obj.type, obj.length
        ('Series', 3)
        >>> shmalloc.allocate_from_shm(obj).tolist()
        [1, 2, 3]
        """
        return _api.copy2shm(self._obj, name=name, overwrite=overwrite, copy=copy)

    @property
    def nbytes(self) -> int:
        """Bytes of data that :meth:`export` would place in shared memory.

        The sum of the object's buffers (numeric data, masks, category
        codes, compactly stored strings, pickled objects), each padded to a
        page. The shared memory object adds one or more pages for its header
        and the rebuilding recipe. Computing it takes the object apart, as
        :meth:`export` would, without creating anything.

        Examples
        --------
        >>> import numpy as np, pandas as pd, shmalloc
        >>> pd.DataFrame({"x": np.zeros(1024)}).shm.nbytes
        8192
        """
        return _format.layout_buffers(codecs.encode(self._obj).buffers)[1]


def _register() -> None:
    # Skip a class that has .shm already: ours after a reload of shmalloc (registering again
    # would make pandas warn), or another package's, which we do not override.
    for cls, register in (
        (pd.DataFrame, pd.api.extensions.register_dataframe_accessor),
        (pd.Series, pd.api.extensions.register_series_accessor),
        (pd.Index, pd.api.extensions.register_index_accessor),
    ):
        if not hasattr(cls, "shm"):
            register("shm")(ShmAccessor)


_register()
