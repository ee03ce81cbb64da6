"""pandas objects and any other object through shared memory: equal, compact, zero-copy, safe."""
from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import gc
import multiprocessing as mp
import os
import pickle

import numpy as np
import pandas as pd
import pandas.testing as tm
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import pandas as hpd
from numpy._core.multiarray import get_handler_name

import shmalloc
from shmalloc import CorruptHandleError

N = 2_000  # rows: big enough for buffers of several pages, small for 2 shared cores


def roundtrip(x, copy: bool):
    return shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=copy)


def assert_same(result, expected) -> None:
    """Equal as pandas sees it with check_exact, with the same classes, attrs, flags and freq."""
    assert type(result) is type(expected)
    if isinstance(expected, pd.DataFrame):
        tm.assert_frame_equal(
            result, expected, check_exact=True, check_index_type=True, check_column_type=True, check_flags=True
        )
        assert_same_attrs(result.attrs, expected.attrs)
        assert_same(result.index, expected.index)
        assert_same(result.columns, expected.columns)
    elif isinstance(expected, pd.Series):
        tm.assert_series_equal(result, expected, check_exact=True, check_index_type=True, check_flags=True)
        assert_same_attrs(result.attrs, expected.attrs)
        assert_same(result.index, expected.index)
    elif isinstance(expected, pd.Index):
        tm.assert_index_equal(result, expected, exact=True, check_exact=True, check_categorical=True)
        assert result.names == expected.names
        assert getattr(result, "freq", None) == getattr(expected, "freq", None)
        if isinstance(expected, pd.MultiIndex):
            for r, e in zip(result.levels, expected.levels, strict=True):
                assert_same(r, e)
    elif isinstance(expected, pd.Categorical):
        tm.assert_extension_array_equal(result, expected, check_exact=True)
        assert_same(result.categories, expected.categories)
        assert result.ordered == expected.ordered
    elif isinstance(expected, pd.api.extensions.ExtensionArray):
        tm.assert_extension_array_equal(result, expected, check_exact=True)
    else:
        raise AssertionError(f"no comparison for {type(expected)}")


def assert_same_attrs(result: dict, expected: dict) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(result[key], value)
        elif isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
            assert_same(result[key], value)
        elif isinstance(value, dict):
            assert_same_attrs(result[key], value)
        else:
            assert result[key] == value


def _strings(n: int, missing=None) -> np.ndarray:
    values = np.array([f"s{i % 37}" for i in range(n)], dtype=object)
    values[::7] = missing
    return values


