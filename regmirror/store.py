"""
The content-addressed cache on local disk.

Layout under the cache directory::

    blobs/<alg>/<hex[:2]>/<hex>        bytes of a blob or a manifest
    manifests/<alg>/<hex[:2]>/<hex>    media type of a stored manifest
    tags/<namespace>/<repo>/_tags/<tag>  last digest seen for a tag
    vouches/<alg>/<hex[:2]>/<hex>      namespaces that vouch for it, one a line
    spool/                             downloads in progress
    size                               bytes of content, for every process

Bytes reach ``blobs/`` only through :meth:`Spool.commit`
(:mod:`regmirror._spool`), which checks the
digest, flushes to disk and renames: a crash leaves at worst a file in
``spool/``, which :meth:`Store.open` empties.  ``_tags`` cannot clash with a
repository path component, which never starts with ``_``.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from attrs import define, field, frozen
from twisted.logger import Logger

from regmirror._spool import (
    SIZE_SUFFIX,
    DigestMismatch,
    Spool,
    unlink_if_there,
    write_atomically,
)
from regmirror.errors import RegistryError
from regmirror.reference import Digest, load_json, parse_digest

#: A blob read whole as a JSON document (an image's config) is read up to
#: this size.
MAX_DOCUMENT_SIZE = 1024 * 1024

#: After a failed write, how long the cache is left alone before trying again.
DEGRADED_PERIOD = 60.0

#: Uses are recorded (as the file's mtime) at most this often per blob.
ACCESS_GRANULARITY = 3600.0

#: Eviction brings the cache back under this share of ``max_size``.
EVICT_TO = 0.9


@frozen
class Entry:
    """A blob or manifest on disk: its size and when it was last used."""

    digest: Digest
    size: int
    used: float


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


@frozen
class TagRecord:
    """A tag's digest, and when the origin confirmed it (seconds since 1970)."""

    digest: Digest
    confirmed: float


