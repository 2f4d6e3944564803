"""
The content-addressed cache on local disk.

Layout under the cache directory::

    blobs/<alg>/<hex[:2]>/<hex>        bytes of a blob or a manifest
    manifests/<alg>/<hex[:2]>/<hex>    media type of a stored manifest
    tags/<namespace>/<repo>/_tags/<tag>  last digest seen for a tag
    spool/                             downloads in progress

Bytes reach ``blobs/`` only through :meth:`Spool.commit`, which checks the
digest, flushes to disk and renames: a crash leaves at worst a file in
``spool/``, which :meth:`Store.open` empties.  ``_tags`` cannot clash with a
repository path component, which never starts with ``_``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO

from attrs import define, field, frozen
from twisted.logger import Logger

from regmirror.reference import Digest, parse_digest


@frozen
class TagRecord:
    """A tag's digest, and when the origin confirmed it (seconds since 1970)."""

    digest: Digest
    confirmed: float


class DigestMismatch(Exception):
    """Bytes did not hash to the digest they were fetched for."""

    def __init__(self, expected: Digest, actual: str) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


def _write_atomically(path: str, data: bytes, sync: bool = True) -> None:
    """Replace *path* with *data*, never leaving a half-written file behind."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@define(eq=False)
class Spool:
    """
    A download in progress: bytes appended here are hashed as they go.

    :ivar path: the spool file, which readers may open and tail.
    """

    digest: Digest
    path: str
    final_path: str
    _file: IO[bytes]
    _hasher: object = field(init=False)
    written: int = 0

    def __attrs_post_init__(self) -> None:
        self._hasher = self.digest.hasher()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        # Readers open the file by name: they must see every byte written.
        self._file.flush()
        self._hasher.update(data)  # type: ignore[attr-defined]
        self.written += len(data)

    def verify(self) -> None:
        """
        :raises DigestMismatch: if the bytes written so far do not match.
        """
        actual = self._hasher.hexdigest()  # type: ignore[attr-defined]
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, f"{self.digest.algorithm}:{actual}")

    def commit(self) -> None:
        """
        Verify, flush to stable storage and move into the cache.  Blocking:
        run it in a thread for big blobs.

        :raises DigestMismatch: and removes the spool file, if the bytes do
            not match the digest.
        """
        try:
            self.verify()
            os.fsync(self._file.fileno())
            self._file.close()
            os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
            os.replace(self.path, self.final_path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Throw the bytes away."""
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@define(eq=False)
class Store:
    """
    The local, content-addressed cache.  Every name and digest given to it
    has been validated by :mod:`regmirror.reference`.
    """

    root: str
    log = Logger()

    def open(self) -> None:
        """Create the layout and throw away downloads a crash left behind."""
        for sub in ("blobs", "manifests", "tags", "spool"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        spool = os.path.join(self.root, "spool")
        for leftover in os.listdir(spool):
            self.log.info("removing unfinished download {name}", name=leftover)
            os.unlink(os.path.join(spool, leftover))

    def _path(self, kind: str, digest: Digest) -> str:
        return os.path.join(
            self.root, kind, digest.algorithm, digest.hex[:2], digest.hex
        )

    def blob_path(self, digest: Digest) -> str:
        return self._path("blobs", digest)

    def blob_size(self, digest: Digest) -> int | None:
        """The size of a cached blob, or ``None`` when it is not cached."""
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def spool(self, digest: Digest) -> Spool:
        """Start writing the bytes of *digest* to a new spool file."""
        fd, path = tempfile.mkstemp(
            dir=os.path.join(self.root, "spool"), prefix=f"{digest.hex[:16]}-"
        )
        return Spool(digest, path, self.blob_path(digest), os.fdopen(fd, "wb"))

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
        # The bytes first: a media type file always has its manifest.
        _write_atomically(self.blob_path(digest), body)
        _write_atomically(self._path("manifests", digest), media_type.encode("ascii"))

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
        _write_atomically(
            self._tag_path(namespace, repository, tag),
            json.dumps(record).encode("ascii"),
            sync=False,
        )
