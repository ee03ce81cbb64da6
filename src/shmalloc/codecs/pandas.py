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
from . import _strings, pickled
from ._parts import dec_numpy, enc_numpy, encode_any

try:  # pandas >= 3.0: a frame made from its columns as they are, with no inference (2.5x faster)
    from pandas.api.internals import create_dataframe_from_blocks  # type: ignore[import-not-found]
except ImportError:
    create_dataframe_from_blocks = None

# The lines marked "type: ignore" use pandas' internals (_values, _data, _pa_array, _simple_new, ...) or
# attributes and arguments that pandas-stubs does not declare.

_KINDS = {pd.DataFrame: "DataFrame", pd.Series: "Series", pd.Categorical: "Categorical"}
_MASKED = (IntegerArray, FloatingArray, BooleanArray)
# An Index of at most this many labels, all plain str, int (of 64 bits), float or bool, and at most
# _strings.FEW_CHARACTERS characters of str in all (column labels, mostly), stays in the spec as a
# list: rebuilding it from the list costs less than from arrays, and the handle stays small.
FEW_LABELS = 64
_LABEL_TYPES = (str, int, float, bool)


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
    except CorruptHandleError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        # Stored specs come from the segment, whose owner was checked: a failure here means damage.
        raise CorruptHandleError(f"damaged pandas attributes in the stored object: {exc!r}") from exc


# ---------------------------------------------------------------- frames and series


def _enc_meta(obj: pd.DataFrame | pd.Series, buffers: list[np.ndarray]) -> dict[str, Any]:
    # attrs may hold anything (even frames): the generic path keeps a big one out of the handle
    attrs = encode_any(dict(obj.attrs), buffers) if obj.attrs else None
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
    spec["values"] = [_enc_values(values, buffers) for values in _column_values(df)]
    return spec


def nbytes(obj: Any) -> int:
    """Roughly the bytes a pandas object holds (``memory_usage(deep=False)``'s total, without building a Series)."""
    if isinstance(obj, pd.DataFrame):  # by block: a new frame has not yet worked out where each column is
        return obj.index.nbytes + sum(block.values.nbytes for block in obj._mgr.blocks)
    if isinstance(obj, pd.Series):
        return obj.index.nbytes + obj.nbytes
    return int(obj.nbytes) if hasattr(obj, "nbytes") else int(obj.memory_usage(deep=False).sum())


def _column_values(df: pd.DataFrame) -> list[Any]:
    """Each column's values (what ``df.iloc[:, i]._values`` gives), without making a Series per column."""
    manager = df._mgr
    if hasattr(manager, "iget_values"):
        return [manager.iget_values(i) for i in range(df.shape[1])]
    return [df.iloc[:, i]._values for i in range(df.shape[1])]


def _dec_frame(spec: dict[str, Any], buffers: list[np.ndarray]) -> pd.DataFrame:
    index = _dec_index(spec["index"], buffers)
    columns = _dec_index(spec["columns"], buffers)
    arrays = [_dec_values(s, buffers) for s in spec["values"]]
    if len(arrays) != len(columns) or any(len(a) != len(index) for a in arrays):
        raise CorruptHandleError("stored frame does not match its columns or index")
    if any(isinstance(a, np.ndarray) and a.ndim != 1 for a in arrays):
        raise CorruptHandleError("stored frame column is not one-dimensional")
    if create_dataframe_from_blocks is not None:
        # A block per column, each a view of its buffer (no consolidation, nothing inferred).
        blocks = [(a.reshape(1, -1) if isinstance(a, np.ndarray) else a, np.array([i])) for i, a in enumerate(arrays)]
        df = create_dataframe_from_blocks(blocks, index=index, columns=columns)
        _set_meta(df, spec, buffers)
        return df
    # copy=False: no consolidation into 2-D blocks, every column stays a view of its buffer. Object
    # columns go in as Series of their dtype, which stops pandas from inferring "str" for them.
    columns_by_position = {
        i: pd.Series(a, index=index, dtype=a.dtype, copy=False) if a.dtype == object else a for i, a in enumerate(arrays)
    }
    df = pd.DataFrame(columns_by_position, index=index, copy=False)
    del columns_by_position  # so that writing to a column needs no copy-on-write
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
    labels = few_labels(idx)
    if labels is not None:
        return {"k": "labels", "labels": labels, "dtype": idx.dtype, "name": idx.name}
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
    if kind == "labels":
        return labels_index(spec["labels"], spec["dtype"], spec["name"])
    if kind != "index":
        raise CorruptHandleError(f"unknown index kind {kind!r}")
    values = _dec_values(spec["values"], buffers)
    if "freq" in spec:
        cls = pd.DatetimeIndex if isinstance(values, DatetimeArray) else pd.TimedeltaIndex
        return cls(values, freq=spec["freq"], name=spec["name"], copy=False)
    return pd.Index(values, dtype=values.dtype, name=spec["name"], copy=False)


