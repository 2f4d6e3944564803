"""
Mirrors the origin contradicted: :class:`StaleMirrors`.

A mirror whose tag answer differs from the origin's is stale for that
repository (:meth:`regmirror.pool.UpstreamPool.resolve_tag`), and its tag
answers are not used while the origin cannot be reached.  With a folder
(``<cache>/stale/<namespace>/``), what one process learns holds for every
process using the cache folder (``workers``, the ``prefetch`` command): a
small file per mirror and repository, written when the origin contradicts
the mirror, removed when they agree again, read only when the origin cannot
be reached and for the status page (the warm path never reads it).  At most
:data:`MAX_STALE` per namespace, the oldest given up first (clients choose
the repositories asked about); ``twistd``'s housekeeping removes those
older than the namespace's ``max_stale`` (:meth:`StaleMirrors.expire`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from attrs import define, field, frozen
from twisted.logger import Logger

from regmirror import _records
from regmirror.reference import Digest, parse_digest

#: Stale answers remembered per namespace; the oldest go first beyond it.
MAX_STALE = 10_000
#: A record is read up to this size (a repository name, a tag, two digests).
MAX_RECORD = 4096


@frozen
class StaleAnswer:
    """A mirror's tag answer that differed from the origin's, and when
    (the reactor's seconds)."""

    tag: str
    theirs: Digest
    origin: Digest
    noted: float = 0.0


Key = tuple[str, str]


@define(eq=False)
class StaleMirrors:
    """
    ``(mirror, repository)`` → the mirror's last answer the origin
    contradicted, like a dict: in this process's memory, or, with a
    *folder*, in a file per key there, shared by every process using it.
    When the folder cannot be used, this process keeps them alone.
    """

    folder: str | None = None
    _memory: dict[Key, StaleAnswer] = field(factory=dict)
    log = Logger()

    def __contains__(self, key: Key) -> bool:
        if self.folder is not None:
            try:
                return os.path.exists(self._path(key))
            except OSError as e:
                self._give_up(e)
        return key in self._memory

    def __setitem__(self, key: Key, answer: StaleAnswer) -> None:
        if self.folder is not None:
            try:
                self._write(key, answer)
                return
            except OSError as e:
                self._give_up(e)
        self._memory.pop(key, None)
        while len(self._memory) >= MAX_STALE:
            del self._memory[next(iter(self._memory))]
        self._memory[key] = answer

    def pop(self, key: Key, default: None = None) -> StaleAnswer | None:
        """Forget *key* (the mirror agrees again); its answer, if stale."""
        if self.folder is not None:
            path = self._path(key)
            try:
                found = _read(path)
                _records.unlink(path)
            except FileNotFoundError:
                return default
            except OSError as e:
                self._give_up(e)
            else:
                return default if found is None else found[1]
        return self._memory.pop(key, default)

    def items(self) -> list[tuple[Key, StaleAnswer]]:
        """Every stale answer, the oldest first: the machine's, with a folder."""
        if self.folder is not None:
            try:
                found = [record for _, record in self._records()]
            except OSError as e:
                self._give_up(e)
            else:
                return sorted(found, key=lambda item: item[1].noted)
        return list(self._memory.items())

    def __len__(self) -> int:
        return len(self.items())

    def expire(self, older_than: float) -> int:
        """Remove the records noted before *older_than*; how many.
        Blocking (a walk of the folder): a thread's job."""
        if self.folder is None:
            # A copy first: the reactor's thread may change the dict meanwhile.
            old = [k for k, a in list(self._memory.items()) if a.noted < older_than]
            for key in old:
                self._memory.pop(key, None)
            return len(old)
        removed = 0
        for path, (_, answer) in list(self._records()):
            if answer.noted < older_than:
                removed += _records.unlink(path)
        return removed

    def _path(self, key: Key) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, _records.name(key[0], key[1]))

    def _write(self, key: Key, answer: StaleAnswer) -> None:
        assert self.folder is not None
        document = {
            "mirror": key[0],
            "repository": key[1],
            "tag": answer.tag,
            "theirs": str(answer.theirs),
            "origin": str(answer.origin),
            "noted": answer.noted,
        }
        _records.write(self.folder, self._path(key), document, MAX_STALE)

    def _records(self) -> Iterator[tuple[str, tuple[Key, StaleAnswer]]]:
        assert self.folder is not None
        for path in _records.paths(self.folder):
            try:
                record = _read(path)
            except OSError:
                continue
            if record is not None:
                yield path, record

    def _give_up(self, error: OSError) -> None:
        self.log.error(
            "cannot use {path} ({why}): this process keeps stale mirrors alone",
            path=self.folder,
            why=error.strerror,
        )
        self.folder = None


def _read(path: str) -> tuple[Key, StaleAnswer] | None:
    """A record, or ``None`` for one that is unreadable (not ours).

    :raises FileNotFoundError: when there is none.
    """
    document = _records.read(path, MAX_RECORD)
    try:
        return (str(document["mirror"]), str(document["repository"])), StaleAnswer(
            str(document["tag"]),
            parse_digest(str(document["theirs"])),
            parse_digest(str(document["origin"])),
            float(document["noted"]),
        )
    except Exception:
        return None
