"""Codec for pandas objects: DataFrame, Series, Index (every kind), Categorical and extension arrays.

An object becomes a small tree of plain dicts (the *spec*) that names, for
every array inside it, the buffer holding its data. Numeric data, masks,
category codes and datetime values go to buffers as they are, so that with
``copy=False`` the rebuilt object's arrays are views of the private mapping.
Strings are stored compactly (unique values plus the smallest integer codes,
or UTF-8 bytes plus offsets, whichever is smaller). Anything else (object
columns of arbitrary Python objects, Arrow-backed columns, unknown extension
arrays) goes through the pickled codec, whose large buffers and long streams
also land in shared memory.
"""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray
from pandas.arrays import (
    ArrowExtensionArray,
    ArrowStringArray,
    BooleanArray,
    DatetimeArray,
    FloatingArray,
    IntegerArray,
    IntervalArray,
    NumpyExtensionArray,
    PeriodArray,
    SparseArray,
    StringArray,
    TimedeltaArray,
)

from ..errors import CorruptHandleError
from . import pickled

try:
    import pyarrow as pa
except ImportError:  # strings are then factorised only, Arrow columns cannot occur
    pa = None

# The lines marked "type: ignore" use pandas' internals (_values, _data, _pa_array, _simple_new, ...) or
# attributes and arguments that pandas-stubs does not declare.

# Arrays this small stay in the attributes: a page of shared memory each would waste more than it saves.
INLINE_LIMIT = 64

_KINDS = {pd.DataFrame: "DataFrame", pd.Series: "Series", pd.Categorical: "Categorical"}
_MASKED = (IntegerArray, FloatingArray, BooleanArray)


def accepts(obj: Any) -> bool:
    """Whether this codec stores ``obj`` itself (pandas' own classes only, not subclasses)."""
    cls = type(obj)
    if cls in _KINDS:
        return True
    ours = cls.__module__.split(".")[0] == "pandas"
    return ours and (isinstance(obj, pd.Index) or (isinstance(obj, ExtensionArray) and _known_array(obj)))


def _known_array(values: ExtensionArray) -> bool:
    return isinstance(
        values,
        (
            pd.Categorical,
            DatetimeArray,
            TimedeltaArray,
            PeriodArray,
            IntervalArray,
            SparseArray,
            StringArray,
            ArrowExtensionArray,
            NumpyExtensionArray,
            *_MASKED,
        ),
    )


def encode(obj: Any, buffers: list[np.ndarray]) -> tuple[str, int, dict[str, Any]]:
    if isinstance(obj, pd.DataFrame):
        kind, spec = "DataFrame", _enc_frame(obj, buffers)
    elif isinstance(obj, pd.Series):
        kind, spec = "Series", _enc_series(obj, buffers)
    elif isinstance(obj, pd.Index):
        kind, spec = "Index", _enc_index(obj, buffers)
    else:
        kind = "Categorical" if isinstance(obj, pd.Categorical) else str(obj.dtype)
        spec = _enc_values(obj, buffers)
    # The spec travels pickled: the handle and the segment then hold the same bytes, which
    # allocate_from_shm compares exactly (re-pickling unpickled objects need not give the same bytes).
    return kind, len(obj), {"codec": "pandas", "kind": kind, "spec": pickle.dumps(spec, protocol=5)}


