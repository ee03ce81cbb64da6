"""Codec for numpy arrays of fixed-size dtypes: one buffer, rebuilt with shape, dtype and order."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Subclasses that carry no state beyond the array itself; others go through pickle.
_CLASSES: dict[str, type] = {
    "numpy.ndarray": np.ndarray,
    "numpy.recarray": np.recarray,
    "numpy.matrix": np.matrix,
}
_NAMES = {cls: name for name, cls in _CLASSES.items()}


def accepts(obj: Any) -> bool:
    return type(obj) in _NAMES and not obj.dtype.hasobject


def is_fortran(x: np.ndarray) -> bool:
    """Whether ``x`` is laid out column-major (its first axis varies fastest).

    For a contiguous array: whether it is Fortran- and not C-contiguous. For
    any other, whether its strides are closer to Fortran's than to C's, so
    that a contiguous copy in that order keeps the layout.
    """
    if x.ndim < 2:
        return False
    if x.flags.c_contiguous or x.flags.f_contiguous:
        return not x.flags.c_contiguous
    return abs(x.strides[0]) < abs(x.strides[-1])


@functools.lru_cache(maxsize=256)
def _type_name(dtype: np.dtype) -> str:
    return str(dtype)  # numpy builds it in Python code each time: a few µs, on every round trip


def encode(x: np.ndarray, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    fortran = is_fortran(x)
    data = x if type(x) is np.ndarray else x.view(np.ndarray)
    flags = data.flags
    if not (flags.c_contiguous or flags.f_contiguous):
        data = np.asfortranarray(data) if fortran else np.ascontiguousarray(data)
    attributes = {
        "codec": "ndarray",
        "shape": x.shape,
        "dtype": x.dtype,
        "order": "F" if fortran else "C",
        "class": _NAMES[type(x)],
        "buffer": len(buffers),
    }
    buffers.append(data)
    # Cached for numpy's own dtypes only: others that compare equal may print differently (aligned structs).
    return _type_name(x.dtype) if x.dtype.isbuiltin else str(x.dtype), int(x.size), attributes


def decode(attributes: dict[str, Any], buffers: list[np.ndarray]) -> np.ndarray:
    array = buffers[attributes["buffer"]]
    if array.shape != tuple(attributes["shape"]) or array.dtype != attributes["dtype"]:
        raise ValueError("stored array does not match its attributes")
    cls = _CLASSES[attributes["class"]]
    return array if cls is np.ndarray else array.view(cls)
