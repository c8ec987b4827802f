"""Atomic writes: build a file or a folder beside its destination, then rename it into place.

Readers see no destination or a complete one, never a half-written one, and a failure leaves the old
destination untouched. The one place detoxflow renames a temporary over a destination. With ``fsync=True`` the
files and the folder reach the disk before the rename and the rename itself after it, so a power cut leaves the
old destination or the complete new one, not an empty file under the new name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

IfExists = Literal["replace", "fail"]


def publish(src: Path, dest: Path, *, if_exists: IfExists = "replace") -> None:
    """Rename ``src`` onto ``dest`` (same filesystem).

    ``if_exists``: ``replace`` removes an existing folder ``dest`` first (a file is replaced by the rename
    itself); ``fail`` raises ``OSError`` when ``dest`` is a non-empty folder (a caller that can tell a complete
    ``dest`` published by another writer decides what that means)."""
    if if_exists == "replace" and dest.is_dir() and src.is_dir():
        shutil.rmtree(dest)
    os.replace(src, dest)


def fsync_path(path: Path) -> None:
    """Flush one file or folder (its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (deepest first), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` with plain ``os.write`` calls (so a full disk raises ``OSError`` with
    ``errno.ENOSPC``, not a library's own error), optionally flushed to the disk. Not atomic by itself: use it
    inside :func:`atomic_dir` or :func:`atomic_file`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(dest: Path, *, if_exists: IfExists = "replace", fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on a clean exit it becomes ``dest``, on an error it
    is removed (``dest`` unchanged). ``fsync``: flush the files and the folder before the rename, and the
    parent folder (the rename) after it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        publish(tmp, dest, if_exists=if_exists)
        if fsync:
            fsync_path(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(dest: Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``dest`` (ending in ``suffix``); on a clean exit it replaces
    ``dest``, on an error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    with atomic_file(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