def _columns(n: int) -> dict[str, object]:
    """One column of every dtype pandas has."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-1000, 1000, n)
    mask = ints % 5 == 0
    return {
        "float64": rng.normal(size=n),
        "float32": rng.normal(size=n).astype(np.float32),
        "int8": ints.astype(np.int8),
        "uint64": ints.astype(np.uint64),
        "bool": ints > 0,
        "complex": ints * (1 + 2j),
        "datetime": pd.date_range("2000-01-01", periods=n, freq="h").values,
        "datetime_s": pd.date_range("2000-01-01", periods=n, freq="s", unit="s").values,
        "datetime_tz": pd.date_range("2000-01-01", periods=n, freq="min", tz="Europe/Berlin"),
        "datetime_nat": pd.Series(pd.date_range("2000-01-01", periods=n, tz="UTC")).where(~mask),
        "timedelta": pd.to_timedelta(ints, unit="s"),
        "period": pd.period_range("2000-01", periods=n, freq="M"),
        "interval": pd.arrays.IntervalArray.from_breaks(np.arange(n + 1.0), closed="left"),
        "interval_dt": pd.IntervalIndex.from_breaks(pd.date_range("2000", periods=n + 1, tz="UTC")),
        "category": pd.Categorical(np.where(mask, None, ints % 3), categories=[2, 0, 1], ordered=True),
        "category_str": pd.Categorical(_strings(n)),
        "Int64": pd.array(np.where(mask, None, ints), dtype="Int64"),
        "UInt8": pd.array(np.where(mask, None, ints % 200), dtype="UInt8"),
        "Float32": pd.array(np.where(mask, None, ints / 7), dtype="Float32"),
        "boolean": pd.array(np.where(mask, None, ints > 0), dtype="boolean"),
        "str": pd.array(_strings(n), dtype="str"),
        "str_python": pd.array(_strings(n), dtype=pd.StringDtype("python", na_value=np.nan)),
        "string_python": pd.array(_strings(n), dtype="string[python]"),
        "string_pyarrow": pd.array(_strings(n), dtype="string[pyarrow]"),
        "arrow_int": pd.array(np.where(mask, None, ints), dtype="int64[pyarrow]"),
        "arrow_string": pd.array(_strings(n), dtype=pd.ArrowDtype(pa.string())),
        "arrow_list": pd.Series([[i, i + 1] for i in range(n)], dtype=pd.ArrowDtype(pa.list_(pa.int64()))).array,
        "sparse": pd.arrays.SparseArray(np.where(mask, ints, 0), fill_value=0),
        "sparse_block": pd.arrays.SparseArray(np.where(mask, ints, np.nan), kind="block"),
        "object_str": pd.Series(_strings(n), dtype=object),
        "object_nan": pd.Series(_strings(n, np.nan), dtype=object),
        "object_na": pd.Series(_strings(n, pd.NA), dtype=object),
        "object_mixed": pd.Series([i if i % 3 else (str(i), decimal.Decimal(i)) for i in range(n)], dtype=object),
        "object_dates": pd.Series([dt.date(2000, 1, 1 + i % 28) for i in range(n)], dtype=object),
    }


COLUMNS = _columns(N)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("column", list(COLUMNS))
def test_series_of_every_dtype(column, copy):
    """A Series of each dtype comes back equal, with its name, index, attrs and flags."""
    s = pd.Series(COLUMNS[column], name=column, index=pd.RangeIndex(10, 10 + 3 * N, 3, name="row"))
    s.attrs = {"source": column, "weights": np.arange(3)}
    result = roundtrip(s, copy)
    assert_same(result, s)
    assert (result.attrs["weights"] == np.arange(3)).all()


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("column", list(COLUMNS))
def test_extension_array_and_index_of_every_dtype(column, copy):
    """The array itself and an Index built from it come back equal."""
    values = pd.array(COLUMNS[column]) if isinstance(COLUMNS[column], (np.ndarray, pd.Index)) else COLUMNS[column]
    if isinstance(values, pd.Series):
        values = values.array
    result = roundtrip(values, copy)
    assert_same(result, values)
    if not isinstance(values, pd.arrays.SparseArray):  # pandas has no sparse Index
        index = pd.Index(values, name=("an", "index"))
        assert_same(roundtrip(index, copy), index)


@pytest.mark.parametrize("copy", [True, False])
def test_frame_of_every_dtype(copy):
    """A frame with a column of every dtype, attrs and a flag, as one object."""
    df = pd.DataFrame(COLUMNS).set_flags(allows_duplicate_labels=False)
    df.attrs = {"created": dt.datetime(2024, 1, 1), "nested": {"frame": pd.DataFrame({"a": [1, 2]})}}
    obj = shmalloc.copy2shm(df)
    assert (obj.type, obj.length) == ("DataFrame", N)
    result = shmalloc.allocate_from_shm(obj, copy=copy)
    assert_same(result, df)
    assert_same(result.attrs["nested"]["frame"], df.attrs["nested"]["frame"])
    assert result.flags.allows_duplicate_labels is False


INDEXES = {
    "range": pd.RangeIndex(5, 5 + 2 * N, 2, name="r"),
    "empty_range": pd.RangeIndex(0),
    "int": pd.Index(np.arange(N)[::-1] * 3, name=0),
    "float_nan": pd.Index(np.where(np.arange(N) % 9, np.arange(N) / 3, np.nan)),
    "object_str": pd.Index(_strings(N), dtype=object),
    "str": pd.Index(_strings(N).astype(str)),
    "mixed": pd.Index([1, "a", 2.5, None] * (N // 4), dtype=object),
    "datetime_tz_freq": pd.date_range("2020-01-01", periods=N, freq="15min", tz="America/New_York", name="t"),
    "datetime_freq": pd.date_range("2020-01-01", periods=N, freq="D"),
    "timedelta_freq": pd.timedelta_range("1D", periods=N, freq="h"),
    "period": pd.period_range("2000Q1", periods=N, freq="Q"),
    "interval": pd.interval_range(0, N),
    "categorical": pd.CategoricalIndex(_strings(N), categories=[f"s{i}" for i in range(40)], name="c"),
    "multi": pd.MultiIndex.from_arrays(
        [np.arange(N) % 4, _strings(N).astype(str), pd.date_range("2000", periods=N, tz="UTC")], names=["a", None, "c"]
    ),
    "multi_with_missing": pd.MultiIndex.from_tuples([(1, "x"), (np.nan, "y"), (2, None)] * 100),
    "nullable": pd.Index(pd.array([1, None, 3] * 100, dtype="Int16")),
    "bool": pd.Index([True, False] * 100),
}


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("kind", list(INDEXES))
def test_every_kind_of_index(kind, copy):
    """Each Index kind comes back as that kind (RangeIndex as a range, freq and tz kept)."""
    index = INDEXES[kind]
    obj = shmalloc.copy2shm(index)
    assert (obj.type, obj.length) == ("Index", len(index))
    assert_same(shmalloc.allocate_from_shm(obj, copy=copy), index)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("kind", [k for k in INDEXES if len(INDEXES[k]) in (N, 0)])
def test_every_kind_of_index_on_a_frame(kind, copy):
    """The same index kinds as a frame's row index and, transposed, as its column labels."""
    index = INDEXES[kind]
    df = pd.DataFrame({"x": np.arange(len(index), dtype=np.int16), "x ": 1.5}, index=index)
    assert_same(roundtrip(df, copy), df)
    if len(index) <= 300:
        assert_same(roundtrip(df.T, copy), df.T)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize(
    "columns",
    [
        [0, 1.5, ("a", "b"), None],
        ["a", "a", "b", "a"],
        pd.MultiIndex.from_product([["x", "y"], [1, 2]], names=["l0", "l1"]),
        pd.date_range("2020", periods=4, freq="D"),
        pd.CategoricalIndex(["p", "q", "p", "r"]),
    ],
    ids=["non_strings", "duplicated", "multi", "dates", "categorical"],
)
def test_column_labels_of_any_kind(columns, copy):
    """Non-string, duplicated and MultiIndex column labels are kept, columns stay in order."""
    df = pd.DataFrame({i: COLUMNS[c] for i, c in enumerate(["float64", "str", "category", "Int64"])})
    df.columns = columns
    assert_same(roundtrip(df, copy), df)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("labels", [[10, 20], ["x", "y"]], ids=["int", "str"])
