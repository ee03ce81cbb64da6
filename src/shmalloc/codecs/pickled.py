"""Codec for any picklable object: pickle protocol 5, large out-of-band buffers to shared memory.

Objects that pickle would copy into the stream itself (datetime arrays,
pandas objects with datetime or string columns) are handed, wherever they
sit inside the object, to the codec made for them; their buffers then travel
out of band like numpy's own.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Literal

import numpy as np

from . import _registry
from .ndarray import is_fortran

# Buffers smaller than this stay in the pickle stream: a page each would waste more than it saves.
INLINE_LIMIT = 1024
# A stream longer than this (object columns, say) goes to shared memory too, keeping the handle small.
STREAM_LIMIT = 4096


def accepts(obj: Any) -> bool:
    return True


class _Pickler(pickle.Pickler):
    """A pickler that lets the other codecs encode the objects they know, found anywhere inside."""

    def __init__(self, file: io.BytesIO, root: Any, buffer_callback: Any) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._root = root

    def reducer_override(self, obj: Any) -> Any:
        # The root came here because no other codec took it: never hand it back (endless recursion).
        if obj is self._root or not _routed(obj):
            return NotImplemented
        parts: list[np.ndarray] = []
        attributes = _registry.encode_into(obj, parts)[2]
        # Codecs append C- or Fortran-contiguous parts, so each goes out as one flat view, no copy.
        layouts = [(part.dtype, part.shape, _order(part)) for part in parts]
        # numpy's stubs declare the buffer protocol of ndarray from Python 3.12 on only
        raw = [pickle.PickleBuffer(_as_bytes(part)) for part in parts]  # type: ignore[arg-type]
        return _rebuild, (attributes, layouts, *raw)


def _routed(obj: Any) -> bool:
    """Whether ``obj`` is better stored by another codec than by its own reduction."""
    if type(obj) is np.ndarray:
        # numpy hands other arrays out of band itself, but datetimes and strided arrays go in band
        return obj.dtype.kind in "mM" or not (obj.flags.c_contiguous or obj.flags.f_contiguous)
    module = type(obj).__module__
    if not module.startswith("pandas"):
        return False
    return _registry.codec_for(obj).__name__ != __name__  # the pandas codec takes it


def _order(part: np.ndarray) -> Literal["C", "F"]:
    return "F" if is_fortran(part) else "C"


def _as_bytes(part: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous array (datetime arrays do not export the buffer protocol)."""
    return part.ravel(order=_order(part)).view(np.uint8)


def _rebuild(
    attributes: dict[str, Any], layouts: list[tuple[np.dtype, tuple[int, ...], Literal["C", "F"]]], *raw: Any
) -> Any:
    parts = []
    for (dtype, shape, order), data in zip(layouts, raw, strict=True):
        flat = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        if not flat.flags.writeable:  # small buffers come back in band as bytes
            flat = flat.copy()
        parts.append(flat.view(dtype).reshape(shape, order=order))
    return _registry.decode(attributes, parts)


def encode(obj: Any, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    first = len(buffers)

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < INLINE_LIMIT:
            return True  # true: serialise in band
        buffers.append(np.frombuffer(raw, np.uint8))
        return False

    file = io.BytesIO()
    _Pickler(file, obj, out_of_band).dump(obj)
    pickled = file.getvalue()
    out_of_band_buffers = list(range(first, len(buffers)))
    stream: bytes | int = pickled
    if len(pickled) > STREAM_LIMIT:
        buffers.append(np.frombuffer(pickled, np.uint8))
        stream = len(buffers) - 1
    try:
        length = len(obj)
    except Exception:  # no len(): one object
        length = 1
    attributes = {
        "codec": "pickled",
        "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "stream": stream,  # the pickle stream itself, or the index of the buffer holding it
        "buffers": out_of_band_buffers,
    }
    return "object", length, attributes


def decode(attributes: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    stream = attributes["stream"]
    if isinstance(stream, int):
        stream = buffers[stream]
    return pickle.loads(stream, buffers=[buffers[i] for i in attributes["buffers"]])
