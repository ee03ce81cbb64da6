"""The segment format: how a segment's bytes are laid out, packed and checked (no system calls).

A segment holds a header, a pickled *recipe* (what the codec needs to rebuild
the object, and where each buffer lies) and the buffers, each starting on a
page boundary so that each zero-copy array can own, and unmap, its own part:

    [header | recipe | pad] [buffer 0 | pad] [buffer 1 | pad] ...

Every byte up to the object's size is written (padding included), so no page
of the object is a hole that a full /dev/shm could refuse to fault in later.
"""
from __future__ import annotations

import copyreg
import io
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import CorruptHandleError

if TYPE_CHECKING:
    from ._handle import ShmObj

MAGIC = b"SHMALLOC"
# 2: the buffer table holds plain tuples, so that reading a recipe never imports a module of
# shmalloc by name (format 1 pickled a class of the module that held it then).
VERSION = 2
TOKEN_BYTES = 16
HEADER = struct.Struct("<8sII16sQQQ")  # magic, version, reserved, token, recipe, data offset, size
HEADER_SIZE = 64
MAX_RECIPE = 1 << 30
#: Buffers start on page boundaries, so that each zero-copy array can own (and unmap) its own part.
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: The keys every recipe has.
RECIPE_KEYS = frozenset({"type", "length", "attributes", "buffers"})