def test_frames_with_the_same_labels_never_change_each_others_labels(copy, labels):
    """Frames rebuilt with the same few labels share none of them: pandas lets a write through to an Index."""
    df = pd.DataFrame([[1.0, 2.0]], columns=pd.Index(labels))
    first, second = roundtrip(df, copy), roundtrip(df, copy)
    pd.array(first.columns, copy=False)[0] = labels[1]
    if first.columns.dtype.kind == "i":
        np.asarray(first.columns)[1] = 99
    assert [second.columns.tolist(), roundtrip(df, copy).columns.tolist()] == [labels] * 2


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize(
    "df",
    [
        pd.DataFrame(),
        pd.DataFrame(index=pd.date_range("2000", periods=3)),
        pd.DataFrame(columns=["a", "b"]),
        pd.DataFrame({"a": pd.Series([], dtype="Int64"), "b": pd.Series([], dtype="category"), "c": []}),
        pd.DataFrame({"a": [1.0]}, index=["only"]),
    ],
    ids=["empty", "no_columns", "no_rows_object", "no_rows_typed", "one_row"],
)
def test_empty_and_tiny_frames(df, copy):
    """Empty, zero-row and zero-column frames keep their dtypes and labels."""
    assert_same(roundtrip(df, copy), df)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize(
    "categories",
    [
        ["b", "a", "c"],
        [3, 1, 2],
        [0.5, -1.0, 2.25],
        list(pd.date_range("2000", periods=3, tz="Asia/Tokyo")),
        [pd.Interval(0, 1), pd.Interval(1, 2), pd.Interval(2, 3)],
        [("t", 1), ("t", 2), ("u", 1)],
    ],
    ids=["str", "int", "float", "datetime_tz", "interval", "tuples"],
)
def test_categorical_factor(categories, ordered, copy):
    """The factor case of the seed: codes, categories of any dtype, order and missing values."""
    codes = np.arange(N) % 4 - 1  # -1: missing
    cat = pd.Categorical.from_codes(codes, categories=pd.Index(categories, tupleize_cols=False), ordered=ordered)
    obj = shmalloc.copy2shm(cat)
    assert (obj.type, obj.length) == ("Categorical", N)
    result = shmalloc.allocate_from_shm(obj, copy=copy)
    assert_same(result, cat)
    assert result.isna().sum() == N // 4


