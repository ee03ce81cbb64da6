"""Names of shared memory objects: generated, validated, recognised."""
from __future__ import annotations

import os
import re

#: Every name shmalloc generates starts with this, then the creating pid.
PREFIX = "/shmalloc_"
# "/shmalloc_" + pid (at most 7 digits) + "_" + 12 hex digits: at most 30 characters,
# within macOS's limit of 31.
_OURS = re.compile(r"^/shmalloc_(\d{1,7})_([0-9a-f]{12})$")
_MAX_PORTABLE = 254  # "/" plus up to 253 characters


def generate(pid: int | None = None) -> str:
    """Return a fresh, unpredictable name that carries the creating process id."""
    # os.urandom itself: secrets.token_hex reaches it through three Python layers, and a name is made per result.
    return f"{PREFIX}{os.getpid() if pid is None else pid}_{os.urandom(6).hex()}"


def validate(name: object) -> str:
    """Return ``name`` if it is a portable shared memory name, else raise.

    Raises
    ------
    TypeError
        If ``name`` is not a str.
    ValueError
        If it does not start with "/", is longer than 254 characters, or
        holds another "/" or a NUL character.
    """
    if not isinstance(name, str):
        raise TypeError(f"a shared memory name must be a str, not {type(name).__name__}")
    if not name.startswith("/") or len(name) < 2:
        raise ValueError(f"a shared memory name must be '/' followed by 1 to 253 characters: {name!r}")
    if len(name) > _MAX_PORTABLE:
        raise ValueError(f"a shared memory name may hold at most 253 characters after '/': got {len(name) - 1}")
    if "/" in name[1:] or "\0" in name:
        raise ValueError(f"a shared memory name may not contain '/' or NUL after its first character: {name!r}")
    if name in ("/.", "/.."):
        raise ValueError(f"{name!r} is not a valid shared memory name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a shared memory name must be encodable as UTF-8: {name!r}") from exc
    return name


def creator_pid(name: str) -> int | None:
    """Return the pid of the process that generated ``name``, or None if it is not one of ours."""
    match = _OURS.match(name if name.startswith("/") else "/" + name)
    return int(match.group(1)) if match else None
