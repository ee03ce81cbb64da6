"""The codecs package: a registry that no codec cycles through, one layout rule, and the routing it serves."""
from __future__ import annotations

import ast
import datetime
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shmalloc
from shmalloc import codecs
from shmalloc.codecs import _registry
from shmalloc.codecs import ndarray as ndarray_codec
from shmalloc.codecs import pandas as pandas_codec
from shmalloc.codecs import pickled as pickled_codec

CODECS_DIR = Path(codecs.__file__).parent


def _imports_within_codecs(path: Path) -> set[str]:
    """The modules of shmalloc.codecs that a file imports, at any depth (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shmalloc.codecs."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("shmalloc.codecs."))
    return found


def test_codec_modules_import_no_cycle():
    """Among the codec modules and the registry, the import graph has no cycle and the registry imports no codec."""
    graph = {p.stem: _imports_within_codecs(p) for p in CODECS_DIR.glob("*.py") if p.stem != "__init__"}
    assert _registry.__name__.rsplit(".", 1)[-1] in graph
    assert graph["_registry"] == set()
    assert set(graph) >= {"ndarray", "pandas", "pickled"}

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        for imported in graph.get(module, ()):
            visit(imported, (*path, module))

    for module in graph:
        visit(module, ())


def test_registry_order_is_ndarray_pandas_pickled():
    """The package registers the codecs in the order they are tried, pickled (which accepts everything) last."""
    assert _registry.CODECS == [ndarray_codec, pandas_codec, pickled_codec]
    assert _registry.codec_for(np.arange(3)) is ndarray_codec
    assert _registry.codec_for(pd.Series([1, 2])) is pandas_codec
    assert _registry.codec_for({"a": 1}) is pickled_codec
    assert codecs.encode is _registry.encode and codecs.decode is _registry.decode


def test_a_codec_added_to_the_list_after_register_decodes_and_the_first_of_a_name_wins(monkeypatch):
    """decode finds a codec put into CODECS directly (not through register), and of two codecs of one
    name, the first in the list, as encoding would choose."""

    def codec(module_name: str, tag: str) -> types.ModuleType:
        module = types.ModuleType(module_name)
        module.accepts = lambda obj: isinstance(obj, str)  # type: ignore[attr-defined]
        module.encode = lambda obj, buffers: ("str", 1, {"codec": "tagged", "value": obj})  # type: ignore[attr-defined]
        module.decode = lambda attributes, buffers: (tag, attributes["value"])  # type: ignore[attr-defined]
        return module

    monkeypatch.setattr(_registry, "CODECS", list(_registry.CODECS))  # restored after the test
    _registry.CODECS.insert(0, codec("tests.tagged", "first"))
    assert _registry.decode(_registry.encode("x").attributes, []) == ("first", "x")
    _registry.register(codec("a.tagged", "first"), codec("b.tagged", "second"), ndarray_codec, pandas_codec, pickled_codec)
    assert _registry.decode({"codec": "tagged", "value": "y"}, []) == ("first", "y")


def test_any_codec_module_imported_first_works():
    """Importing a codec module first, in a fresh interpreter, loads the registry filled and encodes through it."""
    for module in ("pickled", "pandas", "ndarray", "_registry"):
        script = (
            f"import shmalloc.codecs.{module}\n"
            "from shmalloc.codecs import _registry\n"
            "import numpy as np, pandas as pd\n"
            "obj = {'s': pd.Series(pd.date_range('2020', periods=300)), 'a': np.arange(2000.0)}\n"
            "e = _registry.encode(obj)\n"
            "back = _registry.decode(e.attributes, e.buffers)\n"
            "assert back['s'].equals(obj['s']) and (back['a'] == obj['a']).all()\n"
            "print([c.__name__.rsplit('.', 1)[-1] for c in _registry.CODECS])\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "['ndarray', 'pandas', 'pickled']", module


_LAYOUTS = {
    "1-D": np.arange(12.0),
    "C": np.arange(12.0).reshape(3, 4),
    "F": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "one row": np.arange(4.0).reshape(1, 4),
    "one column, F": np.asfortranarray(np.arange(4.0).reshape(4, 1)),
    "empty": np.empty((0, 3)),
    "0-d": np.array(1.5),
    "3-D F": np.asfortranarray(np.arange(24.0).reshape(2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(_LAYOUTS))
def test_is_fortran_on_contiguous_arrays_is_f_and_not_c(name):
    """On contiguous arrays (all the pickled codec sees) the one rule is 'Fortran- and not C-contiguous'."""
    x = _LAYOUTS[name]
    assert ndarray_codec.is_fortran(x) == bool(x.flags.f_contiguous and not x.flags.c_contiguous)


def test_is_fortran_on_strided_arrays_follows_the_strides():
    """A strided slice of a Fortran array counts as Fortran (the ndarray codec keeps its layout), of a C array as C."""
    base = np.arange(200.0).reshape(10, 20)
    assert not ndarray_codec.is_fortran(base[::2, ::3])
    assert ndarray_codec.is_fortran(np.asfortranarray(base)[::2, ::3])
    assert ndarray_codec.is_fortran(base.T[1:, 1:])
    assert not ndarray_codec.is_fortran(base[:, ::-2])


@pytest.mark.parametrize("copy", [True, False])
def test_strided_fortran_slice_round_trips_in_fortran_order(copy):
    """copy2shm of a strided Fortran slice rebuilds an equal, Fortran-ordered array."""
    x = np.asfortranarray(np.arange(600.0).reshape(20, 30))[::2, 1::3]
    back = shmalloc.allocate_from_shm(shmalloc.copy2shm(x), copy=copy)
    np.testing.assert_array_equal(back, x)
    assert back.flags.f_contiguous and not back.flags.c_contiguous


def test_pickled_routes_pandas_and_datetime_parts_out_of_band():
    """Inside a container, a datetime frame, a strided array and a datetime array become out-of-band buffers of their codecs."""
    stamps = pd.date_range("2020-01-01", periods=5000, freq="s")
    obj = {
        "frame": pd.DataFrame({"t": stamps, "x": np.arange(5000.0)}),
        "strided": np.arange(20000.0)[::2],
        "dates": np.array([datetime.datetime(2020, 1, 1)] * 3000, dtype="M8[us]"),
        "small": [1, 2, 3],
    }
    encoded = codecs.encode(obj)
    assert encoded.attributes["codec"] == "pickled"
    # frame: t and x (80 kB, 40 kB) as buffers; strided (80 kB) and dates (24 kB) as one buffer each
    assert sorted(b.nbytes for b in encoded.buffers) == sorted([40000, 40000, 80000, 24000])
    assert isinstance(encoded.attributes["stream"], bytes) and len(encoded.attributes["stream"]) < pickled_codec.STREAM_LIMIT
    back = codecs.decode(encoded.attributes, encoded.buffers)
    pd.testing.assert_frame_equal(back["frame"], obj["frame"])
    np.testing.assert_array_equal(back["strided"], obj["strided"])
    np.testing.assert_array_equal(back["dates"], obj["dates"])
    assert back["small"] == [1, 2, 3]



@pytest.mark.parametrize("copy", [True, False])
def test_void_dtypes_of_another_scalar_type_keep_it(copy, map_every_size):
    """A recarray without fields has a void dtype whose scalar type is np.record, which the dtype's str
    does not name: it comes back with np.record, as numpy's pickle gives it."""
    records = np.recarray((5000,), dtype="V8")
    records.view(np.uint8)[:] = 7
    got = shmalloc.allocate_from_shm(shmalloc.copy2shm(records), copy=copy)
    assert type(got) is np.recarray and got.dtype.type is np.record and type(got[0]) is np.record
    assert got.tobytes() == records.tobytes()
