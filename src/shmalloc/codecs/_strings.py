"""The pandas codec's strings: unique values plus the smallest integer codes, or UTF-8 bytes plus offsets,
whichever is smaller; missing values kept as they were (None, NaN, pd.NA)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pandas.arrays import ArrowStringArray, StringArray

from ..errors import CorruptHandleError
from . import pickled
from ._parts import dec_numpy, enc_numpy, encode_any

try:
    import pyarrow as pa
except ImportError:  # strings are then factorised only, Arrow columns cannot occur
    pa = None


def _code_dtype(count: int) -> np.dtype:
    """The smallest unsigned integer type that holds codes 0 .. count - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if count <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


# Factorising costs a hash table lookup per value, and once the table outgrows the caches that
# is slower than copying the strings (3e7 values of 1e6 distinct: 6.6 s, against 1.9 s to pickle
# and unpickle them). So long arrays are factorised only if a random sample of them repeats
# values often enough that the table stays small; otherwise they are stored as UTF-8 and offsets.
SAMPLE = 1 << 16
# So few and so short strings (column labels, mostly) stay in the spec as they are: taking them apart
# costs more. Longer text goes to buffers, so that the handle stays small.
FEW = 64
FEW_CHARACTERS = 4096
_SAMPLE_DISTINCT = 0.7  # a sample this distinct means some 1e5 distinct values or more


def _worth_factorising(n: int, distinct_in_sample: Any) -> bool:
    if n <= 4 * SAMPLE:
        return True
    return distinct_in_sample() <= _SAMPLE_DISTINCT * SAMPLE


def _sample_positions(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n, SAMPLE)  # fixed seed: the same frame, the same form


def _missing_value(values: np.ndarray, mask: np.ndarray, na_value: Any) -> tuple[bool, Any]:
    """The one missing value of an object array (None, NaN, pd.NA, ...); (False, None) if there are several kinds."""
    if not mask.any():
        return True, na_value
    found = values[mask]
    kinds = {(type(v), v is None or v is pd.NA) for v in found}
    return (True, found[0]) if len(kinds) == 1 else (False, None)  # only pickle keeps None and NaN apart


def enc_strings_object(values: np.ndarray, buffers: list[np.ndarray], na_value: Any = None) -> dict[str, Any] | None:
    """Encode an object array of str (and one kind of missing value) compactly; None if it holds anything else."""
    if values.ndim != 1:
        return None
    n = len(values)
    if n <= FEW and all(type(v) is str for v in values) and sum(map(len, values)) <= FEW_CHARACTERS:
        return {"k": "strings", "form": "few", "values": values.tolist(), "missing": None}
    try:
        factorise = pa is None or _worth_factorising(n, lambda: len(pd.unique(values.take(_sample_positions(n)))))
        factorised = pd.factorize(values, use_na_sentinel=True) if factorise else None
    except TypeError:  # unhashable values (lists, dicts): no strings
        return None
    if factorised is not None:
        codes, uniques = factorised
        if not all(type(u) is str for u in uniques):
            return None
        mask = codes < 0
        found, missing = _missing_value(values, mask, na_value)
        if not found:
            return None
        if pa is None:
            spec = _enc_dict(codes, len(uniques), mask, buffers)
            spec["uniques"] = {"k": "any", "attributes": encode_any(uniques, buffers)}
        else:
            try:
                arrow_uniques = pa.array(uniques, type=pa.large_string())
            except (pa.ArrowException, UnicodeError):  # lone surrogates are not UTF-8
                return None
            spec = _enc_factorised(codes, arrow_uniques, mask, buffers)
    else:
        mask = pd.isna(values)
        if set(map(type, values[~mask] if mask.any() else values)) - {str}:
            return None
        found, missing = _missing_value(values, mask, na_value)
        if not found:
            return None
        try:
            array = pa.array(values, type=pa.large_string(), mask=mask if mask.any() else None)
        except (pa.ArrowException, UnicodeError):
            return None
        spec = _enc_utf8(array, buffers)
    spec["missing"] = missing
    return spec


def enc_strings_arrow(array: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Encode a pyarrow (large_)string array compactly."""
    n = len(array)
    if n <= FEW and (n == 0 or _offsets(array)[-1] <= FEW_CHARACTERS):  # bytes of UTF-8: at least the characters
        return {"k": "strings", "form": "few", "values": array.to_pylist(), "missing": None}
    if _worth_factorising(n, lambda: len(array.take(pa.array(_sample_positions(n))).unique())):
        encoded = array.dictionary_encode()
        mask = np.asarray(array.is_null()) if array.null_count else np.zeros(n, bool)
        codes = encoded.indices.fill_null(0).to_numpy()
        spec = _enc_factorised(codes, encoded.dictionary, mask, buffers)
    else:
        spec = _enc_utf8(array, buffers)
    spec["missing"] = None
    return spec


def _enc_factorised(codes: np.ndarray, uniques: Any, mask: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Choose between unique values plus codes and UTF-8 bytes plus offsets, whichever is smaller."""
    n, count = len(codes), len(uniques)
    lengths = np.diff(_offsets(uniques))
    missing = int(mask.sum())
    codes = np.where(mask, 0, codes) if missing else codes
    counts = np.bincount(codes, minlength=count)
    if missing:
        counts[0] -= missing  # missing values carry code 0 but no bytes
    plain_bytes = int(counts[:count] @ lengths) if count else 0
    offset_size = 4 if plain_bytes < 2**31 else 8
    plain_size = plain_bytes + offset_size * (n + 1)
    dict_size = n * _code_dtype(count).itemsize + int(lengths.sum()) + 8 * (count + 1)
    if plain_size < dict_size:
        indices = pa.array(codes, mask=mask if missing else None)
        spec = _enc_utf8(uniques.take(indices), buffers)
    else:
        spec = _enc_dict(codes, count, mask, buffers)
        spec["uniques"] = _enc_utf8(uniques, buffers)
    return spec


def _enc_dict(codes: np.ndarray, count: int, mask: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any]:
    return {
        "k": "strings",
        "form": "dict",
        "codes": enc_numpy(codes.astype(_code_dtype(count)), buffers),
        "validity": _enc_validity(mask, buffers),
    }


def _enc_validity(mask: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any] | None:
    # Arrow's own format: one bit per value, set where valid, least significant bit first.
    return enc_numpy(np.packbits(~mask, bitorder="little"), buffers) if mask.any() else None


def _offsets(array: Any) -> np.ndarray:
    """The offsets of a pyarrow (large_)string array, starting at 0."""
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], width)[array.offset : array.offset + len(array) + 1]
    return offsets - offsets[0] if len(offsets) and offsets[0] else offsets


