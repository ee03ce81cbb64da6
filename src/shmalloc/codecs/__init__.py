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
The registry (:mod:`._registry`) holds the ordered list and the functions
that use it; every codec may import it, it imports no codec, and this
package fills it. pandas is a hard dependency of shmalloc (importing
shmalloc registers the ``.shm`` accessor, which imports it), so the pandas
codec is imported here like the others.
"""
from __future__ import annotations

from . import ndarray, pandas, pickled
from ._registry import Encoded, decode, encode, encode_into, register

register(ndarray, pandas, pickled)  # pickled accepts everything: keep it last

__all__ = ["Encoded", "decode", "encode", "encode_into"]
