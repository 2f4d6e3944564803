"""
Filling the cache: the one face the web layer sees.

:class:`Fetcher` builds the parts that fill the cache on demand and passes
each call to its part:

- blobs (:mod:`regmirror.blobs`): one download per digest, from the first
  of its sources (:mod:`regmirror.sources`) that has the bytes, which every
  reader tails (:mod:`regmirror.readers`);
- manifests by digest (:mod:`regmirror.manifests`);
- which namespaces vouch for which content (:mod:`regmirror.vouches`),
  which both of them heed;
- tags (:mod:`regmirror.tags`): the origin's answers, reused for a while;
- housekeeping (:mod:`regmirror.housekeeping`): the cache within its limits;
- pulling ahead (:mod:`regmirror.ahead`): the blobs of an image manifest
  served, fetched before its client asks.

A node of a cluster is given the cluster's pieces here, at construction:
the bucket, the coordinator (Redis) and the other nodes; a node alone is
given none, and its parts are built without them.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime

from regmirror._spooling import CallFromThread, call_here
from regmirror.ahead import Ahead
from regmirror.blobs import MAX_BLOB_SIZE, Blobs
from regmirror.bucket import Bucket
from regmirror.cluster import Coordinator
from regmirror.download import Download
from regmirror.housekeeping import Housekeeping, RunInThread
from regmirror.manifests import Found, Manifests
from regmirror.metrics import Metrics
from regmirror.nodes import Peers
from regmirror.pool import Manifest, TagAnswer, UpstreamPool
from regmirror.readers import BlobSource
from regmirror.reference import Digest
from regmirror.s3.shared import SharedStore
from regmirror.sources import Leases, Sources, places
from regmirror.store import Store
from regmirror.tags import Board, NoBoard, RedisBoard, Tags
from regmirror.vouches import UNUSED_RECORD_AGE, Vouches


class Fetcher:
    """
    Serves digests and tags from the store, filling it on demand.

    :ivar blobs: the blobs, and the downloads under way.
    :ivar manifests: the manifests by digest.
    :ivar tags: what tags point at.
    :ivar ahead: the blobs fetched ahead of clients.
    :ivar bucket: the cluster's bucket, when there is one.
    """

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        *,
        run_in_thread: RunInThread = maybeDeferred,
        call_from_thread: CallFromThread = call_here,
        max_blob_size: int = MAX_BLOB_SIZE,
        tag_ttl: float = 60.0,
        metrics: Metrics | None = None,
        bucket: SharedStore | None = None,
        bucket_max_size: int | None = None,
        redirect_ttl: float | None = None,
        coordinator: Coordinator | None = None,
        peers: Peers | None = None,
    ) -> None:
        """
        :param run_in_thread: runs blocking work (the ``fsync`` of a
            finished blob, the walk of the cache folder) off the reactor
            thread, and the appending of downloads to their spools.
        :param call_from_thread: how those threads hand their progress back
            (``reactor.callFromThread``; a plain call by default, for a
            synchronous *run_in_thread*).
        :param max_blob_size: the largest blob taken from an upstream that
            does not say its size.
        :param tag_ttl: how long the origin's answer for a tag is reused
            (``[cache] tag_ttl``; a namespace's own overrides it).
        :param bucket: the bucket the cluster's nodes share (``[cache]
            backend = s3``).
        :param bucket_max_size: evict the bucket's least recently used
            blobs beyond this size (by its index in Redis).
        :param redirect_ttl: answer with presigned URLs of the bucket for
            this long (``redirect = true``); ``None``: never.
        :param coordinator: the other nodes, through Redis (``[cluster]``).
        :param peers: fetches blobs from the other nodes (``[cluster]``).
        """
        self.store = store
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.metrics = metrics if metrics is not None else Metrics()
        self._coordinator = coordinator
        self.bucket = (
            None
            if bucket is None
            else Bucket(bucket, store, coordinator, bucket_max_size, redirect_ttl)
        )
        leases = (
            None
            if coordinator is None or peers is None
            else Leases(coordinator, peers, clock)
        )
        self.housekeeping = Housekeeping(
            store, run_in_thread, self.metrics, self.bucket
        )
        self.vouches = Vouches(store)
        self.blobs = Blobs(
            store,
            clock,
            Sources(places=places(self.bucket, leases)),
            self.housekeeping,
            self.metrics,
            run_in_thread,
            max_blob_size,
            self.vouches,
            call_from_thread,
        )
        self.manifests = Manifests(store, self.metrics, self.vouches, self.bucket)
        self.ahead = Ahead(self.blobs, store, clock, self.metrics)
        self.blobs.guesses = self.ahead
        board: Board = NoBoard()
        if coordinator is not None:
            board = RedisBoard(coordinator, clock)
        self.tags = Tags(
            store, clock, self.manifests, self.blobs, self.metrics, board, tag_ttl
        )

    @property
    def coordinator(self) -> Coordinator | None:
        """The other nodes, through Redis (``[cluster]``)."""
        return self._coordinator

    @property
    def downloads(self) -> list[Download]:
        """The downloads under way."""
        return self.blobs.downloads

    async def blob(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> BlobSource:
        """See :meth:`Blobs.blob`.  A client's request: a blob being
        fetched ahead is no longer ahead (:meth:`Ahead.asked`), and one
        that starts may cancel prefetches (:meth:`Ahead.make_room`)."""
        return await self.blobs.blob(pool, repository, digest)

    async def relay(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        offset: int = 0,
        broke: Sequence[str] = (),
    ) -> BlobSource:
        """See :meth:`Blobs.relay`."""
        return await self.blobs.relay(pool, repository, digest, offset, broke)

    async def blob_size(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """See :meth:`Blobs.size`."""
        return await self.blobs.size(pool, repository, digest)

    async def redirect(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> str | None:
        """See :meth:`Blobs.redirect`."""
        return await self.blobs.redirect(pool, repository, digest)

    async def local_blob(self, digest: Digest) -> BlobSource | None:
        """See :meth:`Blobs.local`."""
        return await self.blobs.local(digest)

    async def manifest(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        *,
        named: bool = False,
    ) -> Manifest:
        """See :meth:`Manifests.get`."""
        return await self.manifests.get(pool, repository, digest, named=named)

    async def find_manifest(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        *,
        named: bool = False,
    ) -> Found:
        """See :meth:`Manifests.find`."""
        return await self.manifests.find(pool, repository, digest, named=named)

    def pull_ahead(
        self, pool: UpstreamPool, repository: str, manifest: Manifest, limit: int
    ) -> None:
        """See :meth:`Ahead.served`."""
        self.ahead.served(pool, repository, manifest, limit)

    async def resolve_tag(
        self, pool: UpstreamPool, repository: str, tag: str
    ) -> TagAnswer:
        """See :meth:`Tags.resolve`."""
        return await self.tags.resolve(pool, repository, tag)

    def housekeep(self) -> None:
        """See :meth:`Housekeeping.run`; and the records of who vouches for
        content that never arrived go after a day (in a thread)."""
        self.housekeeping.run()
        cutoff = self.clock.seconds() - UNUSED_RECORD_AGE
        self.run_in_thread(lambda: self.store.expire_vouches(cutoff)).addErrback(
            lambda failure: self.housekeeping.log.failure(
                "cannot expire the records of who vouches", failure
            )
        )
