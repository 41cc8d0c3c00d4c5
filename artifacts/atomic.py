"""Atomic file writes: temp name in the same directory + fsync + rename + fsync of the directory.

A reader (or a resumed stage) therefore sees either the old file, no file, or the whole new file,
never a half-written one, even after a crash or power loss. Temp names are recognisable
(:func:`is_temp_name`) so listings can skip the debris a crash leaves behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "is_temp_name",
    "sha256_file",
]

# ".<final name>.<pid>.<8 hex>.tmp<suffix>": the pid makes names unique across processes, the
# random token across threads (and repeated attempts) of one process.
_TEMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp[^/]*$")


def _temp_name(final: Path, suffix: str) -> str:
    return f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`atomic_path` (leftovers of an interrupted write)."""
    return _TEMP_RE.match(name) is not None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename or unlink inside it survives a crash (no-op where
    directories cannot be opened, e.g. Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except (PermissionError, IsADirectoryError):  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``final``; on clean exit fsync it, rename it onto ``final`` and
    fsync the directory. On an exception the temp file is removed and the exception re-raised,
    and ``final`` is untouched.

    ``suffix`` is appended to the temp name (e.g. ``".h5"`` for tools that look at extensions).
    The block must create the file at the yielded path.
    """
    final = Path(final)
    if "/" in suffix or os.sep in suffix:
        raise ValueError(f"atomic_path suffix must not contain a path separator, got {suffix!r}")
    tmp = final.with_name(_temp_name(final, suffix))
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: the block did not create {tmp} (for {final})")
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline unless overridden by
    ``json_kwargs``) to ``path`` atomically."""
    kwargs = {"sort_keys": True, "indent": 2, **json_kwargs}
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents, read in ``bufsize`` blocks."""
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()
