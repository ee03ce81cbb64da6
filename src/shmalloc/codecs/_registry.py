"""The codec registry: the ordered list of codecs, and encoding and decoding through it.

Codecs import this module to encode or decode their parts; it imports none of
them. ``shmalloc.codecs`` fills the list, in order, when it is imported (which
Python does before any codec module of the package is loaded).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np


class Encoded(NamedTuple):
    """An object taken apart: the handle's fields and the buffers for shared memory."""

    type: str
    length: int
    attributes: dict[str, Any]
    buffers: list[np.ndarray]


#: The codecs, tried in this order: the first whose ``accepts(obj)`` is true encodes ``obj``.
CODECS: list[ModuleType] = []


def register(*codecs: ModuleType) -> None:
    """Set the codecs, in the order they are tried (the last should accept everything)."""
    CODECS[:] = codecs


def name_of(codec: ModuleType) -> str:
    """The codec's name, as stored in ``attributes["codec"]``: its module's last component."""
    return codec.__name__.rsplit(".", 1)[-1]


def codec_for(obj: Any) -> ModuleType:
    """The first codec that accepts ``obj``."""
    for codec in CODECS:
        if codec.accepts(obj):
            return codec
    raise TypeError(f"shmalloc cannot encode objects of type {type(obj).__name__}")


def encode_into(obj: Any, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    """Encode ``obj`` with the first codec that accepts it, appending to ``buffers``."""
    return codec_for(obj).encode(obj, buffers)


def encode(obj: Any) -> Encoded:
    """Take ``obj`` apart for shared memory."""
    buffers: list[np.ndarray] = []
    kind, length, attributes = encode_into(obj, buffers)
    return Encoded(kind, length, attributes, buffers)


def decode(attributes: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    """Rebuild an object from its attributes and buffers."""
    name = attributes.get("codec") if isinstance(attributes, dict) else None
    for codec in CODECS:
        if name_of(codec) == name:
            return codec.decode(attributes, buffers)
    raise ValueError(f"unknown codec {name!r} in the stored attributes")