def decode(attributes: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    try:
        kind, spec = attributes["kind"], pickle.loads(attributes["spec"])
        if kind == "DataFrame":
            return _dec_frame(spec, buffers)
        if kind == "Series":
            return _dec_series(spec, buffers)
        if kind == "Index":
            return _dec_index(spec, buffers)
        return _dec_values(spec, buffers)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        # Stored specs come from the segment, whose owner was checked: a failure here means damage.
        raise CorruptHandleError(f"damaged pandas attributes in the stored object: {exc!r}") from exc


# ---------------------------------------------------------------- frames and series


def _enc_meta(obj: pd.DataFrame | pd.Series, buffers: list[np.ndarray]) -> dict[str, Any]:
    # attrs may hold anything (even frames): the generic path keeps a big one out of the handle
    attrs = _encode_any(dict(obj.attrs), buffers) if obj.attrs else None
    return {"index": _enc_index(obj.index, buffers), "attrs": attrs, "dup": obj.flags.allows_duplicate_labels}


def _set_meta(obj: pd.DataFrame | pd.Series, spec: dict[str, Any], buffers: list[np.ndarray]) -> None:
    if spec["attrs"] is not None:
        obj.attrs = pickled.decode(spec["attrs"], buffers)
    if not spec["dup"]:
        obj.flags.allows_duplicate_labels = False  # type: ignore[union-attr]


def _enc_frame(df: pd.DataFrame, buffers: list[np.ndarray]) -> dict[str, Any]:
    spec = _enc_meta(df, buffers)
    spec["columns"] = _enc_index(df.columns, buffers)
    # Column by column (by position, so duplicated labels are fine): each column is one buffer
    # that the rebuilt frame can view without consolidating blocks.
    spec["values"] = [_enc_values(df.iloc[:, i]._values, buffers) for i in range(df.shape[1])]
    return spec


def _dec_frame(spec: dict[str, Any], buffers: list[np.ndarray]) -> pd.DataFrame:
    index = _dec_index(spec["index"], buffers)
    columns = _dec_index(spec["columns"], buffers)
    arrays = [_dec_values(s, buffers) for s in spec["values"]]
    if len(arrays) != len(columns) or any(len(a) != len(index) for a in arrays):
        raise CorruptHandleError("stored frame does not match its columns or index")
    # Series with the explicit dtype stop pandas from inferring "str" for object columns; copy=False:
    # no consolidation into 2-D blocks, every column stays a view of its buffer.
    series = {i: pd.Series(a, index=index, dtype=a.dtype, copy=False) for i, a in enumerate(arrays)}
    df = pd.DataFrame(series, index=index, copy=False)
    del series  # so that writing to a column needs no copy-on-write
    df.columns = columns
    _set_meta(df, spec, buffers)
    return df


def _enc_series(s: pd.Series, buffers: list[np.ndarray]) -> dict[str, Any]:
    spec = _enc_meta(s, buffers)
    spec["values"] = _enc_values(s._values, buffers)
    spec["name"] = s.name
    return spec


def _dec_series(spec: dict[str, Any], buffers: list[np.ndarray]) -> pd.Series:
    values = _dec_values(spec["values"], buffers)
    index = _dec_index(spec["index"], buffers)
    s = pd.Series(values, index=index, name=spec["name"], dtype=values.dtype, copy=False)
    _set_meta(s, spec, buffers)
    return s


# ---------------------------------------------------------------- indexes


def _enc_index(idx: pd.Index, buffers: list[np.ndarray]) -> dict[str, Any]:
    if isinstance(idx, pd.RangeIndex):
        return {"k": "range", "range": (idx.start, idx.stop, idx.step), "name": idx.name}
    if isinstance(idx, pd.MultiIndex):
        return {
            "k": "multi",
            "levels": [_enc_index(level, buffers) for level in idx.levels],
            "codes": [_enc_values(np.asarray(c), buffers) for c in idx.codes],
            "names": list(idx.names),
            "sortorder": idx.sortorder,  # type: ignore[attr-defined]
        }
    spec = {"k": "index", "values": _enc_values(idx._values, buffers), "name": idx.name}  # type: ignore[attr-defined]
    freq = getattr(idx, "freq", None)
    if freq is not None and not isinstance(idx, pd.PeriodIndex):
        spec["freq"] = freq
    return spec


def _dec_index(spec: dict[str, Any], buffers: list[np.ndarray]) -> pd.Index:
    kind = spec["k"]
    if kind == "range":
        return pd.RangeIndex(*spec["range"], name=spec["name"])  # type: ignore[misc]
    if kind == "multi":
        return pd.MultiIndex(
            levels=[_dec_index(s, buffers) for s in spec["levels"]],  # type: ignore[misc]
            codes=[_dec_values(s, buffers) for s in spec["codes"]],
            names=spec["names"],
            sortorder=spec["sortorder"],
            verify_integrity=False,
        )
    if kind != "index":
        raise CorruptHandleError(f"unknown index kind {kind!r}")
    values = _dec_values(spec["values"], buffers)
    if "freq" in spec:
        cls = pd.DatetimeIndex if isinstance(values, DatetimeArray) else pd.TimedeltaIndex
        return cls(values, freq=spec["freq"], name=spec["name"], copy=False)
    return pd.Index(values, dtype=values.dtype, name=spec["name"], copy=False)


# ---------------------------------------------------------------- arrays


def _enc_numpy(values: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any]:
    if values.dtype.hasobject:  # e.g. the values of a sparse array of objects
        return {"k": "any", "attributes": _encode_any(values, buffers)}
    if values.nbytes <= INLINE_LIMIT:
        return {"k": "np", "inline": values.copy()}  # a copy: later changes to x must not alter the handle
    data = values if values.flags.c_contiguous else np.ascontiguousarray(values)
    buffers.append(data)
    return {"k": "np", "buffer": len(buffers) - 1}


def _dec_numpy(spec: dict[str, Any], buffers: list[np.ndarray]) -> np.ndarray:
    if spec["k"] == "any":
        return pickled.decode(spec["attributes"], buffers)
    if spec["k"] != "np":
        raise CorruptHandleError(f"expected a numpy array, found {spec['k']!r}")
    return spec["inline"].copy() if "inline" in spec else buffers[spec["buffer"]]


def _enc_values(values: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Encode a 1-D array of any kind pandas keeps in a Series, Index or column."""
    if isinstance(values, np.ndarray):
        if not values.dtype.hasobject:
            return _enc_numpy(values, buffers)
        return _enc_strings_object(values, buffers) or {"k": "any", "attributes": _encode_any(values, buffers)}
    if isinstance(values, pd.Categorical):
        return {
            "k": "cat",
            "codes": _enc_numpy(values.codes, buffers),
            "categories": _enc_index(values.categories, buffers),
            "ordered": bool(values.ordered),
        }
    if isinstance(values, (DatetimeArray, TimedeltaArray)):
        return {"k": "dt", "values": _enc_numpy(values._ndarray, buffers), "dtype": values.dtype}
    if isinstance(values, PeriodArray):
        return {"k": "period", "values": _enc_numpy(values.asi8, buffers), "dtype": values.dtype}  # type: ignore[attr-defined]
    if isinstance(values, IntervalArray):
        return {
            "k": "interval",
            "left": _enc_values(values.left._values, buffers),  # type: ignore[attr-defined]
            "right": _enc_values(values.right._values, buffers),  # type: ignore[attr-defined]
            "dtype": values.dtype,
        }
    if isinstance(values, _MASKED):
        return {
            "k": "masked",
            "data": _enc_numpy(values._data, buffers),  # type: ignore[union-attr]
            "mask": _enc_numpy(values._mask, buffers),  # type: ignore[union-attr]
            "dtype": values.dtype,
        }
    if isinstance(values, SparseArray):
        index = values.sp_index
        spec = {"k": "sparse", "values": _enc_numpy(values.sp_values, buffers), "length": len(values)}
        spec["dtype"] = values.dtype
        if values.kind == "block":
            spec["blocks"] = (_enc_numpy(index.blocs, buffers), _enc_numpy(index.blengths, buffers))
        else:
            spec["indices"] = _enc_numpy(index.indices, buffers)
        return spec
    if isinstance(values, StringArray):
        spec = _enc_strings_object(values._ndarray, buffers, values.dtype.na_value)
        if spec is not None:
            spec["dtype"] = values.dtype
            return spec
    elif isinstance(values, ArrowStringArray):
        spec = _enc_strings_arrow(values._pa_array.combine_chunks(), buffers)  # type: ignore[attr-defined]
        spec["dtype"], spec["arrow_type"] = values.dtype, values._pa_array.type  # type: ignore[attr-defined]
        return spec
    elif isinstance(values, ArrowExtensionArray):
        # pickle protocol 5 hands pyarrow's buffers out of band, and they go to shared memory
        return {"k": "arrow", "attributes": _encode_any(values._pa_array, buffers), "dtype": values.dtype}  # type: ignore[attr-defined]
    elif isinstance(values, NumpyExtensionArray):
        return {"k": "numpy-ea", "values": _enc_values(values._ndarray, buffers)}
    return {"k": "any", "attributes": _encode_any(values, buffers)}


def _dec_values(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    kind = spec["k"]
    if kind == "np":
        return _dec_numpy(spec, buffers)
    if kind == "any":
        return pickled.decode(spec["attributes"], buffers)
    if kind == "cat":
        dtype = pd.CategoricalDtype(_dec_index(spec["categories"], buffers), ordered=spec["ordered"])
        codes = _dec_numpy(spec["codes"], buffers)
        if codes.size and (codes.min() < -1 or codes.max() >= len(dtype.categories)):
            raise CorruptHandleError("stored category codes out of range")
        return pd.Categorical.from_codes(codes, dtype=dtype, validate=False)
    if kind == "dt":
        values, dtype = _dec_numpy(spec["values"], buffers), spec["dtype"]
        cls = TimedeltaArray if values.dtype.kind == "m" else DatetimeArray
        return cls._simple_new(values, dtype=dtype)  # type: ignore[union-attr]
    if kind == "period":
        return PeriodArray(_dec_numpy(spec["values"], buffers), dtype=spec["dtype"], copy=False)
    if kind == "interval":
        left, right, dtype = _dec_values(spec["left"], buffers), _dec_values(spec["right"], buffers), spec["dtype"]
        return IntervalArray.from_arrays(left, right, closed=dtype.closed, dtype=dtype, copy=False)
    if kind == "masked":
        data, mask = _dec_numpy(spec["data"], buffers), _dec_numpy(spec["mask"], buffers)
        return spec["dtype"].construct_array_type()(data, mask, copy=False)
    if kind == "sparse":
        from pandas._libs.sparse import BlockIndex, IntIndex

        if "blocks" in spec:
            blocs, blengths = (_dec_numpy(s, buffers) for s in spec["blocks"])
            index = BlockIndex(spec["length"], blocs, blengths)  # type: ignore[call-arg]
        else:
            index = IntIndex(spec["length"], _dec_numpy(spec["indices"], buffers))  # type: ignore[call-arg, assignment]
        return SparseArray._simple_new(_dec_numpy(spec["values"], buffers), index, spec["dtype"])  # type: ignore[attr-defined]
    if kind == "strings":
        return _dec_strings(spec, buffers)
    if kind == "arrow":
        return ArrowExtensionArray(pickled.decode(spec["attributes"], buffers))
    if kind == "numpy-ea":
        return NumpyExtensionArray(_dec_values(spec["values"], buffers))
    raise CorruptHandleError(f"unknown array kind {kind!r}")


# ---------------------------------------------------------------- strings


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


def _enc_strings_object(values: np.ndarray, buffers: list[np.ndarray], na_value: Any = None) -> dict[str, Any] | None:
    """Encode an object array of str (and one kind of missing value) compactly; None if it holds anything else."""
    if values.ndim != 1:
        return None
    n = len(values)
    if pa is None or _worth_factorising(n, lambda: len(pd.unique(values.take(_sample_positions(n))))):
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        if not all(type(u) is str for u in uniques):
            return None
        mask = codes < 0
        found, missing = _missing_value(values, mask, na_value)
        if not found:
            return None
        if pa is None:
            spec = _enc_dict(codes, len(uniques), mask, buffers)
            spec["uniques"] = {"k": "any", "attributes": _encode_any(uniques, buffers)}
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


def _encode_any(obj: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Pickle ``obj`` (large buffers and a long stream go to shared memory).

    Straight to the pickled codec, which never hands its root back: this codec's
    fallbacks must not come back to it.
    """
    return pickled.encode(obj, buffers)[2]


def _enc_strings_arrow(array: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Encode a pyarrow (large_)string array compactly."""
    n = len(array)
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
        "codes": _enc_numpy(codes.astype(_code_dtype(count)), buffers),
        "validity": _enc_validity(mask, buffers),
    }


def _enc_validity(mask: np.ndarray, buffers: list[np.ndarray]) -> dict[str, Any] | None:
    # Arrow's own format: one bit per value, set where valid, least significant bit first.
    return _enc_numpy(np.packbits(~mask, bitorder="little"), buffers) if mask.any() else None


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
        "offsets": _enc_numpy(offsets, buffers),
        "data": _enc_numpy(data, buffers),
        "validity": _enc_validity(mask, buffers),
        "nulls": int(array.null_count),
    }


def _validity(spec: dict[str, Any], buffers: list[np.ndarray], n: int) -> np.ndarray | None:
    """The boolean mask of missing values, or None if there are none."""
    if spec["validity"] is None:
        return None
    bits = _dec_numpy(spec["validity"], buffers)
    return ~np.unpackbits(bits, count=n, bitorder="little").view(bool)


def _dec_utf8(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    """A pyarrow string array on top of the stored buffers (no copy)."""
    offsets, data = _dec_numpy(spec["offsets"], buffers), _dec_numpy(spec["data"], buffers)
    n = spec["length"]
    # Checked because pyarrow trusts offsets: bad ones would make it read outside the data.
    if len(offsets) != n + 1 or (n and (offsets[0] != 0 or offsets[-1] != len(data) or (offsets[1:] < offsets[:-1]).any())):
        raise CorruptHandleError("stored string offsets do not match their data")
    kind = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    validity = None if spec["validity"] is None else pa.py_buffer(_dec_numpy(spec["validity"], buffers))
    return pa.Array.from_buffers(kind, n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)], spec["nulls"])


def _dec_strings(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    dtype = spec.get("dtype")
    to_arrow = dtype is not None and dtype.storage == "pyarrow"
    if spec["form"] == "utf8":
        array = _dec_utf8(spec, buffers)
        if to_arrow:
            return ArrowStringArray(pa.chunked_array([array.cast(spec["arrow_type"])]), dtype=dtype)  # type: ignore[call-arg]
        values = array.to_numpy(zero_copy_only=False)
        mask = _validity(spec, buffers, len(values))
    else:
        codes = _dec_numpy(spec["codes"], buffers)
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