class _SharedCount:
    """
    A number in a file that every process using the cache folder reads and
    changes (``workers``, the CLI): the bytes of content, kept current as
    files come and go, so that each process sees what all of them stored.
    Changed under an exclusive ``flock``, read under a shared one.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _read(self) -> int:
        data = os.pread(self._fd, 8, 0)
        return int.from_bytes(data, "little", signed=True) if len(data) == 8 else 0

    def get(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            return self._read()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def change(self, delta: int | None = None, value: int | None = None) -> None:
        """Add *delta*, or set *value*."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            new = value if value is not None else self._read() + (delta or 0)
            os.pwrite(self._fd, max(new, 0).to_bytes(8, "little", signed=True), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class SpoolBusy(Exception):
    """Another process is downloading this digest into *path*."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class AlreadyCached(Exception):
    """The digest arrived in the cache meanwhile (from another process)."""


@define(eq=False)
class Store:
    """
    The local, content-addressed cache.  Every name and digest given to it
    has been validated by :mod:`regmirror.reference`.
    """

    root: str
    #: evict least recently used content beyond this many bytes
    max_size: int | None = None
    #: evict, too, while the file system has less free space than this
    min_free: int | None = None
    #: seconds since 1970 (injected for tests)
    now: Callable[[], float] = time.time
    #: until when writing is not even tried (after ENOSPC, a read-only disk…)
    degraded_until: float = 0.0
    #: why, for people (``No space left on device``)
    degraded_why: str = ""
    #: called at each write the cache refused (the metrics count them)
    on_degrade: Callable[[], object] | None = None
    _in_use: collections.Counter[Digest] = field(factory=collections.Counter)
    #: shared with the other processes once :meth:`open`; until then, ours
    _count: _SharedCount | None = None
    _size: int = 0
    log = Logger()

    @property
    def size(self) -> int:
        """Bytes of content on disk, kept current as files come and go (by
        every process that opened the cache folder)."""
        return self._size if self._count is None else self._count.get()

    @size.setter
    def size(self, value: int) -> None:
        if self._count is None:
            self._size = value
        else:
            self._count.change(value=value)

    def writable(self) -> bool:
        """Should the mirror try to write to the cache now?"""
        return self.now() >= self.degraded_until

    def degrade(self, error: OSError) -> None:
        """
        Writing failed (a full disk, a read-only file system): serve without
        caching for a while, then try again.  Logged once per period.
        """
        why = error.strerror or str(error)
        if self.writable():
            self.log.error(
                "cache {root} cannot be written ({why}): serving without caching "
                "for {period}s",
                root=self.root,
                why=why,
                period=int(DEGRADED_PERIOD),
            )
        self.degraded_until = self.now() + DEGRADED_PERIOD
        self.degraded_why = why
        if self.on_degrade is not None:
            self.on_degrade()

    def degraded(self) -> str | None:
        """Why the cache is not written now, for people, or ``None``."""
        if self.writable():
            return None
        left = max(1, round(self.degraded_until - self.now()))
        return (
            f"cache folder {self.root} cannot be written ({self.degraded_why}): "
            f"serving without caching for {left}s more"
        )

    @property
    def eviction_target(self) -> int | None:
        """
        The size eviction brings the cache back under (90% of ``max_size``),
        or ``None`` without a bound: also the largest blob the cache keeps,
        since one larger would be evicted with everything else at once.
        """
        return None if self.max_size is None else int(self.max_size * EVICT_TO)

    def room_for(self, size: int, coming: int = 0) -> bool:
        """
        Would *size* more bytes (beside *coming*, what the downloads under
        way still add) leave ``min_free`` free on the file system?
        """
        if self.min_free is None:
            return True
        try:
            free = self.free_space()
        except OSError:
            return False
        return free - coming - size >= self.min_free

    def open(self, clean: bool = True) -> None:
        """
        Create the layout, throw away downloads a crash left behind (unless
        *clean* is false: a worker process joining a running mirror, which
        takes the size the first process measured), and measure what is
        there.
        """
        for sub in ("blobs", "manifests", "tags", "spool", "vouches"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        spool = os.path.join(self.root, "spool")
        for leftover in os.listdir(spool) if clean else ():
            self.log.info("removing unfinished download {name}", name=leftover)
            os.unlink(os.path.join(spool, leftover))
        counted = os.path.exists(os.path.join(self.root, "size"))
        if self._count is None:
            self._count = _SharedCount(os.path.join(self.root, "size"))
        if clean or not counted:
            self.size = self.measure()

    def measure(self) -> int:
        """The bytes of content on disk now.  Blocking: a thread's job."""
        return sum(entry.size for entry in self.entries())

    # -- content ------------------------------------------------------------

    def _path(self, kind: str, digest: Digest) -> str:
        return os.path.join(
            self.root, kind, digest.algorithm, digest.hex[:2], digest.hex
        )

    def blob_path(self, digest: Digest) -> str:
        return self._path("blobs", digest)

    def blob_document(self, digest: Digest) -> Any:
        """
        A cached blob that is a JSON document (an image's config), read up
        to :data:`MAX_DOCUMENT_SIZE`: what :func:`load_json` makes of it.

        :raises OSError: when it cannot be read.
        """
        with open(self.blob_path(digest), "rb") as f:
            return load_json(f.read(MAX_DOCUMENT_SIZE))

    def blob_size(self, digest: Digest) -> int | None:
        """
        The size of a cached blob, or ``None`` when it is not cached.  Counts
        as a use for eviction (the file's mtime, updated at most hourly).
        """
        path = self.blob_path(digest)
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return None
        if status.st_mtime < self.now() - ACCESS_GRANULARITY:
            now = self.now()
            try:
                os.utime(path, (now, now))
            except OSError:
                pass  # read-only cache: eviction order just gets coarser
        return status.st_size

    def acquire(self, digest: Digest) -> None:
        """A reader has the blob open: it must not be evicted meanwhile."""
        self._in_use[digest] += 1

    def release(self, digest: Digest) -> None:
        self._in_use[digest] -= 1
        if self._in_use[digest] <= 0:
            del self._in_use[digest]

    def added(self, size: int) -> None:
        """Content of *size* bytes was published."""
        if self._count is None:
            self._size += size
        else:
            self._count.change(delta=size)

    def over_limit(self) -> bool:
        """Is it time to evict?"""
        if self.max_size is not None and self.size > self.max_size:
            return True
        return self.min_free is not None and self.free_space() < self.min_free

    def free_space(self) -> int:
        status = os.statvfs(self.root)
        return status.f_bavail * status.f_frsize

    def spool_path(self, digest: Digest) -> str:
        return os.path.join(self.root, "spool", f"{digest.algorithm}-{digest.hex}")

    def spool(self, digest: Digest) -> Spool:
        """
        Start writing the bytes of *digest* to its spool file, holding an
        exclusive lock on it: one download per digest across every process
        sharing the cache.

        :raises SpoolBusy: when another process holds it (tail its file).
        :raises AlreadyCached: when the blob is in the cache after all.
        """
        path = self.spool_path(digest)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(path) from None
        if os.path.exists(self.blob_path(digest)):
            os.close(fd)
            raise AlreadyCached()
        # Whatever a dead process left here is not ours to trust.
        os.ftruncate(fd, 0)
        unlink_if_there(path + SIZE_SUFFIX)
        # Unbuffered: appends go straight to the file, readers see them.
        return Spool(
            digest, path, self.blob_path(digest), os.fdopen(fd, "wb", buffering=0)
        )

    def spool_abandoned(self, path: str) -> bool:
        """Is nobody writing the spool at *path* any more?"""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def has_blob(self, digest: Digest) -> bool:
        """Is *digest* in the cache (a blob or a manifest)?  Not a use."""
        return os.path.exists(self.blob_path(digest))

    # -- who vouches for what (see regmirror.vouches) -------------------------

    def vouchers(self, digest: Digest) -> frozenset[str]:
        """The namespaces recorded as vouching for *digest*."""
        try:
            with open(self._path("vouches", digest), "rb") as f:
                text = f.read(64 * 1024).decode("utf-8", "replace")
        except FileNotFoundError:
            return frozenset()
        return frozenset(line for line in text.split("\n") if line)

    def vouch(self, digest: Digest, namespace: str) -> None:
        """
        Record that *namespace* vouches for *digest*: a line appended
        (``O_APPEND``: whole lines, whatever other processes append).
        """
        path = self._path("vouches", digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{namespace}\n".encode())
        finally:
            os.close(fd)

    def expire_vouches(self, older_than: float) -> int:
        """
        Remove the records of content that is not in the cache, written
        before *older_than* (a layer of an image whose manifest was pulled,
        never pulled itself).  Blocking: a thread's job.
        """
        removed = 0
        top = os.path.join(self.root, "vouches")
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                blob = os.path.join(self.root, "blobs", os.path.relpath(path, top))
                try:
                    if os.path.exists(blob) or os.stat(path).st_mtime >= older_than:
                        continue
                    os.unlink(path)
                except OSError:
                    continue
                removed += 1
        return removed

    def manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """The media type and bytes of a cached manifest, or ``None``."""
        try:
            with open(self._path("manifests", digest), encoding="ascii") as f:
                media_type = f.read().strip()
            with open(self.blob_path(digest), "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return media_type, body

    def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        """
        Store a manifest.

        :raises DigestMismatch: if *body* does not match *digest*; nothing is
            stored then.
        """
        actual = Digest.of(body, digest.algorithm)
        if actual != digest:
            raise DigestMismatch(digest, str(actual))
        existed = os.path.exists(self.blob_path(digest))
        if existed and os.path.exists(self._path("manifests", digest)):
            return  # stored already: no need to read it back
        # The bytes first: a media type file always has its manifest.
        write_atomically(self.blob_path(digest), body)
        write_atomically(self._path("manifests", digest), media_type.encode("ascii"))
        if not existed:
            self.added(len(body))

    # -- eviction, housekeeping ---------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every blob and manifest on disk."""
        blobs = os.path.join(self.root, "blobs")
        for algorithm in _listdir(blobs):
            for prefix in _listdir(os.path.join(blobs, algorithm)):
                folder = os.path.join(blobs, algorithm, prefix)
                for name in _listdir(folder):
                    try:
                        status = os.stat(os.path.join(folder, name))
                        digest = parse_digest(f"{algorithm}:{name}")
                    except (OSError, ValueError, RegistryError):
                        continue
                    yield Entry(digest, status.st_size, status.st_mtime)

    def by_last_use(self) -> list[Entry]:
        """Every entry, least recently used first.  Blocking: a thread's job."""
        return sorted(self.entries(), key=lambda e: e.used)

    def evict(self, candidates: list[Entry] | None = None) -> list[Entry]:
        """
        Remove least recently used content until the cache is back under
        90% of ``max_size`` (and ``min_free`` is free), never touching what a
        reader has open.

        :param candidates: :meth:`by_last_use`, computed beforehand (in a
            thread) so that only the removals happen here.
        """
        target = self.eviction_target
        evicted: list[Entry] = []
        for entry in self.by_last_use() if candidates is None else candidates:
            enough_room = target is None or self.size <= target
            enough_free = self.min_free is None or self.free_space() >= self.min_free
            if enough_room and enough_free:
                break
            if entry.digest in self._in_use:
                continue
            self.remove(entry.digest)
            evicted.append(entry)
        if evicted:
            self.log.info(
                "evicted {count} files ({size} bytes); cache now {total} bytes",
                count=len(evicted),
                size=sum(e.size for e in evicted),
                total=self.size,
            )
        return evicted

    def remove(self, digest: Digest) -> bool:
        """Remove a blob or manifest; whether it was there."""
        path = self.blob_path(digest)
        try:
            size = os.stat(path).st_size
            # Whoever unlinks it counts it: another process may be
            # evicting the same file.
            os.unlink(path)
        except FileNotFoundError:
            return False
        unlink_if_there(self._path("manifests", digest))
        unlink_if_there(self._path("vouches", digest))
        self.added(-size)
        return True

    def tags(self) -> Iterator[tuple[str, str, str, TagRecord]]:
        """Every tag record: ``(namespace, repository, tag, record)``."""
        top = os.path.join(self.root, "tags")
        for folder, _, files in os.walk(top):
            if os.path.basename(folder) != "_tags":
                continue
            namespace, _, repository = os.path.relpath(
                os.path.dirname(folder), top
            ).partition(os.sep)
            for tag in files:
                if tag.startswith(".tmp-"):
                    continue
                record = self.tag(namespace, repository.replace(os.sep, "/"), tag)
                if record is not None:
                    yield namespace, repository.replace(os.sep, "/"), tag, record

    def expire_tags(
        self,
        older_than: float,
        immutable: Callable[[str, str], bool] | None = None,
    ) -> int:
        """
        Remove tag records the origin last confirmed before *older_than*;
        those of tags *immutable* says are (namespace, tag) only once the
        manifest they name has left the cache.
        """
        expired = 0
        for namespace, repository, tag, record in list(self.tags()):
            if (
                immutable is not None
                and immutable(namespace, tag)
                and self.has_blob(record.digest)
            ):
                continue
            if record.confirmed < older_than:
                self.remove_tag(namespace, repository, tag)
                expired += 1
        return expired

    def remove_tag(self, namespace: str, repository: str, tag: str) -> bool:
        try:
            os.unlink(self._tag_path(namespace, repository, tag))
        except FileNotFoundError:
            return False
        return True

    def verify(self) -> Iterator[tuple[Entry, bool]]:
        """
        Re-hash every blob and manifest, removing those that do not match
        their digest.  Yields each entry and whether it was sound.
        """
        for entry in self.entries():
            hasher = entry.digest.hasher()
            try:
                with open(self.blob_path(entry.digest), "rb") as f:
                    for chunk in iter(lambda: f.read(1024 * 1024), b""):  # noqa: B023
                        hasher.update(chunk)
            except FileNotFoundError:
                continue
            sound = hasher.hexdigest() == entry.digest.hex
            if not sound:
                self.log.warn("removing corrupt {digest}", digest=str(entry.digest))
                self.remove(entry.digest)
            yield entry, sound

    def _tag_path(self, namespace: str, repository: str, tag: str) -> str:
        return os.path.join(self.root, "tags", namespace, repository, "_tags", tag)

    def tag(self, namespace: str, repository: str, tag: str) -> TagRecord | None:
        """What a tag pointed at when the origin last said, or ``None``."""
        try:
            with open(self._tag_path(namespace, repository, tag), "rb") as f:
                document = json.loads(f.read())
            return TagRecord(
                parse_digest(document["digest"]), float(document["confirmed"])
            )
        except FileNotFoundError:
            return None
        except Exception:
            self.log.failure(
                "unreadable tag record {repository}:{tag}",
                repository=repository,
                tag=tag,
            )
            return None

    def set_tag(
        self,
        namespace: str,
        repository: str,
        tag: str,
        digest: Digest,
        confirmed: float,
    ) -> None:
        """Record what the origin said a tag points at, and when."""
        record = {"digest": str(digest), "confirmed": confirmed}
        write_atomically(
            self._tag_path(namespace, repository, tag),
            json.dumps(record).encode("ascii"),
            sync=False,
        )