def _enc_utf8(array: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """UTF-8 bytes plus offsets (int32 when they fit) and a validity bitmap."""
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], width)[array.offset : array.offset + len(array) + 1]
    start, end = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    data = array.buffers()[2]
    data = np.frombuffer(data, np.uint8)[start:end] if data is not None else np.empty(0, np.uint8)
    offsets = offsets - start if start else offsets
    offsets = offsets.astype(np.int32 if end - start < 2**31 else np.int64, copy=False)
    mask = np.asarray(array.is_null()) if array.null_count else np.zeros(len(array), bool)
    return {
        "k": "strings",
        "form": "utf8",
        "length": len(array),
        "offsets": enc_numpy(offsets, buffers),
        "data": enc_numpy(data, buffers),
        "validity": _enc_validity(mask, buffers),
        "nulls": int(array.null_count),
    }


def _validity(spec: dict[str, Any], buffers: list[np.ndarray], n: int) -> np.ndarray | None:
    """The boolean mask of missing values, or None if there are none."""
    if spec["validity"] is None:
        return None
    bits = dec_numpy(spec["validity"], buffers)
    return ~np.unpackbits(bits, count=n, bitorder="little").view(bool)


def _dec_utf8(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    """A pyarrow string array on top of the stored buffers (no copy)."""
    offsets, data = dec_numpy(spec["offsets"], buffers), dec_numpy(spec["data"], buffers)
    n = spec["length"]
    # Checked because pyarrow trusts offsets: bad ones would make it read outside the data.
    if len(offsets) != n + 1 or (n and (offsets[0] != 0 or offsets[-1] != len(data) or (offsets[1:] < offsets[:-1]).any())):
        raise CorruptHandleError("stored string offsets do not match their data")
    kind = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    validity = None if spec["validity"] is None else pa.py_buffer(dec_numpy(spec["validity"], buffers))
    return pa.Array.from_buffers(kind, n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)], spec["nulls"])


def dec_strings(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    dtype = spec.get("dtype")
    to_arrow = dtype is not None and dtype.storage == "pyarrow"
    if spec["form"] == "few":
        few = spec["values"]  # a list of str, and of None for the missing values of an Arrow array
        if type(few) is not list or not all(type(v) is str or (to_arrow and v is None) for v in few):
            raise CorruptHandleError("stored strings are not a list of str")
        if to_arrow:
            return ArrowStringArray(pa.chunked_array([pa.array(few, type=spec["arrow_type"])]), dtype=dtype)  # type: ignore[call-arg]
        values = np.empty(len(few), dtype=object)
        values[:] = few
        mask = None
    elif spec["form"] == "utf8":
        array = _dec_utf8(spec, buffers)
        if to_arrow:
            return ArrowStringArray(pa.chunked_array([array.cast(spec["arrow_type"])]), dtype=dtype)  # type: ignore[call-arg]
        values = array.to_numpy(zero_copy_only=False)
        mask = _validity(spec, buffers, len(values))
    else:
        codes = dec_numpy(spec["codes"], buffers)
        uniques_spec = spec["uniques"]
        if uniques_spec["k"] == "any":
            uniques = pickled.decode(uniques_spec["attributes"], buffers)
        else:
            uniques = _dec_utf8(uniques_spec, buffers)
        mask = _validity(spec, buffers, len(codes))
        # codes of missing values are 0, and all values are missing if there are no unique ones
        if (codes.size and codes.max() >= max(len(uniques), 1)) or (not len(uniques) and codes.size and mask is None):
            raise CorruptHandleError("stored string codes out of range")
        if to_arrow:
            indices = pa.array(codes, mask=mask)
            strings = uniques.take(indices).cast(spec["arrow_type"])
            return ArrowStringArray(pa.chunked_array([strings]), dtype=dtype)  # type: ignore[call-arg]
        if not isinstance(uniques, np.ndarray):
            uniques = uniques.to_numpy(zero_copy_only=False)
        values = uniques.take(codes) if len(uniques) else np.full(len(codes), None, dtype=object)
    if mask is not None:
        values[mask] = spec["missing"] if dtype is None else dtype.na_value
    if dtype is not None:
        return StringArray(values, dtype=dtype)  # type: ignore[call-arg]
    return values