def few_labels(idx: Any) -> list[Any] | None:
    """The labels of ``idx`` as a list if :func:`labels_index` rebuilds it exactly from them: a plain
    ``pd.Index`` (not a subclass) of at most :data:`FEW_LABELS` plain labels of a plain dtype; else None."""
    if type(idx) is pd.Index and len(idx) <= FEW_LABELS and _plain_dtype(idx.dtype):
        labels = _labels_list(idx)
        if _few_plain(labels):
            return labels
    return None


def _labels_list(idx: pd.Index) -> list[Any]:
    """``idx.tolist()``; for pandas' str dtype with no missing label, through Arrow (0.7 µs against 4.4)."""
    values = idx.array
    if isinstance(values, ArrowStringArray):
        arrow = values.__arrow_array__()
        if arrow.null_count == 0:
            return arrow.to_pylist()
    return idx.tolist()


def labels_index(labels: list[Any], dtype: Any, name: Any) -> pd.Index:
    """The Index of ``labels`` (as :func:`few_labels` gave them), of ``dtype`` and ``name``.

    Raises CorruptHandleError if they are not such labels.
    """
    if type(labels) is not list or not _few_plain(labels) or not _plain_dtype(dtype):
        raise CorruptHandleError("index labels are not a list of plain labels of a plain dtype")
    # Keyed by the labels' repr, which tells 1, 1.0 and True, and 0.0 and -0.0, apart (== does not), but
    # not one NaN from another (their sign and payload): labels with a NaN are not kept.
    text = repr(labels)
    if "nan" in text or not (name is None or type(name) is str):  # other names: pd.Index checks them
        return pd.Index(labels, dtype=dtype, name=name)
    # A copy of the labels' values made once (the same columns come back in result after result), and
    # its own copy of their lookup engine's cache: all of this takes 2-4 µs, where pd.Index of three str
    # labels takes 16, and its first lookup by label 16 more. Nothing a result can change is shared.
    values, cache = _labels_values(text, labels, dtype)
    index = pd.Index._simple_new(values.copy(), name=name)  # type: ignore[attr-defined]
    index._cache = dict(cache)  # pandas' cache of an Index: its engine, is_unique, dtype
    return index


_LABEL_VALUES: dict[tuple[str, Any], tuple[Any, dict[str, Any]]] = {}
_LABEL_VALUES_KEPT = 128


