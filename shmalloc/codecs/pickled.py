"""Codec for any picklable object: pickle protocol 5, large out-of-band buffers to shared memory."""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np

# Buffers smaller than this stay in the pickle stream: a page each would waste more than it saves.
INLINE_LIMIT = 1024
# A stream longer than this (object columns, say) goes to shared memory too, keeping the handle small.
STREAM_LIMIT = 4096


def accepts(obj: Any) -> bool:
    return True


def encode(obj: Any, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    first = len(buffers)

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < INLINE_LIMIT:
            return True  # true: serialise in band
        buffers.append(np.frombuffer(raw, np.uint8))
        return False

    stream = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    out_of_band_buffers = list(range(first, len(buffers)))
    if len(stream) > STREAM_LIMIT:
        buffers.append(np.frombuffer(stream, np.uint8))
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
