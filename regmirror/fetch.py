"""
Filling the cache: one upstream download per digest, any number of readers.

A :class:`Download` writes an upstream body into a spool file; readers
(:class:`BlobTail`: a :class:`SpoolReader`, or on plain TCP the
``sendfile`` sender of :mod:`regmirror._sendfile`) tail that file at their
own pace, so a slow client never slows the download or the others.
Readers are held one byte short of the end until the digest is verified:
a client never receives a complete body whose digest did not match.

In a cluster a download's bytes come from the first source that has them
(:meth:`Fetcher._open`): the shared bucket, the node holding the digest's
lease in Redis (while it downloads), else the namespace's upstreams, with
the lease taken by this node.  Whatever the source, the bytes are verified
here before they count as cached.

A transfer that breaks goes on where it stopped, from the next upstream in
the namespace's order, flaky ones taking turns, for as long as attempts
bring new bytes (:class:`regmirror._attempts.Attempts` decides).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import IO, Any

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from regmirror._attempts import Attempts
from regmirror._flight import SingleFlight
from regmirror.cluster import Coordinator, CoordinatorDown, Lease
from regmirror.errors import BlobUnknown, DownloadFailed, ManifestUnknown, RegistryError
from regmirror.metrics import Metrics
from regmirror.nodes import Peers, PeerUnavailable
from regmirror.pool import (
    Manifest,
    NotFoundAnywhere,
    OriginUnreachable,
    TagAnswer,
    UpstreamPool,
)
from regmirror.reference import (
    INDEX_TYPES,
    Digest,
    load_json,
    parse_digest,
    parse_timestamp,
)
from regmirror.s3 import NotFound, S3Error, SharedStore
from regmirror.store import (
    SIZE_SUFFIX,
    AlreadyCached,
    DigestMismatch,
    Entry,
    Spool,
    SpoolBusy,
    Store,
)
from regmirror.upstream import Upstream, UpstreamFailure

#: Where a tag answer came from when it came from the cache.
CACHE = "cache"
#: Image configs read to date an image are read up to this size.
MAX_CONFIG_SIZE = 1024 * 1024

#: How often another process's download is looked at, and for how many looks
#: its size is awaited before serving without it.
FOLLOW_INTERVAL = 0.05
FOLLOW_SIZE_POLLS = 100

#: How many digests' bad upstreams are remembered.
MAX_TAINTED = 10_000

#: A reader waiting for a download under way is woken once this many more
#: bytes are there for it, or WAKE_DELAY seconds after the first append it
#: saw: a fast download reaches its readers in a few large sends instead
#: of one per upstream read (for each reader), a slow one with little delay.
WAKE_BYTES = 1024 * 1024
WAKE_DELAY = 0.02

#: What a reader waits for when only the end of the download (verified, or
#: failed) lets it go on: no number of appended bytes.
UNTIL_END = sys.maxsize

#: Bytes read from disk per write to a client.
CHUNK = 256 * 1024

#: How long a source other than an upstream may stay silent mid-body.
IDLE_TIMEOUT = 60.0

#: The sources of a download that are not upstreams, for people.
SHARED = "shared store"
PEER_PREFIX = "node "
#: Where a tag answer came from when another node asked the origin.
CLUSTER = "cluster"

#: How many times a node asks again for a digest's lease while the node
#: holding it does not answer (each ``lease_ttl / 4`` apart: a dead node's
#: lease expires within ``lease_ttl``).
CLAIM_POLLS = 12

#: At most this many blobs leave the shared store per housekeeping run.
MAX_SHARED_EVICTIONS = 1024

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


@define(eq=False)
class Download:
    """
    One blob on its way into the cache: from an upstream, the cluster's
    shared store or another node.

    :ivar size: the size the source announced, when it did.
    :ivar state: ``"running"``, ``"done"`` or ``"failed"``.
    """

    digest: Digest
    spool: Spool | Followed
    #: the namespace's upstreams (``None`` when following another worker)
    pool: UpstreamPool | None
    repository: str
    size: int | None = None
    #: where the bytes come from now, for people: an upstream's name,
    #: ``shared store``, ``node <URL>`` or ``another worker``
    source: str = ""
    #: the upstream, when the bytes come from one
    upstream: Upstream | None = None
    #: this node's claim on the digest, when it downloads for the cluster
    lease: Lease | None = None
    #: what the shared store did for this download: ``""`` (not asked),
    #: ``"absent"``, ``"failed"`` or ``"used"``
    bucket: str = ""
    #: another process is downloading; this one only watches its spool
    follower: bool = False
    state: str = "running"
    #: the transfers so far, and where the next one comes from
    attempts: Attempts = field(factory=Attempts)
    #: how many times the transfer was resumed after breaking
    resumed: int = 0
    #: bounds how long a reader waits for more bytes; without it, every
    #: append wakes every reader
    clock: IReactorTime | None = None
    _waiting: list[_Waiter] = field(factory=list)
    _timer: IDelayedCall | None = None

    @property
    def written(self) -> int:
        return self.spool.written

    @property
    def writer(self) -> Spool:
        """The spool this process writes (never a follower's)."""
        assert isinstance(self.spool, Spool), "a follower does not write"
        return self.spool

    @property
    def from_peer(self) -> bool:
        """Do the bytes come from another node?"""
        return self.source.startswith(PEER_PREFIX)

    @property
    def readable(self) -> int:
        """How many bytes readers may send: all once verified, else one less."""
        if self.state == "done":
            return self.written
        return max(0, self.written - 1)

    def changed(self, written: int = 0) -> Deferred[None]:
        """
        Fires when the download ends or a follower looks, at the first
        append that brings it to *written* bytes, and at the latest (with a
        clock) :data:`WAKE_DELAY` seconds after an append this wait saw.
        """
        if self.state != "running":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(_Waiter(written, d))
        return d

    def notify(self) -> None:
        """Something changed (the download ended, a follower's look): wake all."""
        waking, self._waiting = self._waiting, []
        self._stop_timer()
        self._wake(waking)

    def appended(self) -> None:
        """
        Bytes were appended: wake the waiters whose bytes are there, and
        make sure the others are woken within :data:`WAKE_DELAY` (all of
        them at once without a clock).
        """
        clock = self.clock
        if clock is None or self.state != "running":
            self.notify()
            return
        waking, staying = [], []
        written = self.written
        late = clock.seconds() + WAKE_DELAY
        for waiter in self._waiting:
            if waiter.written <= written:
                waking.append(waiter)
            else:
                if waiter.deadline is None and waiter.written != UNTIL_END:
                    waiter.deadline = late
                staying.append(waiter)
        self._waiting = staying
        if staying and self._timer is None:
            self._timer = clock.callLater(WAKE_DELAY, self._wake_late)
        self._wake(waking)

    def _wake_late(self) -> None:
        """Wake those who have waited long enough since bytes came for them."""
        self._timer = None
        assert self.clock is not None
        now = self.clock.seconds()
        waking = [
            w for w in self._waiting if w.deadline is not None and w.deadline <= now
        ]
        self._waiting = [w for w in self._waiting if w not in waking]
        deadlines = [w.deadline for w in self._waiting if w.deadline is not None]
        if deadlines:
            self._timer = self.clock.callLater(min(deadlines) - now, self._wake_late)
        self._wake(waking)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @staticmethod
    def _wake(waking: list[_Waiter]) -> None:
        for waiter in waking:
            if not waiter.fired.called:
                waiter.fired.callback(None)


@define(eq=False)
class _Waiter:
    """Someone waiting for a download to reach *written* bytes."""

    written: int
    fired: Deferred[None]
    #: when it is woken anyway: set at the first append it sees, so that
    #: no timer runs for readers of a stalled download
    deadline: float | None = None


@define(eq=False)
class Followed:
    """What this process knows of another process's spool file."""

    path: str
    final_path: str
    written: int = 0


@frozen
class BlobSource:
    """Where to read a blob from: the cache file, or a download under way."""

    size: int | None
    path: str
    download: Download | None = None
    #: an upstream response to relay as it comes, when the cache cannot
    #: be written
    relay: IResponse | None = None


@define(eq=False)
class Fetcher:
    """
    Serves digests from the store, filling it from upstream pools with one
    download per digest.
    """

    store: Store
    clock: IReactorTime
    #: runs blocking work (fsync of a finished blob) off the reactor thread
    run_in_thread: RunInThread = maybeDeferred
    #: the largest blob taken from an upstream that does not say its size
    max_blob_size: int = 64 * 1024**3
    tag_ttl: float = 60.0
    _tags: dict[tuple[str, str, str], tuple[TagAnswer, float]] = field(factory=dict)
    _tag_flight: SingleFlight[tuple[str, str, str], TagAnswer] = field(
        factory=SingleFlight
    )
    _downloads: dict[Digest, Download] = field(factory=dict)
    _starting: SingleFlight[Digest, Download] = field(factory=SingleFlight)
    _manifests: SingleFlight[tuple[str, Digest], Manifest] = field(factory=SingleFlight)
    metrics: Metrics = field(factory=Metrics)
    #: digest → upstreams that served wrong bytes for it
    _tainted: dict[Digest, set[str]] = field(factory=dict)
    #: look-outs on other processes' downloads
    _watchers: dict[Digest, LoopingCall] = field(factory=dict)
    _evicting: bool = False
    #: the bucket the cluster's nodes share (``[cache] backend = s3``)
    shared: SharedStore | None = None
    #: the other nodes, through Redis (``[cluster]``)
    coordinator: Coordinator | None = None
    peers: Peers | None = None
    #: evict the shared store's least recently used blobs beyond this size
    shared_max_size: int | None = None
    #: answer with presigned URLs of the shared store for this long
    #: (``redirect = true``); ``None``: never
    redirect_ttl: float | None = None
    _evicting_shared: bool = False
    log = Logger()

    @property
    def downloads(self) -> list[Download]:
        """The downloads under way."""
        return list(self._downloads.values())

    # -- blobs --------------------------------------------------------------

    async def blob(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> BlobSource:
        """
        A source for the blob's bytes: the cached file, or a download that
        this call starts or joins.

        :raises BlobUnknown: when no upstream has it.
        """
        running = self._downloads.get(digest)
        if running is not None:
            self._lookup("blob", "joined")
            return BlobSource(running.size, running.spool.path, running)
        size = self.store.blob_size(digest)
        if size is not None:
            self._lookup("blob", "hit")
            return BlobSource(size, self.store.blob_path(digest))

        async def start() -> Download:
            return await self._start(pool, repository, digest)

        self._lookup("blob", "joined" if digest in self._starting else "miss")
        if not self.store.writable():
            return await self._relay(pool, repository, digest)
        try:
            download = await self._starting.run(digest, start)
        except _CannotSpool:
            return await self._relay(pool, repository, digest)
        except AlreadyCached:
            return BlobSource(
                self.store.blob_size(digest), self.store.blob_path(digest)
            )
        if download.state == "done":
            return BlobSource(download.written, download.spool.final_path)
        return BlobSource(download.size, download.spool.path, download)

    async def redirect(self, digest: Digest) -> str | None:
        """
        Where to send a client for a blob the shared store has and this
        node's cache does not (``redirect = true``), else ``None``.
        """
        if self.shared is None or self.redirect_ttl is None:
            return None
        if digest in self._downloads or self.store.blob_size(digest) is not None:
            return None
        if await self._shared_size(digest) is None:
            return None
        self._lookup("blob", "redirect")
        self._touch(digest)
        return self.shared.blob_url(digest, int(self.redirect_ttl))

    async def _shared_size(self, digest: Digest) -> int | None:
        """The blob's size in the shared store; ``None`` if it is not there,
        there is none, or it failed (logged)."""
        if self.shared is None:
            return None
        try:
            return await self.shared.blob_size(digest)
        except S3Error as e:
            self.log.warn("shared store: {why}", why=str(e))
            return None

    async def blob_size(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """The blob's size without downloading it (HEAD)."""
        running = self._downloads.get(digest)
        if running is not None and running.size is not None:
            return running.size
        size = self.store.blob_size(digest)
        if size is None:
            size = await self._shared_size(digest)
        if size is not None:
            return size
        try:
            return await pool.blob_size(repository, digest)
        except NotFoundAnywhere:
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None

    async def _start(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> Download:
        try:
            spool = self.store.spool(digest)
        except SpoolBusy as busy:
            return await self._follow(digest, busy.path)
        except OSError as error:
            self.store.degrade(error)
            raise _CannotSpool() from None
        download = Download(digest, spool, pool, repository, clock=self.clock)
        try:
            response = await self._open(download, self._untainted(pool, digest))
        except NotFoundAnywhere:
            self._unclaim(download)
            spool.discard()
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None
        except BaseException:
            self._unclaim(download)
            spool.discard()
            raise
        length = response.length
        download.size = length if isinstance(length, int) else None
        spool.announce(download.size)
        self._downloads[digest] = download
        self.log.info(
            "downloading {digest} ({size} bytes) from {source}",
            digest=str(digest),
            size=download.size,
            source=download.source,
        )
        self._receive(download, response, skip=0)
        return download

    async def _open(
        self, download: Download, order: list[Upstream], last_resort: bool = False
    ) -> IResponse:
        """
        The blob's bytes from ``download.written`` on, from the first source
        that has them: the cluster's shared store, the node downloading the
        blob for the cluster, else the namespace's upstreams in *order*
        (this node then holds the digest's lease, or works alone when Redis
        cannot say); with *last_resort*, then those of *order* whose breaker
        is open.  Sets the download's ``source`` and ``upstream``.

        :raises NotFoundAnywhere: when no upstream has it.
        """
        from_bucket = await self._from_shared(download)
        if from_bucket is not None:
            return from_bucket
        if download.lease is None:
            from_node = await self._from_cluster(download)
            if from_node is not None:
                return from_node
            if download.lease is not None:
                # Looked at again under the lease: another node may have
                # shared the blob and let go since the first look.
                from_bucket = await self._from_shared(download, again=True)
                if from_bucket is not None:
                    return from_bucket
        assert download.pool is not None, "a follower opens nothing"
        upstream, response = await download.pool.open_blob(
            download.repository, download.digest, download.written, order, last_resort
        )
        download.source, download.upstream = upstream.name, upstream
        return response

    async def _from_shared(
        self, download: Download, again: bool = False
    ) -> IResponse | None:
        """
        The blob from the shared store, if it has it: asked once per
        download, and *again* only if it had nothing the first time.
        """
        if self.shared is None:
            return None
        if download.bucket and not (again and download.bucket == "absent"):
            return None
        try:
            response = await self.shared.open_blob(download.digest, download.written)
        except NotFound:
            download.bucket = "absent"
            return None
        except S3Error as e:
            self.log.warn("shared store: {why}", why=str(e))
            download.bucket = "failed"
            return None
        download.bucket = "used"
        download.source, download.upstream = SHARED, None
        self._touch(download.digest)
        return response

    async def _from_cluster(self, download: Download) -> IResponse | None:
        """
        Claim the digest for this node, or open it from the node that holds
        it.  ``None``: this node downloads it from upstream, with the lease
        (``download.lease``) or alone.
        """
        coordinator, peers = self.coordinator, self.peers
        if coordinator is None or peers is None:
            return None
        digest = download.digest
        for _ in range(CLAIM_POLLS):
            try:
                claim = await coordinator.acquire(digest)
                if isinstance(claim, Lease):
                    download.lease = claim
                    claim.lost.addCallback(
                        lambda why: self.log.warn(
                            "lost the lease on {digest} ({why}); going on: at "
                            "worst another node downloads it too",
                            digest=str(digest),
                            why=why,
                        )
                    )
                    return None
                if claim.url == coordinator.advertise:
                    # This node's previous life (a restart within the
                    # lease's time): wait for the lease to run out.
                    await deferLater(
                        self.clock, coordinator.lease_ttl / 4, lambda: None
                    )
                    continue
                key = await coordinator.peer_key()
            except CoordinatorDown:
                return None
            if download.attempts.spent(PEER_PREFIX + claim.url):
                self.log.warn(
                    "node {url} brought nothing of {digest} too often: "
                    "downloading alone",
                    url=claim.url,
                    digest=str(digest),
                )
                return None
            try:
                response = await peers.open_blob(
                    claim.url, key, digest, download.written
                )
            except PeerUnavailable as e:
                # A dead node's lease expires within lease_ttl.
                self.log.info(
                    "node {url} cannot give {digest} ({why}); asking again",
                    url=claim.url,
                    digest=str(digest),
                    why=str(e),
                )
                await deferLater(self.clock, coordinator.lease_ttl / 4, lambda: None)
                continue
            download.source = PEER_PREFIX + claim.url
            download.upstream = None
            return response
        self.log.warn(
            "the node holding {digest}'s lease never answered: downloading alone",
            digest=str(digest),
        )
        return None

    def _unclaim(self, download: Download) -> None:
        """Give up the download's lease, if it has one."""
        lease, download.lease = download.lease, None
        if lease is None or self.coordinator is None:
            return
        self._tell_redis(self.coordinator.release(lease), "release a lease")

    async def _share(self, download: Download) -> None:
        """
        Put a blob this node took from an upstream into the shared store,
        then give up its lease: other nodes take it from the bucket now.
        """
        digest, shared, size = download.digest, self.shared, download.written
        assert shared is not None, "only with a shared store"
        self.store.acquire(digest)
        try:
            await shared.put_blob(digest, self.store.blob_path(digest), size)
            if self.coordinator is not None:
                try:
                    await self.coordinator.stored(digest, size)
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
            self._unclaim(download)

    async def local_blob(self, digest: Digest) -> BlobSource | None:
        """
        What this node has of *digest* without asking anyone: its cache,
        its own download, another worker's.  For the other nodes, so never
        what this node itself takes from another node.
        """
        flight = self._starting.join(digest)
        running = self._downloads.get(digest)
        if running is None and flight is not None:
            try:
                running = await flight
            except CancelledError:
                raise
            except Exception:
                return None
        if running is None:
            size = self.store.blob_size(digest)
            if size is not None:
                return BlobSource(size, self.store.blob_path(digest))
            path = self.store.spool_path(digest)
            if self.store.spool_abandoned(path):
                return None
            running = await self._starting.run(
                digest, lambda: self._follow(digest, path)
            )
        if running.from_peer or running.state == "failed":
            return None
        if running.state == "done":
            return BlobSource(running.written, running.spool.final_path)
        return BlobSource(running.size, running.spool.path, running)

    async def _follow(self, digest: Digest, path: str) -> Download:
        """
        Another process sharing the cache is downloading *digest*: serve
        from its spool as it grows, and from the cache once it is verified.
        """
        download = Download(
            digest,
            Followed(path, self.store.blob_path(digest)),
            None,
            "",
            source="another worker",
            follower=True,
            clock=self.clock,
        )
        self.log.info(
            "following another worker's download of {digest}", digest=str(digest)
        )
        poller = LoopingCall(self._watch, download)
        poller.clock = self.clock
        self._watchers[digest] = poller
        poller.start(FOLLOW_INTERVAL).addErrback(
            lambda failure: self.log.failure(
                "cannot follow {digest}", failure, digest=str(digest)
            )
        )
        # The size, which the downloader announces once it has headers.
        for _ in range(FOLLOW_SIZE_POLLS):
            if download.size is not None or download.state != "running":
                break
            await deferLater(self.clock, FOLLOW_INTERVAL, lambda: None)
        if download.state == "running":
            # Joined from now on; until now other requests waited in
            # _starting, so that none was answered without the size.
            self._downloads[digest] = download
        return download

    def _watch(self, download: Download) -> None:
        """One look at another process's download."""
        spool = download.spool
        if download.size is None:
            try:
                with open(spool.path + SIZE_SUFFIX, encoding="ascii") as f:
                    download.size = int(f.read())
            except (OSError, ValueError):
                pass
        try:
            written = os.stat(spool.path).st_size
        except FileNotFoundError:
            written = None
        finished = os.path.exists(spool.final_path)
        if (
            not finished
            and written is not None
            and not self.store.spool_abandoned(spool.path)
        ):
            if written != spool.written:
                spool.written = written
                download.notify()
            return
        finished = finished or os.path.exists(spool.final_path)
        if finished:
            spool.written = os.stat(spool.final_path).st_size
            download.state = "done"
        else:
            self.log.warn(
                "the other worker's download of {digest} ended unfinished",
                digest=str(download.digest),
            )
            download.state = "failed"
        self._downloads.pop(download.digest, None)
        self._watchers.pop(download.digest).stop()
        download.notify()

    async def _relay(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> BlobSource:
        """An upstream response to stream straight through, uncached."""
        try:
            _, response = await pool.open_blob(repository, digest)
        except NotFoundAnywhere:
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None
        length = response.length
        return BlobSource(
            length if isinstance(length, int) else None, "", relay=response
        )

    def _receive(self, download: Download, response: IResponse, skip: int) -> None:
        download.attempts.began(download.source, download.written)
        idle = IDLE_TIMEOUT
        if download.upstream is not None:
            idle = download.upstream.config.idle_timeout
        response.deliverBody(_SpoolWriter(self, download, self.clock, idle, skip))

    async def _resume(self, download: Download, why: str) -> None:
        """
        Carry on a broken transfer where it stopped, with a Range request:
        to the upstreams in the order :meth:`Attempts.next_order` gives (the
        next one first; one that broke during this download only after the
        others), and as a last resort to those among them marked down,
        rather than fail a download that progresses.  A transfer from the
        shared store goes on from an upstream; one from another node, from
        whoever holds the digest's lease next (this node, once the other's
        lease expired).
        """
        pool, offset = download.pool, download.written
        assert pool is not None, "a follower does not resume"
        order = download.attempts.next_order(self._untainted(pool, download.digest))
        download.resumed += 1
        try:
            response = await self._open(download, order, last_resort=True)
        except (NotFoundAnywhere, RegistryError) as e:
            self._fail(download, f"{why}; cannot resume: {e}")
            return
        self.log.info(
            "resuming {digest} at byte {offset} from {source} ({why})",
            digest=str(download.digest),
            offset=offset,
            source=download.source,
            why=why,
        )
        self._receive(download, response, skip=offset if response.code == 200 else 0)

    def _finish(self, download: Download, reason: Failure) -> None:
        """The upstream body ended: verify and commit, or discard."""
        download.attempts.ended(download.written)
        if not reason.check(ResponseDone, PotentialDataLoss):
            why = (
                f"transfer from {download.source} broke after "
                f"{download.written} bytes: {reason.getErrorMessage()}"
            )
            pool, broken = download.pool, download.upstream
            assert pool is not None, "a follower does not receive"
            if broken is not None:
                pool.failed(broken, UpstreamFailure(broken.name, "broken", why))
            if download.size is None:
                self._fail(download, why)
                return
            enough = download.attempts.exhausted(
                download.size, self._untainted(pool, download.digest)
            )
            if enough is not None:
                self._fail(download, f"{why}; no further attempt: {enough}")
                return
            Deferred.fromCoroutine(self._resume(download, why)).addErrback(
                lambda failure: self._fail(download, failure.getErrorMessage())
            )
            return
        if download.size is not None and download.written != download.size:
            self._fail(download, f"got {download.written} of {download.size} bytes")
            return
        if download.upstream is not None:
            download.upstream.breaker.transferred()
        d = self.run_in_thread(download.writer.commit)

        def committed(_: None) -> None:
            download.state = "done"
            del self._downloads[download.digest]
            self.store.added(download.written)
            self.housekeep()
            self.log.info(
                "cached {digest} ({size} bytes) from {source}",
                digest=str(download.digest),
                size=download.written,
                source=download.source,
            )
            download.notify()
            if download.upstream is not None and self.shared is not None:
                Deferred.fromCoroutine(self._share(download)).addErrback(
                    lambda failure: self.log.failure("cannot share a blob", failure)
                )
            else:
                self._unclaim(download)

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, OSError):
                self.store.degrade(failure.value)
                self._fail(download, f"cannot store the blob: {failure.value}")
            elif failure.check(DigestMismatch):
                self._taint(download)
                self._fail(download, f"digest mismatch: {failure.getErrorMessage()}")
            else:
                self.log.failure(
                    "cannot store {digest}", failure, digest=str(download.digest)
                )
                self._fail(download, "cannot store the blob")

        d.addCallbacks(committed, failed)

    def _taint(self, download: Download) -> None:
        """
        An upstream served wrong bytes for a digest: count it against its
        health and do not ask it for that digest again for a while, so that
        the next request is served by another upstream.
        """
        upstream, pool = download.upstream, download.pool
        if upstream is None or pool is None:
            return
        pool.failed(
            upstream,
            UpstreamFailure(upstream.name, "invalid", "wrong bytes for a digest"),
        )
        if len(self._tainted) >= MAX_TAINTED:
            self._tainted.pop(next(iter(self._tainted)))
        self._tainted.setdefault(download.digest, set()).add(upstream.name)

    def _untainted(self, pool: UpstreamPool, digest: Digest) -> list[Upstream]:
        """The pool's upstreams, without those that served *digest* wrongly
        (all of them again if every one did)."""
        tainted = self._tainted.get(digest, set())
        trusted = [u for u in pool.upstreams if u.name not in tainted]
        return trusted or list(pool.upstreams)

    def _fail(self, download: Download, why: str) -> None:
        download.attempts.ended(download.written)
        self.log.error(
            "download of {digest} from {source} failed: {why} (sources: {sources})",
            digest=str(download.digest),
            source=download.source,
            why=why,
            sources=download.attempts.summary(),
        )
        self._unclaim(download)
        download.writer.discard()
        download.state = "failed"
        self._downloads.pop(download.digest, None)
        download.notify()

    def _record_tag(
        self,
        namespace: str,
        repository: str,
        tag: str,
        digest: Digest,
        confirmed: float | None = None,
    ) -> None:
        """Keep the origin's answer on disk (confirmed now, unless said)."""
        if not self.store.writable():
            return
        if confirmed is None:
            confirmed = self.clock.seconds()
        try:
            self.store.set_tag(namespace, repository, tag, digest, confirmed)
        except OSError as error:
            self.store.degrade(error)

    def _touch(self, digest: Digest) -> None:
        """Mark a blob of the shared store used (for its eviction)."""
        if self.coordinator is None or self.shared_max_size is None:
            return
        self._tell_redis(self.coordinator.touch(digest), "mark a blob used")

    def _tell_redis(self, call: Coroutine[Any, Any, None], what: str) -> None:
        """Run a Redis call without waiting for it: with Redis down it is
        dropped (the node works alone), any other failure is logged."""
        Deferred.fromCoroutine(call).addErrback(
            lambda failure: failure.trap(CoordinatorDown)
        ).addErrback(lambda failure: self.log.failure(f"cannot {what}", failure))

    async def evict_shared(self) -> int:
        """
        Delete the shared store's least recently used blobs while it holds
        more than ``shared_max_size`` (by the index in Redis; every node
        may do this, deleting twice is harmless).

        :return: how many blobs went.
        """
        coordinator, shared, limit = (
            self.coordinator,
            self.shared,
            self.shared_max_size,
        )
        if coordinator is None or shared is None or limit is None:
            return 0
        if self._evicting_shared:
            return 0
        self._evicting_shared = True
        evicted = 0
        try:
            total = await coordinator.total_size()
            for _ in range(MAX_SHARED_EVICTIONS // 16):
                if total <= limit:
                    break
                victims = await coordinator.least_recently_used(16)
                if not victims:
                    break
                for digest, size in victims:
                    await shared.delete_blob(digest)
                    await coordinator.forget(digest)
                    total -= size
                    evicted += 1
                    if total <= limit:
                        break
        except (CoordinatorDown, S3Error) as e:
            self.log.warn("shared store eviction stopped: {why}", why=str(e))
        finally:
            self._evicting_shared = False
        if evicted:
            self.log.info("evicted {count} blobs from the shared store", count=evicted)
        return evicted

    def housekeep(self) -> None:
        """Evict least recently used content if the cache is over its limits."""
        if self.shared_max_size is not None:
            Deferred.fromCoroutine(self.evict_shared()).addErrback(
                lambda failure: self.log.failure("shared eviction failed", failure)
            )
        if self._evicting or not self.store.over_limit():
            return
        self._evicting = True

        def done(result: object) -> None:
            self._evicting = False
            if isinstance(result, Failure):
                self.log.failure("eviction failed", result)
                return
            evicted: list[Entry] = result  # type: ignore[assignment]
            self.metrics.evictions.inc(len(evicted))
            self.metrics.evicted_bytes.inc(sum(e.size for e in evicted))

        d = self.run_in_thread(self.store.by_last_use)
        d.addCallback(self.store.evict).addBoth(done)

    # -- tags ---------------------------------------------------------------

    async def resolve_tag(
        self, pool: UpstreamPool, repository: str, tag: str
    ) -> TagAnswer:
        """
        What a tag points at.  The origin decides; its answer is reused for
        ``tag_ttl`` and recorded on disk.  When the origin cannot be reached
        the namespace's policy applies: ``freshest`` takes the newest image
        among the cached answer (if younger than ``max_stale``) and the
        mirrors not known to be stale, ``cache`` only the cached answer,
        ``fail`` nothing.

        :return: the answer; its ``upstream`` says where it came from:
            an upstream's name, or ``"cache"``.
        :raises ManifestUnknown: when the origin says the tag does not exist.
        """
        key = (pool.namespace, repository, tag)
        remembered = self._tags.get(key)
        if remembered is not None and self.clock.seconds() < remembered[1]:
            return remembered[0]

        async def ask() -> TagAnswer:
            shared = await self._cluster_tag(pool, repository, tag)
            if shared is not None:
                answer, confirmed = shared
                # Kept like our own answer, for when the origin is down.
                self._record_tag(
                    pool.namespace, repository, tag, answer.digest, confirmed
                )
                self._tags[key] = (answer, confirmed + self.tag_ttl)
                return answer
            started = self.clock.seconds()
            try:
                answer = await pool.resolve_tag(repository, tag)
            except NotFoundAnywhere:
                raise ManifestUnknown(
                    f"{repository}:{tag} is unknown upstream"
                ) from None
            except OriginUnreachable as unreachable:
                answer = await self._without_origin(pool, repository, tag, unreachable)
            else:
                self.metrics.tag_checks.labels(pool.namespace).observe(
                    self.clock.seconds() - started
                )
                if answer.manifest is not None:
                    self.store_manifest(answer.manifest)
                self._record_tag(pool.namespace, repository, tag, answer.digest)
                await self._share_tag(pool, repository, tag, answer.digest)
            self._tags[key] = (answer, self.clock.seconds() + self.tag_ttl)
            return answer

        return await self._tag_flight.run(key, ask)

    async def _cluster_tag(
        self, pool: UpstreamPool, repository: str, tag: str
    ) -> tuple[TagAnswer, float] | None:
        """Another node's answer from the origin, while younger than tag_ttl."""
        if self.coordinator is None or self.tag_ttl <= 0:
            return None
        try:
            shared = await self.coordinator.tag(pool.namespace, repository, tag)
        except CoordinatorDown:
            return None
        if shared is None or self.clock.seconds() - shared[1] >= self.tag_ttl:
            return None
        return TagAnswer(shared[0], CLUSTER), shared[1]

    async def _share_tag(
        self, pool: UpstreamPool, repository: str, tag: str, digest: Digest
    ) -> None:
        if self.coordinator is None or self.tag_ttl <= 0:
            return
        try:
            await self.coordinator.set_tag(
                pool.namespace,
                repository,
                tag,
                digest,
                self.clock.seconds(),
                self.tag_ttl,
            )
        except CoordinatorDown:
            pass

    async def _without_origin(
        self,
        pool: UpstreamPool,
        repository: str,
        tag: str,
        unreachable: OriginUnreachable,
    ) -> TagAnswer:
        """Apply the namespace's policy for a tag the origin did not answer."""
        candidates: list[TagAnswer] = []
        record = self.store.tag(pool.namespace, repository, tag)
        if (
            record is not None
            and self.clock.seconds() - record.confirmed <= pool.max_stale
        ):
            candidates.append(TagAnswer(record.digest, CACHE))
        if pool.origin_unreachable == "freshest":
            candidates += unreachable.answers
        elif pool.origin_unreachable == "fail":
            candidates = []
        if not candidates:
            raise unreachable.error
        chosen = candidates[0]
        if len({c.digest for c in candidates}) > 1:
            chosen = await self._freshest(pool, repository, candidates)
        if chosen.manifest is not None:
            self.store_manifest(chosen.manifest)
        self.log.warn(
            "{namespace}: origin unreachable ({why}); {repository}:{tag} answered "
            "by {source} as {digest}",
            namespace=pool.namespace,
            why=str(unreachable),
            repository=repository,
            tag=tag,
            source=chosen.upstream,
            digest=str(chosen.digest),
        )
        return chosen

    async def _freshest(
        self, pool: UpstreamPool, repository: str, candidates: list[TagAnswer]
    ) -> TagAnswer:
        """The candidate whose image was created last (the first on a tie)."""
        dated = []
        for position, candidate in enumerate(candidates):
            try:
                created = await self._created(pool, repository, candidate)
            except Exception as e:  # an unreadable candidate just loses
                self.log.info(
                    "cannot date {digest}: {why}", digest=str(candidate.digest), why=e
                )
                continue
            dated.append((created, -position, candidate))
        if not dated:
            return candidates[0]
        return max(dated, key=lambda entry: (entry[0], entry[1]))[2]

    async def _created(
        self, pool: UpstreamPool, repository: str, candidate: TagAnswer
    ) -> float:
        """When an image was built, from its config (an index: its first image)."""
        manifest = candidate.manifest or await self.manifest(
            pool, repository, candidate.digest
        )
        if manifest.media_type in INDEX_TYPES:
            entries = load_json(manifest.body)["manifests"]
            child = parse_digest(entries[0]["digest"])
            manifest = await self.manifest(pool, repository, child)
        config = parse_digest(load_json(manifest.body)["config"]["digest"])
        source = await self.blob(pool, repository, config)
        if source.download is not None:
            while source.download.state == "running":
                await source.download.changed()
            if source.download.state != "done":
                raise DownloadFailed(f"config {config} did not arrive")
        with open(self.store.blob_path(config), "rb") as f:
            created = load_json(f.read(MAX_CONFIG_SIZE))["created"]
        return parse_timestamp(created)

    # -- manifests ----------------------------------------------------------

    async def manifest(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> Manifest:
        """
        A manifest by digest: from the store, else from upstream (stored).

        :raises ManifestUnknown: when no upstream has it.
        """
        cached = self.store.manifest(digest)
        if cached is not None:
            self._lookup("manifest", "hit")
            return Manifest(digest, *cached)

        async def fetch() -> Manifest:
            if self.shared is not None:
                try:
                    shared = await self.shared.manifest(digest)
                except S3Error as e:
                    self.log.warn("shared store: {why}", why=str(e))
                else:
                    if shared is not None:
                        manifest = Manifest(digest, *shared)
                        self.store_manifest(manifest, share=False)
                        return manifest
            try:
                manifest = await pool.manifest(repository, digest)
            except NotFoundAnywhere:
                raise ManifestUnknown(
                    f"manifest {digest} is unknown upstream"
                ) from None
            self.store_manifest(manifest)
            return manifest

        key = (pool.namespace, digest)
        self._lookup("manifest", "joined" if key in self._manifests else "miss")
        return await self._manifests.run(key, fetch)

    def _lookup(self, kind: str, result: str) -> None:
        self.metrics.cache.labels(kind, result).inc()

    def store_manifest(self, manifest: Manifest, share: bool = True) -> None:
        """Keep a manifest, unless the cache cannot be written, and put it
        in the shared store (unless it came from there)."""
        if share and self.shared is not None:
            Deferred.fromCoroutine(
                self.shared.put_manifest(
                    manifest.digest, manifest.media_type, manifest.body
                )
            ).addErrback(
                lambda failure: self.log.warn(
                    "cannot put {digest} in the shared store: {why}",
                    digest=str(manifest.digest),
                    why=failure.getErrorMessage(),
                )
            )
        if not self.store.writable():
            return
        try:
            self.store.put_manifest(manifest.digest, manifest.media_type, manifest.body)
        except OSError as error:
            self.store.degrade(error)


class _CannotSpool(Exception):
    """The cache cannot take a new download now."""


class Relay:
    """
    Streams an upstream body straight to a client (``deliverBody``), with
    back-pressure, checking the digest on the way: the last chunk is held
    back until it matches, so a client never gets a complete wrong blob.

    :ivar done: fires when the client has every byte, or fails.
    """

    def __init__(
        self, consumer: Any, digest: Digest, count: Callable[[int], object]
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._consumer = consumer
        self._digest = digest
        self._hasher = digest.hasher()
        self._held = b""
        self._count = count

    def makeConnection(self, transport: Any) -> None:
        self._consumer.registerProducer(transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._hasher.update(data)
        if self._held:
            self._send(self._held)
        self._held = data

    def _send(self, data: bytes) -> None:
        self._consumer.write(data)
        self._count(len(data))

    def connectionLost(self, reason: Failure) -> None:
        self._consumer.unregisterProducer()
        if not reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(
                DownloadFailed(f"relay broke: {reason.getErrorMessage()}")
            )
        elif self._hasher.hexdigest() != self._digest.hex:
            self.done.errback(DownloadFailed(f"relayed bytes are not {self._digest}"))
        else:
            if self._held:
                self._send(self._held)
            self.done.callback(None)


@define(eq=False)
class _SpoolWriter:
    """Receives an upstream body into a download's spool (``deliverBody``)."""

    fetcher: Fetcher
    download: Download
    clock: IReactorTime
    idle_timeout: float
    #: bytes at the start of the body the spool already has
    skip: int = 0
    _transport: Any = None
    _idle: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport
        self._arm()

    def _arm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.clock.callLater(self.idle_timeout, self._stalled)

    def _stalled(self) -> None:
        download = self.download
        source = download.source
        if download.upstream is not None:
            source = f"upstream {source}"
        self.fetcher.log.warn(
            "{source} stalled on {digest}", source=source, digest=str(download.digest)
        )
        if self._transport is not None:
            self._transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.download.state != "running":
            return
        self._arm()
        self.fetcher.metrics.upstream_bytes.labels(self.download.source).inc(len(data))
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
            if not data:
                return
        limit = self.download.size or self.fetcher.max_blob_size
        if self.download.written + len(data) > limit:
            # More than announced, or an endless body without a length:
            # no blob is worth filling the disk for.
            self._abandon(f"the body went past {limit} bytes")
            return
        try:
            self.download.writer.write(data)
        except OSError as error:
            self.fetcher.store.degrade(error)
            self._abandon(f"cannot write to the spool: {error}")
            return
        self.download.appended()

    def _abandon(self, why: str) -> None:
        self.fetcher._fail(self.download, why)
        if self._transport is not None:
            self._transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.download.state == "running":
            self.fetcher._finish(self.download, reason)


def _open_source(source: BlobSource) -> IO[bytes]:
    """
    Open a blob source for reading.  A download's spool may have just been
    renamed into the cache, or thrown away.

    :raises DownloadFailed: when the bytes are gone.
    """
    try:
        return open(source.path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        if source.download is None:
            raise
    try:
        return open(source.download.spool.final_path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DownloadFailed(f"download of {source.download.digest} failed") from None


class BlobTail:
    """
    One reader's place in a blob, from the cache file or from a download's
    growing spool: how far it may read now, and what to do at that limit
    (wait for more, finish, or fail).  Subclasses move the bytes.

    :ivar done: fires when every byte was sent, or fails (the caller then
        breaks the connection so that the client sees an error, not a
        short "complete" body).
    """

    def __init__(
        self,
        source: BlobSource,
        start: int = 0,
        end: int | None = None,
        count: Callable[[int], object] | None = None,
    ) -> None:
        self._count = count
        self._download = source.download
        self._file: IO[bytes] = _open_source(source)
        self._position = start
        self._end = end
        self._stopped = False
        self._waiting = False
        self.done: Deferred[None] = Deferred()

    def _limit(self) -> int | None:
        """
        How far we may read now, or ``None`` for "to the end of the file".
        While the blob downloads, a range's last byte waits for the digest
        as the blob's does: a range is complete at its end, and must not be
        complete with bytes that turn out wrong.
        """
        download = self._download
        if download is None or download.state == "done":
            return self._end
        readable = download.readable
        return readable if self._end is None else min(readable, self._end - 1)

    def _sent(self, size: int) -> None:
        self._position += size
        if self._count is not None:
            self._count(size)

    def _at_limit(self) -> None:
        """Nothing more may be read now: finish, fail, or wait for more."""
        if not self._finished():
            self._wait()

    def _finished(self) -> bool:
        """At the read limit: are we done (or broken) rather than waiting?"""
        download = self._download
        if download is not None and download.state == "failed":
            self._abort(DownloadFailed(f"download of {download.digest} failed"))
            return True
        if (
            download is None
            or download.state == "done"
            or (self._end is not None and self._position >= self._end)
        ):
            self._complete()
            return True
        return False

    def _wait(self) -> None:
        download = self._download
        if download is None or self._waiting:
            return
        if download.state == "failed":
            self._abort(DownloadFailed(f"download of {download.digest} failed"))
            return
        self._waiting = True

        def woke(_: None) -> None:
            self._waiting = False
            if not self._stopped:
                self._more()

        # Enough for a large send, but never past what is asked for (a
        # range, or the whole blob, whose last byte comes at the end); a
        # range whose last byte alone is left waits for the end.
        wanted = self._position + WAKE_BYTES
        if self._end is not None:
            held = self._position >= self._end - 1
            wanted = UNTIL_END if held else min(wanted, self._end)
        download.changed(wanted).addCallback(woke)

    def _more(self) -> None:
        """The download grew or ended: carry on sending."""
        raise NotImplementedError

    def _complete(self) -> None:
        self._close()
        self.done.callback(None)

    def _abort(self, error: Exception) -> None:
        self._close()
        self.done.errback(error)

    def _close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._file.close()
        self._release()

    def _release(self) -> None:
        """Give the connection back (after the last byte, or on failure)."""

    def stopProducing(self) -> None:
        if not self._stopped:
            self._close()
            if not self.done.called:
                self.done.errback(DownloadFailed("the client went away"))


@implementer(IPushProducer)
class SpoolReader(BlobTail):
    """
    Streams bytes ``[start, end)`` of a blob to a consumer (a twisted.web
    request), reading it into memory a chunk at a time, with back-pressure.
    """

    def __init__(
        self,
        source: BlobSource,
        consumer: IConsumer,
        clock: IReactorTime,
        start: int = 0,
        end: int | None = None,
        count: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__(source, start, end, count)
        self._file.seek(start)
        self._consumer = consumer
        self._clock = clock
        self._paused = False
        self._pending: IDelayedCall | None = None

    def begin(self) -> None:
        self._consumer.registerProducer(self, True)
        self._pump()

    def _more(self) -> None:
        self._pump()

    def _pump(self) -> None:
        self._pending = None
        # Bounded work per turn so one fast client cannot starve the others.
        for _ in range(16):
            if self._paused or self._stopped:
                return
            limit = self._limit()
            if limit is not None and self._position >= limit:
                self._at_limit()
                return
            size = CHUNK if limit is None else min(CHUNK, limit - self._position)
            data = self._file.read(size)
            if not data:
                if self._download is None or self._download.state == "done":
                    self._complete()
                    return
                self._wait()
                return
            self._sent(len(data))
            self._consumer.write(data)
        self._pending = self._clock.callLater(0, self._pump)

    def _release(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._consumer.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            if not self._waiting and self._pending is None:
                self._pump()
