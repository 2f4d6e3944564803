"""
This node's use of the cluster's bucket (``[cache] backend = s3``).

The bucket holds every blob and manifest that some node took from an
upstream: a node asks it first for what it does not have (see
:mod:`regmirror.sources`), and puts there what it took from an upstream
itself.  With ``redirect = true`` a client may be sent to the bucket
instead.  With ``[cluster]`` the bucket's index lives in Redis (S3 does
not keep one for us), and with ``s3_max_size`` the least recently used
blobs leave the bucket beyond that size.

The bucket is a help: when it fails, the node carries on without it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from regmirror.cluster import Coordinator, CoordinatorDown
from regmirror.download import Download
from regmirror.pool import Manifest
from regmirror.reference import Digest
from regmirror.s3.errors import NoSuchKey, S3Error
from regmirror.s3.shared import SharedStore
from regmirror.store import Store

#: Where a download's bytes come from when they come from the bucket, for
#: people.
SOURCE = "shared store"

#: At most this many blobs leave the bucket per eviction run, asked of the
#: index this many at a time.
MAX_EVICTIONS = 1024
EVICTION_BATCH = 16


def in_background(call: Coroutine[Any, Any, None], what: str, log: Logger) -> None:
    """Run a Redis call without waiting for it: with Redis down it is
    dropped (the node works alone), any other failure is logged."""
    Deferred.fromCoroutine(call).addErrback(
        lambda failure: failure.trap(CoordinatorDown)
    ).addErrback(lambda failure: log.failure(f"cannot {what}", failure))


@define(eq=False)
class Bucket:
    """
    The cluster's bucket, for this node: a place to take blobs from (see
    :class:`regmirror.sources.Place`), the home of what this node took
    from upstreams, and its eviction.
    """

    objects: SharedStore
    #: this node's cache, whence blobs go up
    store: Store
    #: the bucket's index, in the cluster's Redis (``[cluster]``)
    index: Coordinator | None = None
    #: evict the least recently used blobs beyond this size (by the index)
    max_size: int | None = None
    #: answer with presigned URLs of the bucket for this long
    #: (``redirect = true``); ``None``: never
    redirect_ttl: float | None = None
    _evicting: bool = False
    log = Logger()

    # -- a place blobs come from ------------------------------------------

    @property
    def redirects(self) -> bool:
        """Are clients sent here (``redirect = true``)?"""
        return self.redirect_ttl is not None

    async def open(self, download: Download) -> IResponse | None:
        """
        The blob from ``download.written`` on, if the bucket has it: asked
        once per download.
        """
        if download.bucket:
            return None
        return await self._open(download)

    async def open_again(self, download: Download) -> IResponse | None:
        """
        The blob once more, if the bucket had nothing at the first look and
        this node holds the digest's lease now: another node may have put
        it there and let go of the lease since.
        """
        if download.bucket != "absent" or download.lease is None:
            return None
        return await self._open(download, absent="absent under the lease")

    async def _open(
        self, download: Download, absent: str = "absent"
    ) -> IResponse | None:
        try:
            response = await self.objects.open_blob(download.digest, download.written)
        except NoSuchKey:
            download.bucket = absent
            return None
        except S3Error as e:
            self.log.warn("shared store: {why}", why=str(e))
            download.bucket = "failed"
            return None
        download.bucket = "used"
        download.source, download.upstream = SOURCE, None
        self.touch(download.digest)
        return response

    async def size(self, digest: Digest) -> int | None:
        """The blob's size in the bucket; ``None`` if it is not there, or
        the bucket failed (logged)."""
        try:
            return await self.objects.blob_size(digest)
        except S3Error as e:
            self.log.warn("shared store: {why}", why=str(e))
            return None

    async def redirect(self, digest: Digest) -> str | None:
        """A presigned URL of the blob, with ``redirect_ttl``, if the bucket
        has it."""
        if self.redirect_ttl is None:
            return None
        if await self.size(digest) is None:
            return None
        self.touch(digest)
        return self.objects.blob_url(digest, int(self.redirect_ttl))

    async def kept(self, download: Download) -> None:
        """
        A blob this node took from an upstream is in its cache: it goes
        into the bucket too (and its index), for the other nodes.
        """
        if download.upstream is None:
            return
        digest, size = download.digest, download.written
        self.store.acquire(digest)
        try:
            await self.objects.put_blob(digest, self.store.blob_path(digest), size)
            if self.index is not None:
                try:
                    await self.index.stored(digest, size)
                except CoordinatorDown:
                    pass
        except S3Error as e:
            self.log.warn(
                "cannot put {digest} in the shared store: {why}",
                digest=str(digest),
                why=str(e),
            )
        finally:
            self.store.release(digest)

    def dropped(self, download: Download) -> None:
        """A failed download leaves nothing to put in the bucket."""

    # -- manifests --------------------------------------------------------

    async def manifest(self, digest: Digest) -> Manifest | None:
        """The manifest, if the bucket has it (``None`` too if it failed:
        logged)."""
        try:
            found = await self.objects.manifest(digest)
        except S3Error as e:
            self.log.warn("shared store: {why}", why=str(e))
            return None
        return None if found is None else Manifest(digest, *found)

    def put_manifest(self, manifest: Manifest) -> None:
        """Put a manifest in the bucket, without waiting (failures logged)."""
        Deferred.fromCoroutine(
            self.objects.put_manifest(
                manifest.digest, manifest.media_type, manifest.body
            )
        ).addErrback(
            lambda failure: self.log.warn(
                "cannot put {digest} in the shared store: {why}",
                digest=str(manifest.digest),
                why=failure.getErrorMessage(),
            )
        )

    # -- its size -----------------------------------------------------------

    def touch(self, digest: Digest) -> None:
        """Mark a blob of the bucket used (for its eviction)."""
        if self.index is None or self.max_size is None:
            return
        in_background(self.index.touch(digest), "mark a blob used", self.log)

    async def evict(self) -> int:
        """
        Delete the bucket's least recently used blobs while it holds more
        than ``max_size`` (by the index in Redis; every node may do this,
        deleting twice is harmless).

        :return: how many blobs went.
        """
        index, limit = self.index, self.max_size
        if index is None or limit is None or self._evicting:
            return 0
        self._evicting = True
        evicted = 0
        try:
            total = await index.total_size()
            for _ in range(MAX_EVICTIONS // EVICTION_BATCH):
                if total <= limit:
                    break
                victims = await index.least_recently_used(EVICTION_BATCH)
                if not victims:
                    break
                for digest, size in victims:
                    await self.objects.delete_blob(digest)
                    await index.forget(digest)
                    total -= size
                    evicted += 1
                    if total <= limit:
                        break
        except (CoordinatorDown, S3Error) as e:
            self.log.warn("shared store eviction stopped: {why}", why=str(e))
        finally:
            self._evicting = False
        if evicted:
            self.log.info("evicted {count} blobs from the shared store", count=evicted)
        return evicted
