"""Codecs: how an object becomes (small attributes, list of buffers) and back.

A codec is a module with three functions:

``accepts(obj) -> bool``
    Whether it encodes ``obj``.
``encode(obj, buffers) -> (type, length, attributes)``
    Appends the object's large data to ``buffers`` as C- or Fortran-contiguous
    ndarrays without object fields, and returns the handle's ``type`` and
    ``length`` fields and a small picklable ``attributes`` dict that records
    the indices of its buffers. ``attributes["codec"]`` names the codec.
``decode(attributes, buffers) -> obj``
    Rebuilds the object. ``buffers[i]`` is an ndarray with the dtype, shape
    and order of the i-th buffer appended; with ``copy=False`` it owns a
    private (copy-on-write) mapping, so views of it keep the mapping alive.

Codecs may nest: a container codec calls :func:`encode_into` for its parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import ndarray


@dataclass(frozen=True)
class Encoded:
    """An object taken apart: the handle's fields and the buffers for shared memory."""

    type: str
    length: int
    attributes: dict[str, Any]
    buffers: list[np.ndarray]


def _registry() -> list[ModuleType]:
    # pandas and pickle codecs are imported lazily: importing pandas costs ~0.3 s
    from . import pickled

    codecs: list[ModuleType] = [ndarray]
    try:
        from . import pandas as pandas_codec
    except ImportError:
        pass
    else:
        codecs.append(pandas_codec)
    codecs.append(pickled)  # accepts everything: keep last
    return codecs


_CODECS: list[ModuleType] = []


def _codecs() -> list[ModuleType]:
    if not _CODECS:
        _CODECS.extend(_registry())
    return _CODECS


def encode_into(obj: Any, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    """Encode ``obj`` with the first codec that accepts it, appending to ``buffers``."""
    for codec in _codecs():
        if codec.accepts(obj):
            return codec.encode(obj, buffers)
    raise TypeError(f"shmalloc cannot encode objects of type {type(obj).__name__}")


def encode(obj: Any) -> Encoded:
    """Take ``obj`` apart for shared memory."""
    buffers: list[np.ndarray] = []
    kind, length, attributes = encode_into(obj, buffers)
    return Encoded(kind, length, attributes, buffers)


def decode(attributes: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    """Rebuild an object from its attributes and buffers."""
    name = attributes.get("codec") if isinstance(attributes, dict) else None
    for codec in _codecs():
        if codec.__name__.rsplit(".", 1)[-1] == name:
            return codec.decode(attributes, buffers)
    raise ValueError(f"unknown codec {name!r} in the stored attributes")