def round_up_to_page(n: int) -> int:
    """``n`` rounded up to a whole number of pages."""
    return -(-n // PAGE) * PAGE


class BufferLayout(NamedTuple):
    """Where one buffer lies in the data part of a segment, and how to view it (a tuple: several are made
    per round trip, and a frozen dataclass takes four times as long to make)."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def buffer_spans(layouts: Sequence[BufferLayout]) -> list[tuple[int, int]]:
    """The (offset in the data part, length) of each non-empty buffer's pages, in offset order."""
    return sorted((layout.offset, round_up_to_page(layout.nbytes)) for layout in layouts if layout.nbytes)


def _layout(buf: np.ndarray, offset: int) -> BufferLayout:
    flags = buf.flags
    return BufferLayout(offset, buf.dtype, buf.shape, bool(flags.f_contiguous and not flags.c_contiguous))


def layout_buffers(buffers: Sequence[np.ndarray]) -> tuple[list[BufferLayout], int]:
    """Place buffers on page boundaries; return their layouts and the data part's size."""
    layouts, offset = [], 0
    for buf in buffers:
        layouts.append(_layout(buf, offset))
        offset += round_up_to_page(buf.nbytes)
    return layouts, offset


class Plan(NamedTuple):
    """A segment to write: its header block (header, recipe, padding), buffer layouts, data offset and size."""

    head: bytearray
    layouts: list[BufferLayout]
    data_offset: int
    size: int


def plan_segment(token: bytes, recipe: dict, buffers: Sequence[np.ndarray]) -> Plan:
    """Lay out a segment holding ``recipe`` (given its buffers' layouts) and ``buffers``."""
    layouts, data_size = layout_buffers(buffers)
    recipe_bytes = _recipe_bytes(recipe, layouts)
    data_offset = round_up_to_page(HEADER_SIZE + len(recipe_bytes))
    head = bytearray(data_offset)  # padding included: every byte of the segment is written
    _write_head(head, token, recipe_bytes, data_offset, data_offset + data_size)
    return Plan(head, layouts, data_offset, data_offset + data_size)


def plan_in_place(
    token: bytes, recipe: dict, buffers: Sequence[np.ndarray], offsets: Sequence[int], data_offset: int
) -> Plan | None:
    """Lay out a segment whose ``buffers`` already lie at ``offsets`` of its data part (page aligned, in
    any order, not sharing a page), which starts at ``data_offset``; None if the header and recipe do not
    fit before it. The head is only the header and recipe: the bytes up to the data part are not read."""
    layouts = [_layout(buf, offset) for buf, offset in zip(buffers, offsets, strict=True)]
    recipe_bytes = _recipe_bytes(recipe, layouts)
    if HEADER_SIZE + len(recipe_bytes) > data_offset:
        return None
    size = data_offset + max((layout.offset + round_up_to_page(layout.nbytes) for layout in layouts), default=0)
    head = bytearray(HEADER_SIZE + len(recipe_bytes))
    _write_head(head, token, recipe_bytes, data_offset, size)
    return Plan(head, layouts, data_offset, size)


def _recipe_bytes(recipe: dict, layouts: list[BufferLayout]) -> bytes:
    table = [(layout.offset, layout.dtype, layout.shape, layout.fortran) for layout in layouts]
    stream = io.BytesIO()
    pickler = pickle.Pickler(stream, protocol=5)
    pickler.dispatch_table = _dispatch_table()
    pickler.dump(dict(recipe, buffers=table))
    return stream.getvalue()


# copyreg's registry as it was when merged with ours, and the merged table.
_merged: tuple[dict, dict] | None = None


def _dispatch_table() -> dict:
    """copyreg's registry as it is now, with ours: merged again only when copyreg's has changed (comparing
    the two takes a third of the time of merging them)."""
    global _merged
    merged = _merged
    if merged is None or merged[0] != copyreg.dispatch_table:
        source = dict(copyreg.dispatch_table)
        merged = _merged = (source, source | _DTYPE_REDUCERS)
    return merged[1]


def _reduce_dtype(dtype: np.dtype) -> str | tuple[Any, ...]:
    # numpy reduces a dtype in Python and rebuilds it through __setstate__ (2.6 and 1.4 µs here); a
    # plain one (no fields, subarray or metadata) is np.dtype of its str, exactly: 0.3 µs to rebuild.
    # Not a void dtype of another scalar type either (np.record: a recarray's), which str does not name.
    if dtype.names is None and dtype.subdtype is None and dtype.metadata is None and dtype.type in _PLAIN_TYPES:
        return np.dtype, (dtype.str,)
    return dtype.__reduce__()


# numpy's own dtype classes (the legacy ones, whose str names them exactly), each its own type to pickle.
_DTYPE_REDUCERS: dict[type, Callable[[Any], Any]] = {type(np.dtype(code)): _reduce_dtype for code in np.typecodes["All"]}
_PLAIN_TYPES = frozenset(np.dtype(code).type for code in np.typecodes["All"])


def _write_head(head: bytearray, token: bytes, recipe_bytes: bytes, data_offset: int, size: int) -> None:
    HEADER.pack_into(head, 0, MAGIC, VERSION, 0, token, len(recipe_bytes), data_offset, size)
    head[HEADER_SIZE : HEADER_SIZE + len(recipe_bytes)] = recipe_bytes


def check_header(name: str, header: bytes | bytearray, token: bytes, size: int) -> tuple[int, int]:
    """Check a segment's header against the handle's ``token`` and ``size``; return the recipe's length
    and the data offset."""
    magic, version, _, stored_token, recipe_len, data_offset, stored_size = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptHandleError(f"{name}: not a shmalloc segment (bad magic {magic!r})")
    if version != VERSION:
        raise CorruptHandleError(f"{name}: segment format {version}, this shmalloc reads {VERSION}")
    if stored_token != token:
        raise CorruptHandleError(f"{name}: the segment was replaced since the handle was made (token differs)")
    if (
        stored_size != size
        or recipe_len > MAX_RECIPE
        or data_offset % PAGE
        or data_offset < HEADER_SIZE + recipe_len
        or data_offset > stored_size
    ):
        raise CorruptHandleError(f"{name}: damaged segment header")
    return recipe_len, data_offset


# Recipes read lately, by their bytes and data size, checked: the results of a call mostly share one
# (a Pool's 200 frames of one shape), and unpickling and checking it again took a tenth of the parent's
# time per result. Only small ones, a few: at most _RECIPES_KEPT * PAGE bytes.
_RECIPES: dict[tuple[bytes, int], tuple[dict, list[BufferLayout]]] = {}
_RECIPES_KEPT = 64


def load_recipe(name: str, stored: bytes | bytearray | memoryview, data_size: int) -> tuple[dict, list[BufferLayout]]:
    """Unpickle and check a recipe whose buffers fill ``data_size`` bytes; return it and its buffer layouts.

    Both may be those of an earlier call with the same bytes: read them, never change them. (Codecs
    only read a recipe, and what they rebuild holds no part of it but its dtypes: a recipe is kept only
    if those cannot change, see :func:`_shareable`.)
    """
    key = (bytes(stored), data_size) if len(stored) <= PAGE else None
    known = _RECIPES.get(key) if key is not None else None
    if known is not None:
        return known
    try:
        recipe = pickle.loads(stored)
    except Exception as exc:
        raise CorruptHandleError(f"{name}: damaged recipe ({type(exc).__name__})") from exc
    if not isinstance(recipe, dict) or not RECIPE_KEYS <= recipe.keys():
        raise CorruptHandleError(f"{name}: damaged recipe")
    checked = recipe, _checked_layouts(name, recipe.get("buffers"), data_size)
    if key is not None and _shareable(recipe, checked[1]):
        if len(_RECIPES) >= _RECIPES_KEPT:
            _RECIPES.clear()
        _RECIPES[key] = checked
    return checked


def _shareable(recipe: dict, layouts: list[BufferLayout]) -> bool:
    """Whether results may share what the recipe holds: the arrays rebuilt keep its dtypes as they are,
    and a structured dtype's names, or a dtype's metadata, can be changed in place."""
    dtypes = [layout.dtype for layout in layouts]
    attributes = recipe["attributes"]
    if isinstance(attributes, dict):
        dtypes += [value for value in attributes.values() if isinstance(value, np.dtype)]
    return all(dtype.names is None and dtype.metadata is None for dtype in dtypes)


def _checked_layouts(name: str, table: object, data_size: int) -> list[BufferLayout]:
    """The buffer table's entries ``(offset, dtype, shape, fortran)`` as layouts, once each is checked."""
    if not isinstance(table, list) or not all(type(entry) is tuple and len(entry) == 4 for entry in table):
        raise CorruptHandleError(f"{name}: damaged buffer table")
    layouts = [BufferLayout(*entry) for entry in table]
    end = 0
    # In offset order: a Pool's worker may leave its buffers where they were computed, in any order.
    for layout in sorted(layouts, key=lambda layout: layout.offset if type(layout.offset) is int else -1):
        if not (
            type(layout.offset) is int
            and isinstance(layout.dtype, np.dtype)
            and not layout.dtype.hasobject
            and isinstance(layout.shape, tuple)
            and all(type(n) is int and n >= 0 for n in layout.shape)
            and type(layout.fortran) is bool
            and _numpy_can_make(layout)
        ):
            raise CorruptHandleError(f"{name}: damaged buffer table entry")
        if layout.offset % PAGE or layout.offset < end or layout.offset + layout.nbytes > data_size:
            raise CorruptHandleError(f"{name}: buffer table does not fit the segment")
        end = max(end, layout.offset + round_up_to_page(layout.nbytes))
    if end != data_size:
        raise CorruptHandleError(f"{name}: buffer table does not cover the segment")
    return layouts


_INTP_MAX = int(np.iinfo(np.intp).max)


def _numpy_can_make(layout: BufferLayout) -> bool:
    """Whether numpy accepts the layout's shape: at most 64 dimensions, and a size that fits in
    ``intp`` counting the non-zero dimensions (numpy checks those even for an empty array)."""
    extent = layout.dtype.itemsize
    for n in layout.shape:
        extent *= n or 1
    return len(layout.shape) <= 64 and extent <= _INTP_MAX


def check_handle_matches(obj: "ShmObj", recipe: dict[str, Any]) -> None:
    """Refuse a handle whose fields differ from the segment's own copy of them."""
    for field in ("type", "length"):
        if type(getattr(obj, field)) is not type(recipe[field]) or getattr(obj, field) != recipe[field]:
            raise CorruptHandleError(f"{obj.name}: the handle's {field} ({getattr(obj, field)!r}) does not match the segment")
    if not _same(obj.attributes, recipe["attributes"]):
        raise CorruptHandleError(f"{obj.name}: the handle's attributes do not match the segment")


def _same(a: Any, b: Any) -> bool:
    # Equal item by item, of the same types: the common case, and cheap. Else pickled bytes, which
    # compare NaN labels and nested arrays as equal where == would not. One round trip first: how
    # pickle shares equal strings depends on an object's history.
    try:
        if _equal_same_types(a, b):
            return True
    except Exception:
        pass
    try:
        return _canonical(a) == _canonical(b)
    except Exception:
        return False


def _equal_same_types(a: Any, b: Any) -> bool:
    # == alone would accept a value of another type that compares equal: np.dtype("f8") == None,
    # 0 == False, 3 == 3.0. Each item must be of the same type as its counterpart.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and _pairs_equal(a.values(), [b[key] for key in a])
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and _pairs_equal(a, b)
    return bool(a == b)


# Compared here, not in a call each: most items of attributes are of these types (a call per item
# was a tenth of an array's round trip).
_PLAIN_VALUES = frozenset({str, int, float, bool, bytes, type(None)})


def _pairs_equal(xs: Iterable[Any], ys: Iterable[Any]) -> bool:
    for x, y in zip(xs, ys, strict=True):
        if type(x) is not type(y):
            return False
        if type(x) in _PLAIN_VALUES or isinstance(x, np.dtype):
            if x != y:
                return False
        elif not _equal_same_types(x, y):
            return False
    return True


def _canonical(x: Any) -> bytes:
    return pickle.dumps(pickle.loads(pickle.dumps(x, protocol=5)), protocol=5)
