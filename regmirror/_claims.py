"""
Claims that the processes of one machine share: :class:`Claims`.

A claim is a byte of one file under the cache folder, locked with a POSIX
record lock (``fcntl.lockf``) without waiting: the process that gets it
does the work, the others skip it.  The kernel drops a process's locks
when it ends, so a crashed worker leaves nothing claimed.  Keys share the
file's :data:`SLOTS` bytes by hash: two keys on one byte only make one of
them skip this time.

Record locks belong to the process, so one process never conflicts with
itself (its own single flight keeps it to one at a time), and the file
stays open for the process's life: closing any descriptor of it would
drop every lock the process holds on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from twisted.logger import Logger

#: Bytes of the claims file: keys beyond share them.
SLOTS = 65_536

log = Logger()


class Claims:
    """Claims on keys (strings) through the file *path*; without a usable
    file, every claim is granted (the process works alone)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None
        self._failed = False

    def claim(self, key: str) -> bool:
        """Whether this process now holds *key* (no other process of the
        machine does); hold it until :meth:`release`."""
        fd = self._open()
        if fd is None:
            return True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _slot(key))
        except OSError:
            return False
        return True

    def release(self, key: str) -> None:
        """Give *key* up (after :meth:`claim` granted it)."""
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _slot(key))

    def _open(self) -> int | None:
        if self._fd is None and not self._failed:
            try:
                os.makedirs(os.path.dirname(self._path), exist_ok=True)
                self._fd = os.open(
                    self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as error:
                self._failed = True
                log.warn(
                    "claims in {path} cannot be shared with other processes: {why}",
                    path=self._path,
                    why=error.strerror or str(error),
                )
        return self._fd


def _slot(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % SLOTS