@st.composite
def frames(draw):
    index = draw(
        st.sampled_from(
            [
                hpd.range_indexes(max_size=30),
                hpd.indexes(dtype=np.int64, max_size=30, unique=False),
                hpd.indexes(elements=st.text(max_size=5), max_size=30, unique=True),
            ]
        )
    )
    columns = hpd.columns(
        ["f", "i", "b", "t", "d", "o"],
        dtype=None,
    )
    columns = [
        hpd.column("f", dtype=np.float64),
        hpd.column("i", dtype=np.int32),
        hpd.column("b", dtype=bool),
        hpd.column("t", elements=st.text(max_size=8), dtype=object),
        hpd.column("d", dtype="datetime64[ns]"),
        hpd.column("o", elements=st.one_of(st.none(), st.integers(), st.text(max_size=3)), dtype=object),
    ]
    return draw(hpd.data_frames(columns, index=index))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=frames(), copy=st.booleans(), string_dtype=st.booleans())
def test_hypothesis_frames(df, copy, string_dtype):
    """Arbitrary frames (text with any code points, NaN, NaT, None, duplicated labels) round-trip."""
    if string_dtype:
        df = df.astype({"t": "str"})
    assert_same(roundtrip(df, copy), df)


# ---- strings ----


@pytest.mark.parametrize(
    "dtype", [object, "str", "string[python]", "string[pyarrow]", pd.StringDtype("python", na_value=np.nan)]
)
def test_repeated_strings_are_compact(dtype):
    """A million short strings from a thousand distinct values take well under 5 MB."""
    rng = np.random.default_rng(1)
    words = np.array([f"word{i:04d}" for i in range(1000)], dtype=object)
    s = pd.Series(words[rng.integers(0, 1000, 1_000_000)], dtype=dtype)
    obj = shmalloc.copy2shm(s)
    assert obj.size < 2.5e6, obj.size
    assert len(pickle.dumps(obj)) < 64 * 1024
    assert_same(shmalloc.allocate_from_shm(obj), s)


def _few_strings(dtype, n: int):
    """``n`` (at most 64: kept as a list in the handle) strings of ``dtype``, every 7th missing."""
    values = [None if i % 7 == 3 else f"v{i}" for i in range(n)]
    if dtype == "arrow string (not large)":
        return pd.arrays.ArrowStringArray(pa.chunked_array([pa.array(values, type=pa.string())], type=pa.string()))
    return pd.array(values, dtype=dtype) if dtype is not object else np.array(values, dtype=object)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("n", [0, 1, 64])
