"""
Small JSON records in a folder, shared by the processes using the cache
folder (:mod:`regmirror.stale`, :mod:`regmirror.failures`): a file per
key, named by a hash of it, replaced whole (a temporary file renamed, so
a reader never sees half of one), at most so many per folder (the oldest
given up first: clients choose the keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any


def name(*parts: str) -> str:
    """The file name of the record about *parts*."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]


def write(folder: str, path: str, document: Any, most: int) -> None:
    """
    Replace the record *path* in *folder* by *document* (JSON).  A new
    record first makes room: with *most* records there, the oldest go, down
    to nine tenths of it (one listing per so many new records, not per
    record).
    """
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        _trim(folder, most)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(document).encode("utf-8"))
        os.replace(temporary, path)
    except BaseException:
        unlink(temporary)
        raise


def read(path: str, limit: int) -> Any:
    """
    The record *path*'s document, read up to *limit* bytes; ``None`` when
    it is no JSON (not ours, or cut).

    :raises FileNotFoundError: when there is none.
    """
    with open(path, "rb") as f:
        data = f.read(limit)
    try:
        return json.loads(data)
    except ValueError:
        return None


def paths(folder: str) -> list[str]:
    """The records of *folder* (none when it does not exist)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [os.path.join(folder, n) for n in names if not n.startswith(".")]


def unlink(path: str) -> int:
    """Remove *path*; 1 if it was there, else 0."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


def _trim(folder: str, most: int) -> None:
    found = paths(folder)
    if len(found) < most:
        return
    dated = []
    for path in found:
        try:
            dated.append((os.stat(path).st_mtime, path))
        except FileNotFoundError:
            continue
    dated.sort()
    for _, path in dated[: max(0, len(dated) - most * 9 // 10)]:
        unlink(path)
