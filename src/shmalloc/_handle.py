"""ShmObj: the small, picklable handle to data placed in shared memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._display import html_table, human_size


@dataclass(frozen=True)
class ShmObj:
    """Handle to an object copied into a POSIX shared memory object.

    Returned by :func:`shmalloc.copy2shm`, consumed (once) by
    :func:`shmalloc.allocate_from_shm`, typically in another process. It is
    immutable, and its pickled size does not grow with the data.

    Attributes
    ----------
    name : str
        Name of the shared memory object, e.g. ``'/shmalloc_4711_0123456789ab'``.
    type : str
        What is stored: the dtype of an ndarray (``'float64'``), or the kind
        of object (``'DataFrame'``, ``'Series'``, ``'Index'``,
        ``'Categorical'``, ``'object'``).
    length : int
        Number of elements of an array, ``len(x)`` of other objects.
    size : int
        Size of the shared memory object in bytes (``os.fstat`` agrees).
    attributes : dict
        What is needed to rebuild the object exactly (for arrays: shape,
        dtype, order, class). The segment keeps its own copy, and
        :func:`allocate_from_shm` refuses a handle whose fields differ from it.
    copy : bool
        Default of ``copy`` for :func:`allocate_from_shm`.
    """

    name: str
    type: str
    length: int
    size: int
    attributes: dict[str, Any]
    copy: bool = True
    token: bytes = field(default=b"", repr=False)

    def _summary(self) -> str:
        shape = self.attributes.get("shape") if isinstance(self.attributes, dict) else None
        shape_part = f", shape={shape!r}" if shape is not None else f", length={self.length}"
        return f"name={self.name!r}, type={self.type!r}{shape_part}, size={human_size(self.size)}, copy={self.copy}"

    def __repr__(self) -> str:
        return f"ShmObj({self._summary()})"

    def _repr_html_(self) -> str:
        shape = self.attributes.get("shape") if isinstance(self.attributes, dict) else None
        rows = [
            ("name", self.name),
            ("type", self.type),
            ("shape" if shape is not None else "length", shape if shape is not None else self.length),
            ("size", human_size(self.size)),
            ("copy", self.copy),
        ]
        return html_table("shmalloc.ShmObj", rows)