@pytest.mark.parametrize(
    "dtype",
    [object, "str", "string[python]", "string[pyarrow]", pd.StringDtype("python", na_value=np.nan), "arrow string (not large)"],
)
def test_few_strings_keep_dtype_arrow_type_and_missing_values(dtype, n, copy):
    """Up to 64 strings (as values, index and column labels) come back with their dtype, Arrow type and missing values."""
    values = _few_strings(dtype, n)
    series = pd.Series(values, index=pd.Index(values, dtype=values.dtype) if n else None, dtype=values.dtype)
    result = roundtrip(series, copy)
    assert_same(result, series)
    if isinstance(values, pd.arrays.ArrowStringArray):
        assert result.array._pa_array.type == values._pa_array.type
    labels = [v for v in _few_strings(dtype, n) if isinstance(v, str)]
    frame = pd.DataFrame([list(range(len(labels)))], columns=pd.Index(labels, dtype=values.dtype))
    assert_same(roundtrip(frame, copy), frame)
    surrogate = pd.Series(["a\ud800", "b"], dtype=object)  # not UTF-8: kept as it is
    assert_same(roundtrip(surrogate, copy), surrogate)


@pytest.mark.parametrize("dtype", [object, "str", "string[python]", "string[pyarrow]"])
def test_few_long_strings_go_to_shared_memory_not_the_handle(dtype):
    """Three strings of 100 KB: the handle stays small (the text is in buffers), and they round-trip."""
    s = pd.Series(["a" * 100_000, "b" * 100_000, "c" * 100_000], dtype=dtype)
    obj = shmalloc.copy2shm(s)
    assert len(pickle.dumps(obj)) < 16 * 1024
    assert_same(shmalloc.allocate_from_shm(obj), s)


@pytest.mark.parametrize("n", [100_000, 300_000])  # factorised exactly / judged from a sample
@pytest.mark.parametrize("dtype", [object, "str", "string[python]", "string[pyarrow]"])
def test_distinct_strings_are_stored_as_utf8_and_offsets(dtype, n):
    """Distinct strings: UTF-8 bytes plus 4-byte offsets, smaller than codes plus unique values."""
    values = np.array([f"é{i}" for i in range(n)], dtype=object)
    values[::1000] = None
    s = pd.Series(values, dtype=dtype)
    utf8 = sum(len(v.encode()) for v in values if v is not None)
    obj = shmalloc.copy2shm(s)
    assert obj.size < utf8 + 4 * n + n // 8 + 6 * 4096
    assert_same(shmalloc.allocate_from_shm(obj), s)


@pytest.mark.parametrize("copy", [True, False])
def test_long_object_columns_that_are_not_all_strings_are_pickled_exactly(copy):
    """A long column of distinct strings with one other object in it is not forced into strings."""
    for odd in (b"bytes", 1, np.str_("numpy"), "\ud800"):
        values = np.array([f"v{i}" for i in range(300_000)], dtype=object)
        values[-1] = odd
        s = pd.Series(values, dtype=object)
        result = roundtrip(s, copy)
        assert_same(result, s)
        assert type(result.iloc[-1]) is type(odd)


@pytest.mark.parametrize("copy", [True, False])
def test_object_strings_keep_their_kind_of_missing_value(copy):
    """None, NaN and pd.NA in object columns come back as they were, also mixed."""
    df = pd.DataFrame(
        {
            "none": _strings(50, None),
            "nan": _strings(50, np.nan),
            "na": _strings(50, pd.NA),
            "mixed": np.array(["a", None, np.nan, pd.NA, "b"] * 10, dtype=object),
            "surrogates": np.array(["\ud800", "ok", "\udfff"] * 10 + ["x"] * 20, dtype=object),
            "bytes_and_str": np.array([b"a", "a"] * 25, dtype=object),
            "np_str": np.array([np.str_("a"), 1] * 25, dtype=object),
        },
        dtype=object,
    )
    result = roundtrip(df, copy)
    assert_same(result, df)
    for column in df:
        assert [type(v) for v in result[column]] == [type(v) for v in df[column]], column


