"""
Failed checks at the origin: :class:`FailedChecks`.

When the origin gives no answer about a tag, it is not asked about that
tag again for the namespace's ``origin_retry``
(:meth:`regmirror.tags.Tags.resolve`).  With a folder
(``<cache>/failures/<namespace>/``), what one process learns holds for
every process using the cache folder (``workers``, the ``prefetch``
command): a small file per tag, written when a check fails, removed when
the origin answers about the tag or once the window is over, read only
when a process would ask the origin (the warm path never reads it), so
that a silent origin costs one wait per window on the machine, not one
per process.  At most :data:`MAX_FAILURES` per namespace, the oldest
given up first (clients choose the tags, and a failing origin fails for
each of them).  Files are replaced whole (a temporary file renamed), so a
reader never sees half of one.
"""

from __future__ import annotations

import os

from attrs import define, field, frozen
from twisted.logger import Logger

from regmirror import _records, errors

#: How many tags' failed checks are remembered per namespace (in memory,
#: and in the folder).
MAX_FAILURES = 10_000
#: A record is read up to this size (a repository name, a tag, a message).
MAX_RECORD = 8192

Key = tuple[str, str, str]


@frozen
class FailedCheck:
    """The origin gave no answer about a tag at *at*; it is not asked
    again before *until* (the reactor's seconds, which every process of a
    machine reads alike); *error* is what that check ended with."""

    until: float
    error: Exception = field(eq=False)
    at: float


@define(eq=False)
class FailedChecks:
    """
    ``(namespace, repository, tag)`` → the origin's last failed check about
    it: in this process's memory, and, with a *folder*, in a file per tag
    under it, shared by every process using it.  When the folder cannot be
    used, this process keeps them alone.
    """

    folder: str | None = None
    _memory: dict[Key, FailedCheck] = field(factory=dict)
    log = Logger()

    def known(self, key: Key) -> FailedCheck | None:
        """The failed check this process knows of (no file read)."""
        return self._memory.get(key)

    def get(self, key: Key) -> FailedCheck | None:
        """The failed check this process or, with a folder, any other
        noted about *key*."""
        found = self._memory.get(key)
        if found is not None or self.folder is None:
            return found
        try:
            found = _read(self._path(key), key)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._give_up(e)
            return None
        if found is not None:
            self._keep(key, found)
        return found

    def note(self, key: Key, check: FailedCheck) -> None:
        """Remember *check* about *key*, for every process with a folder."""
        self._keep(key, check)
        if self.folder is None:
            return
        try:
            self._write(key, check)
        except OSError as e:
            self._give_up(e)

    def forget(self, key: Key) -> None:
        """The window about *key* is over (the origin answered, or it ran
        out): for every process."""
        self._memory.pop(key, None)
        if self.folder is None:
            return
        try:
            _records.unlink(self._path(key))
        except OSError as e:
            self._give_up(e)

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, key: Key) -> bool:
        return key in self._memory

    def _keep(self, key: Key, check: FailedCheck) -> None:
        self._memory.pop(key, None)
        while len(self._memory) >= MAX_FAILURES:
            del self._memory[next(iter(self._memory))]
        self._memory[key] = check

    def _folder(self, namespace: str) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, namespace)

    def _path(self, key: Key) -> str:
        return os.path.join(self._folder(key[0]), _records.name(key[1], key[2]))

    def _write(self, key: Key, check: FailedCheck) -> None:
        error = check.error
        document = {
            "repository": key[1],
            "tag": key[2],
            "until": check.until,
            "at": check.at,
            "error": type(error).__name__
            if isinstance(error, errors.RegistryError)
            else None,
            "message": getattr(error, "message", str(error)),
            "headers": getattr(error, "headers", {}),
        }
        _records.write(self._folder(key[0]), self._path(key), document, MAX_FAILURES)

    def _give_up(self, error: OSError) -> None:
        self.log.error(
            "cannot use {path} ({why}): this process keeps failed origin checks alone",
            path=self.folder,
            why=error.strerror,
        )
        self.folder = None


def _read(path: str, key: Key) -> FailedCheck | None:
    """A record about *key*, or ``None`` for one that is unreadable (not
    ours) or about another tag (a clash of names).

    :raises FileNotFoundError: when there is none.
    """
    document = _records.read(path, MAX_RECORD)
    try:
        if (document["repository"], document["tag"]) != (key[1], key[2]):
            return None
        message = str(document["message"])
        kind = getattr(errors, str(document["error"]), None)
        error: Exception
        if isinstance(kind, type) and issubclass(kind, errors.RegistryError):
            headers = {str(k): str(v) for k, v in dict(document["headers"]).items()}
            error = kind(message, headers)
        else:
            error = Exception(message)
        return FailedCheck(float(document["until"]), error, float(document["at"]))
    except Exception:
        return None
