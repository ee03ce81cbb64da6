"""The pandas codec's plain parts: numpy arrays (small ones inline), and anything else pickled."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CorruptHandleError
from . import pickled

# Arrays this small stay in the attributes: a page of shared memory each would waste more than it saves.
INLINE_LIMIT = 64


def enc_numpy(values: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any]:
    if values.dtype.hasobject:  # e.g. the values of a sparse array of objects
        return {"k": "any", "attributes": encode_any(values, buffers)}
    if values.nbytes <= INLINE_LIMIT:
        return {"k": "np", "inline": values.copy()}  # a copy: later changes to x must not alter the handle
    data = values if values.flags.c_contiguous else np.ascontiguousarray(values)
    buffers.append(data)
    return {"k": "np", "buffer": len(buffers) - 1}


def dec_numpy(spec: dict[str, Any], buffers: list[np.ndarray]) -> np.ndarray:
    if spec["k"] == "any":
        return pickled.decode(spec["attributes"], buffers)
    if spec["k"] != "np":
        raise CorruptHandleError(f"expected a numpy array, found {spec['k']!r}")
    return spec["inline"].copy() if "inline" in spec else buffers[spec["buffer"]]


def encode_any(obj: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Pickle ``obj`` (large buffers and a long stream go to shared memory).

    Straight to the pickled codec, which never hands its root back: this codec's
    fallbacks must not come back to it.
    """
    return pickled.encode(obj, buffers)[2]