# ---- generic objects ----


@dataclasses.dataclass
class Result:
    name: str
    frame: pd.DataFrame
    when: np.ndarray


@pytest.mark.parametrize("copy", [True, False])
def test_nested_objects(copy):
    """Dicts, lists, tuples and dataclasses nesting arrays and frames; their big buffers go out of band."""
    n = 200_000
    frame = pd.DataFrame({"t": pd.date_range("2000", periods=n, freq="s", tz="UTC"), "s": _strings(n)})
    x = {
        "frames": [frame, frame.iloc[::2]],
        "pair": (np.arange(n), pd.Series(np.arange(n.bit_length()), name="short")),
        "result": Result("r", frame[["t"]], pd.date_range("1990", periods=n).values),
        "table": pa.table({"a": np.arange(n), "b": _strings(n).astype(str)}),
        "plain": {1: "one", None: [1.5, "two"]},
    }
    obj = shmalloc.copy2shm(x)
    assert obj.type == "object" and obj.length == 5
    assert len(pickle.dumps(obj)) < 16 * 1024, "large buffers must not travel in the handle"
    result = shmalloc.allocate_from_shm(obj, copy=copy)
    assert_same(result["frames"][0], frame)
    assert_same(result["frames"][1], frame.iloc[::2])
    assert np.array_equal(result["pair"][0], x["pair"][0])
    assert_same(result["pair"][1], x["pair"][1])
    assert result["result"].name == "r" and np.array_equal(result["result"].when, x["result"].when)
    assert_same(result["result"].frame, frame[["t"]])
    assert result["table"].equals(x["table"])
    assert result["plain"] == x["plain"]


def test_subclass_of_dataframe_goes_through_pickle():
    """A DataFrame subclass with its own metadata is pickled whole and keeps class and metadata."""
    df = _SubFrame({"a": np.arange(10)})
    df.unit = "m"
    result = roundtrip(df, False)
    assert type(result) is _SubFrame and result.unit == "m"
    tm.assert_frame_equal(result, df)


class _SubFrame(pd.DataFrame):
    _metadata = ["unit"]  # noqa: RUF012 (pandas reads this class attribute as a list)

    @property
    def _constructor(self):
        return _SubFrame


# ---- the handle ----


