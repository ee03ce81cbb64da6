"""The .shm accessor: registered on DataFrame, Series and Index; export is copy2shm."""
from __future__ import annotations

import doctest
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pandas.testing as tm
import pytest

import shmalloc
from shmalloc import _accessor

OBJECTS = {
    "DataFrame": pd.DataFrame({"x": np.arange(5000.0), "c": pd.Categorical(np.arange(5000) % 3), "s": "a"}),
    "Series": pd.Series(pd.date_range("2000", periods=5000, tz="UTC"), name="t"),
    "Index": pd.MultiIndex.from_product([range(50), list("abcd")], names=["n", "l"]),
}


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("kind", list(OBJECTS))
def test_export_is_copy2shm(kind, copy):
    """x.shm.export() gives a handle of the right kind that allocate_from_shm turns back into x."""
    x = OBJECTS[kind]
    obj = x.shm.export(copy=copy)
    assert (obj.type, obj.length, obj.copy) == (kind, len(x), copy)
    result = shmalloc.allocate_from_shm(obj)
    assert type(result) is type(x)
    assert result.equals(x)


def test_export_takes_name_and_overwrite(shm_name):
    """name and overwrite behave as in copy2shm: EEXIST without overwrite, replacement with it."""
    df = OBJECTS["DataFrame"]
    first = df.shm.export(name=shm_name)
    assert first.name == shm_name and os.path.exists("/dev/shm" + shm_name)
    with pytest.raises(FileExistsError):
        df.iloc[:10].shm.export(name=shm_name)
    second = df.iloc[:10].shm.export(name=shm_name, overwrite=True)
    tm.assert_frame_equal(shmalloc.allocate_from_shm(second), df.iloc[:10])
    with pytest.raises(shmalloc.ShmError):
        shmalloc.allocate_from_shm(first)  # replaced: its name now leads nowhere


def test_export_rejects_bad_arguments():
    """Wrong argument types fail before anything is created."""
    s = pd.Series([1, 2])
    with pytest.raises(TypeError):
        s.shm.export(copy="yes")
    with pytest.raises(ValueError):
        s.shm.export(name="no-slash")


def test_accessor_is_stateless():
    """The accessor reads the object when called: later changes to the object are exported."""
    df = pd.DataFrame({"x": [1.0, 2.0]})
    accessor = df.shm
    df.loc[0, "x"] = 5.0
    result = shmalloc.allocate_from_shm(accessor.export())
    assert result["x"].tolist() == [5.0, 2.0]
    assert vars(_accessor.ShmAccessor(df)).keys() == {"_obj"}


def test_accessor_validates_its_object():
    """Anything but a DataFrame, Series or Index is refused with AttributeError, as pandas expects."""
    with pytest.raises(AttributeError, match="DataFrame, Series and Index"):
        _accessor.ShmAccessor(np.arange(3))
    assert not hasattr(pd.Categorical(["a"]), "shm")


@pytest.mark.parametrize("kind", list(OBJECTS))
def test_nbytes_is_the_data_part_of_the_object(kind):
    """nbytes counts the page-padded buffers: the object adds only its header pages to it."""
    x = OBJECTS[kind]
    nbytes = x.shm.nbytes
    obj = x.shm.export()
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        assert nbytes % page == 0 and 0 < obj.size - nbytes <= 4 * page
    finally:
        shmalloc.unlink(obj)


def test_nbytes_of_numeric_columns():
    """Numeric columns count their bytes, rounded up to whole pages each."""
    page = os.sysconf("SC_PAGE_SIZE")
    df = pd.DataFrame({"a": np.zeros(page, np.float64), "b": np.zeros(page + 1, np.int8)[1:]})
    assert df.shm.nbytes == 8 * page + page


def test_import_registers_without_warnings():
    """Importing shmalloc (twice, even with a reload) registers .shm and warns about nothing."""
    code = (
        "import importlib, pandas as pd, shmalloc\n"
        "importlib.reload(shmalloc._accessor)\n"
        "assert pd.DataFrame.shm is pd.Series.shm is pd.Index.shm\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


def test_docstring_examples():
    """The examples in the accessor's docstrings run."""
    assert doctest.testmod(_accessor).failed == 0


def export_in_child(n: int) -> shmalloc.ShmObj:
    """Runs in a spawned interpreter: a fresh import must register the accessor."""
    return pd.DataFrame({"x": np.arange(n), "s": [str(i % 10) for i in range(n)]}).shm.export()


def test_spawned_child_exports_with_the_accessor():
    """A spawned interpreter exports through .shm; the parent allocates an equal frame."""
    with mp.get_context("spawn").Pool(1) as pool:
        obj = pool.apply(export_in_child, (1000,))
    tm.assert_frame_equal(
        shmalloc.allocate_from_shm(obj), pd.DataFrame({"x": np.arange(1000), "s": [str(i % 10) for i in range(1000)]})
    )