def _labels_values(text: str, labels: list[Any], dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The values of an Index of these labels (``text``: their repr) and ``dtype``, made once, and its
    cache, which holds the lookup engine, built from those values (nobody else holds them): copy both."""
    key = (text, dtype)
    made = _LABEL_VALUES.get(key)
    if made is None:
        if len(_LABEL_VALUES) >= _LABEL_VALUES_KEPT:
            _LABEL_VALUES.clear()
        index = pd.Index(labels, dtype=dtype)
        _ = index.is_unique  # builds and fills the engine now: never later, from values a result has changed
        made = _LABEL_VALUES[key] = (index._values, index._cache)
    return made


def _few_plain(labels: list[Any]) -> bool:
    """Whether ``labels`` are all of :data:`_LABEL_TYPES`, ints of 64 bits, and short strings."""
    characters = 0
    for label in labels:
        kind = type(label)
        if kind is str:
            characters += len(label)
        elif kind is int:
            if not -(2**63) <= label < 2**64:
                return False
        elif kind not in _LABEL_TYPES:
            return False
    return characters <= _strings.FEW_CHARACTERS


def _plain_dtype(dtype: Any) -> bool:
    """Whether an Index of this dtype is rebuilt exactly from a list of its labels: numpy's bool, int,
    float and object dtypes, and pandas' str dtype (missing values NaN)."""
    if isinstance(dtype, np.dtype):  # metadata: such a dtype equals the plain one, so a cache key would mix them
        return dtype.kind in "biufO" and dtype.metadata is None
    return isinstance(dtype, pd.StringDtype) and dtype.na_value is not pd.NA


# ---------------------------------------------------------------- arrays


def _enc_values(values: Any, buffers: list[np.ndarray]) -> dict[str, Any]:
    """Encode a 1-D array of any kind pandas keeps in a Series, Index or column."""
    if isinstance(values, np.ndarray):
        if not values.dtype.hasobject:
            return enc_numpy(values, buffers)
        return _strings.enc_strings_object(values, buffers) or {"k": "any", "attributes": encode_any(values, buffers)}
    if isinstance(values, pd.Categorical):
        return {
            "k": "cat",
            "codes": enc_numpy(values.codes, buffers),
            "categories": _enc_index(values.categories, buffers),
            "ordered": bool(values.ordered),
        }
    if isinstance(values, (DatetimeArray, TimedeltaArray)):
        return {"k": "dt", "values": enc_numpy(values._ndarray, buffers), "dtype": values.dtype}
    if isinstance(values, PeriodArray):
        return {"k": "period", "values": enc_numpy(values.asi8, buffers), "dtype": values.dtype}  # type: ignore[attr-defined]
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
            "data": enc_numpy(values._data, buffers),  # type: ignore[union-attr]
            "mask": enc_numpy(values._mask, buffers),  # type: ignore[union-attr]
            "dtype": values.dtype,
        }
    if isinstance(values, SparseArray):
        index = values.sp_index
        spec = {"k": "sparse", "values": enc_numpy(values.sp_values, buffers), "length": len(values)}
        spec["dtype"] = values.dtype
        if values.kind == "block":
            spec["blocks"] = (enc_numpy(index.blocs, buffers), enc_numpy(index.blengths, buffers))
        else:
            spec["indices"] = enc_numpy(index.indices, buffers)
        return spec
    if isinstance(values, StringArray):
        spec = _strings.enc_strings_object(values._ndarray, buffers, values.dtype.na_value)
        if spec is not None:
            spec["dtype"] = values.dtype
            return spec
    elif isinstance(values, ArrowStringArray):
        spec = _strings.enc_strings_arrow(values._pa_array.combine_chunks(), buffers)  # type: ignore[attr-defined]
        spec["dtype"], spec["arrow_type"] = values.dtype, values._pa_array.type  # type: ignore[attr-defined]
        return spec
    elif isinstance(values, ArrowExtensionArray):
        # pickle protocol 5 hands pyarrow's buffers out of band, and they go to shared memory
        return {"k": "arrow", "attributes": encode_any(values._pa_array, buffers), "dtype": values.dtype}  # type: ignore[attr-defined]
    elif isinstance(values, NumpyExtensionArray):
        return {"k": "numpy-ea", "values": _enc_values(values._ndarray, buffers)}
    return {"k": "any", "attributes": encode_any(values, buffers)}


def _dec_values(spec: dict[str, Any], buffers: list[np.ndarray]) -> Any:
    kind = spec["k"]
    if kind == "np":
        return dec_numpy(spec, buffers)
    if kind == "any":
        return pickled.decode(spec["attributes"], buffers)
    if kind == "cat":
        dtype = pd.CategoricalDtype(_dec_index(spec["categories"], buffers), ordered=spec["ordered"])
        codes = dec_numpy(spec["codes"], buffers)
        if codes.size and (codes.min() < -1 or codes.max() >= len(dtype.categories)):
            raise CorruptHandleError("stored category codes out of range")
        return pd.Categorical.from_codes(codes, dtype=dtype, validate=False)
    if kind == "dt":
        values, dtype = dec_numpy(spec["values"], buffers), spec["dtype"]
        cls = TimedeltaArray if values.dtype.kind == "m" else DatetimeArray
        return cls._simple_new(values, dtype=dtype)  # type: ignore[union-attr]
    if kind == "period":
        return PeriodArray(dec_numpy(spec["values"], buffers), dtype=spec["dtype"], copy=False)
    if kind == "interval":
        left, right, dtype = _dec_values(spec["left"], buffers), _dec_values(spec["right"], buffers), spec["dtype"]
        return IntervalArray.from_arrays(left, right, closed=dtype.closed, dtype=dtype, copy=False)
    if kind == "masked":
        data, mask = dec_numpy(spec["data"], buffers), dec_numpy(spec["mask"], buffers)
        return spec["dtype"].construct_array_type()(data, mask, copy=False)
    if kind == "sparse":
        from pandas._libs.sparse import BlockIndex, IntIndex

        if "blocks" in spec:
            blocs, blengths = (dec_numpy(s, buffers) for s in spec["blocks"])
            index = BlockIndex(spec["length"], blocs, blengths)  # type: ignore[call-arg]
        else:
            index = IntIndex(spec["length"], dec_numpy(spec["indices"], buffers))  # type: ignore[call-arg, assignment]
        return SparseArray._simple_new(dec_numpy(spec["values"], buffers), index, spec["dtype"])  # type: ignore[attr-defined]
    if kind == "strings":
        return _strings.dec_strings(spec, buffers)
    if kind == "arrow":
        return ArrowExtensionArray(pickled.decode(spec["attributes"], buffers))
    if kind == "numpy-ea":
        return NumpyExtensionArray(_dec_values(spec["values"], buffers))
    raise CorruptHandleError(f"unknown array kind {kind!r}")