@pytest.mark.parametrize("rows", [0, 10, 200_000])
def test_handle_stays_small_for_100_columns(rows):
    """With 100 columns of non-object dtypes the pickled handle stays under 64 KB, at any length."""
    kinds = [c for c in COLUMNS if not c.startswith("object")]
    n = min(rows, N)
    columns = {f"{kinds[i % len(kinds)]}_{i}": COLUMNS[kinds[i % len(kinds)]][:n] for i in range(100)}
    df = pd.DataFrame(columns)
    if rows > N:
        df = pd.concat([df] * (rows // N), ignore_index=True)
    obj = shmalloc.copy2shm(df)
    try:
        assert len(pickle.dumps(obj, protocol=5)) < 64 * 1024
        assert (obj.type, obj.length) == ("DataFrame", len(df))
        assert obj.size == os.stat("/dev/shm" + obj.name).st_size
    finally:
        shmalloc.unlink(obj)


@pytest.mark.parametrize(
    "labels",
    [["x" * 1_000_000, "y"], [10**4000 + i for i in range(64)], [str(i) * 20_000 for i in range(64)]],
    ids=["long-str", "huge-ints", "many-long-str"],
)
def test_long_labels_stay_out_of_the_handle(labels):
    """Index labels that are long strings or ints beyond 64 bits go to shared memory, not into the
    handle (a few short labels stay in it), and come back exactly."""
    index = pd.Index(labels, dtype=object)
    for obj_of in (lambda: index, lambda: pd.DataFrame(np.zeros((2, len(labels))), columns=index)):
        x = obj_of()
        obj = shmalloc.copy2shm(x)
        assert len(pickle.dumps(obj, protocol=5)) < 16 * 1024
        assert_same(shmalloc.allocate_from_shm(obj), x)


def test_frames_with_the_same_labels_get_indexes_of_their_own():
    """Column labels that compare equal but differ in type or sign (1, True, 1.0; 0.0, -0.0) come back as
    they were, one frame after another; renaming one result's columns leaves the next one's alone."""
    for labels in ([1, 2], [True, False], [1.0, 2.0], [0.0, 1.0], [-0.0, 1.0], ["a", "b"]):
        df = pd.DataFrame(np.zeros((2, 2)), columns=pd.Index(labels, dtype=object))
        first = shmalloc.allocate_from_shm(shmalloc.copy2shm(df))
        second = shmalloc.allocate_from_shm(shmalloc.copy2shm(df))
        first.columns.name = "renamed"
        assert second.columns.name is None and first.columns is not second.columns
        for result in (first, second):
            assert [(type(v), repr(v)) for v in result.columns] == [(type(v), repr(v)) for v in labels]


def test_object_columns_of_lists_and_dicts_round_trip():
    """Object columns whose values cannot be hashed (lists, dicts) are pickled, and come back equal."""
    df = pd.DataFrame({"l": pd.Series([[1, 2], {"a": 1}, [1]], dtype=object), "x": [1.0, 2.0, 3.0]})
    for copy in (True, False):
        result = shmalloc.allocate_from_shm(shmalloc.copy2shm(df), copy=copy)
        assert result["l"].tolist() == [[1, 2], {"a": 1}, [1]] and result["l"].dtype == object
        assert_same(result[["x"]], df[["x"]])


# ---- zero copy ----


def _owner(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _maps() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def test_zero_copy_frame_views_the_mapping_and_unmaps_after_gc():
    """copy=False: numeric data, masks and category codes view the mapping; it goes away with the frame."""
    n = 100_000
    df = pd.DataFrame(
        {
            "x": np.arange(n, dtype=np.float64),
            "m": pd.array(np.arange(n), dtype="Int64"),
            "c": pd.Categorical(np.arange(n) % 300),
            "t": pd.date_range("2000", periods=n, freq="s"),
        }
    )
    obj = shmalloc.copy2shm(df)
    key = obj.name.lstrip("/")
    result = shmalloc.allocate_from_shm(obj, copy=False)
    parts = [
        result["x"].to_numpy(),
        result["m"].array._data,
        result["m"].array._mask,
        result["c"].array.codes,
        result["t"].array._ndarray,
    ]
    for part in parts:
        owner = _owner(part)
        assert get_handler_name(owner) == "shmalloc" and owner.flags.owndata
    assert key in _maps()
    # writable, copy-on-write: the change stays in this frame
    result.loc[0, "x"] = -1.0
    result.loc[1, "m"] = pd.NA
    assert result.loc[0, "x"] == -1.0 and result.loc[1, "m"] is pd.NA
    derived = result["x"].iloc[10:20]
    del result, parts, owner, part
    gc.collect()
    assert key in _maps(), "a derived Series keeps its part of the mapping"
    assert derived.iloc[0] == 10.0
    del derived
    gc.collect()
    assert key not in _maps()


def test_copy_true_leaves_no_mapping():
    """copy=True: the columns live in regular memory, no mapping of the object remains."""
    df = pd.DataFrame({"x": np.arange(100_000.0), "c": pd.Categorical(np.arange(100_000) % 7)})
    obj = shmalloc.copy2shm(df)
    result = shmalloc.allocate_from_shm(obj, copy=True)
    assert obj.name.lstrip("/") not in _maps()
    assert get_handler_name(_owner(result["x"].to_numpy())) == "default_allocator"
    assert_same(result, df)


def test_zero_copy_is_not_affected_by_later_changes_to_the_source(map_every_size):
    """The object is a snapshot: changing the source frame after copy2shm changes nothing."""
    df = pd.DataFrame({"x": np.arange(1000.0), "s": _strings(1000)})
    obj = shmalloc.copy2shm(df)
    expected = df.copy()
    df.loc[0, "x"] = 99.0
    df.loc[0, "s"] = "changed"
    assert_same(shmalloc.allocate_from_shm(obj, copy=False), expected)


# ---- across processes ----


def make_frame(n: int) -> pd.DataFrame:
    frame = pd.DataFrame({k: COLUMNS[k][:n] for k in ("float64", "datetime_tz", "category", "Int64", "str", "object_mixed")})
    frame.attrs = {"rows": n}
    return frame


# Sent beside the frame, so that its segment is large enough to be mapped with copy=False (a smaller
# one is read into regular memory).
BALLAST = np.arange(1 << 17, dtype=np.float64)


def export_frame(n: int, copy: bool) -> shmalloc.ShmObj:
    """Runs in a spawned child."""
    return shmalloc.copy2shm((make_frame(n), BALLAST), copy=copy)


def check_frame(obj: shmalloc.ShmObj, n: int) -> str:
    """Runs in a spawned child: allocate and compare, report the handler of the float column."""
    result, ballast = shmalloc.allocate_from_shm(obj)
    assert_same(result, make_frame(n))
    assert np.array_equal(ballast, BALLAST)
    return get_handler_name(_owner(result["float64"].to_numpy()))


@pytest.mark.parametrize("copy", [True, False])
def test_spawned_child_exports_parent_allocates(copy):
    """A frame made in a spawned interpreter comes back equal in the parent."""
    with mp.get_context("spawn").Pool(1) as pool:
        obj = pool.apply(export_frame, (N, copy))
    result, ballast = shmalloc.allocate_from_shm(obj)
    assert_same(result, make_frame(N))
    assert np.array_equal(ballast, BALLAST)
    assert get_handler_name(_owner(result["float64"].to_numpy())) == ("default_allocator" if copy else "shmalloc")


@pytest.mark.parametrize("copy", [True, False])
def test_parent_exports_spawned_child_allocates(copy):
    """A frame made in the parent comes back equal in a spawned interpreter, which unlinks it."""
    obj = shmalloc.copy2shm((make_frame(N), BALLAST), copy=copy)
    with mp.get_context("spawn").Pool(1) as pool:
        handler = pool.apply(check_frame, (obj, N))
    assert handler == ("default_allocator" if copy else "shmalloc")
    assert not os.path.exists("/dev/shm" + obj.name)


# ---- damaged handles ----


def _damaged_specs(obj: shmalloc.ShmObj) -> list[dict]:
    spec = obj.attributes["spec"]
    return [
        dict(obj.attributes, spec=spec[:-5]),
        dict(obj.attributes, spec=spec[:40] + bytes([spec[40] ^ 0xFF]) + spec[41:]),
        dict(obj.attributes, spec=pickle.dumps({"k": "index"})),
        dict(obj.attributes, kind="Series"),
        dict(obj.attributes, codec="nothing"),
        {},
    ]


@pytest.mark.parametrize("change", range(9))
def test_corrupted_handle_gives_corrupt_handle_error(change):
    """Any change to a handle's fields is refused before the data is used, and the object is removed."""
    df = pd.DataFrame({"x": np.arange(N), "s": _strings(N), "c": COLUMNS["category"]})
    obj = shmalloc.copy2shm(df)
    changes = [{"attributes": a} for a in _damaged_specs(obj)]
    changes += [{"type": "Series"}, {"length": N + 1}, {"size": obj.size + 4096}]
    bad = dataclasses.replace(obj, **changes[change])
    with pytest.raises(CorruptHandleError):
        shmalloc.allocate_from_shm(bad)
    assert not os.path.exists("/dev/shm" + obj.name)
