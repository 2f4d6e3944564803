"""
Where a download's bytes come from.

:class:`Sources` is an ordered list of places, each asked in turn for a
blob's bytes from where its download stands, the namespace's upstreams
last (:class:`Upstreams`).  Which places come before the upstreams is
decided once, at construction (:func:`places`):

- a node alone: none, the upstreams only;
- with the cluster's bucket (``[cache] backend = s3``): the bucket;
- with ``[cluster]``: then the node that holds the digest's lease in Redis,
  streaming the blob while it downloads it (:class:`Leases`); when no node
  holds it, this node takes the lease, looks in the bucket once more
  (another node may have put the blob there and let go of the lease since
  the first look), and downloads from the upstreams.

A transfer that breaks goes on where it stopped, from the list again
(:mod:`regmirror.blobs`): each place knows what it already gave the
download, and the upstreams come in the order its attempts give.
Before all of these, a download another worker process of this machine
runs is followed through its spool (:mod:`regmirror.siblings`): that is no
place to open a transfer from, but a download of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from regmirror.bucket import Bucket, in_background
from regmirror.cluster import Coordinator, CoordinatorDown, Lease
from regmirror.download import PEER_PREFIX, Download
from regmirror.errors import BlobUnknown, RegistryError
from regmirror.nodes import Peers, PeerUnavailable
from regmirror.pool import NotFoundAnywhere, UpstreamPool
from regmirror.reference import Digest
from regmirror.responses import discard, header
from regmirror.upstream import Upstream, UpstreamFailure

#: How many times a node asks again for a digest's lease while the node
#: holding it does not answer, CLAIM_POLLS_PER_TTL times per ``lease_ttl``
#: (a dead node's lease expires within ``lease_ttl``).
CLAIM_POLLS = 12
CLAIM_POLLS_PER_TTL = 4

#: How many digests' bad upstreams are remembered.
MAX_TAINTED = 10_000


class Place(Protocol):
    """A place before the upstreams where a blob's bytes may be."""

    @property
    def redirects(self) -> bool:
        """Does this place ever take clients itself (:meth:`redirect`)?"""

    async def open(self, download: Download) -> IResponse | None:
        """
        The blob's bytes from ``download.written`` on, having set
        ``download.source``; ``None``: ask the next place.
        """

    async def size(self, digest: Digest) -> int | None:
        """The blob's size, if this place knows it without an upstream."""

    async def redirect(self, digest: Digest) -> str | None:
        """Where to send a client for the blob instead, if anywhere."""

    async def kept(self, download: Download) -> None:
        """The download is verified and in the cache."""

    def dropped(self, download: Download) -> None:
        """The download failed, or never started."""


def _range_total(response: IResponse) -> int | None:
    """The blob's size a 206 answer's ``Content-Range`` gives, if it does."""
    text = header(response, "Content-Range") or ""
    total = text.rpartition("/")[2].strip()
    return int(total) if total.isascii() and total.isdigit() else None


@define(eq=False)
class Upstreams:
    """
    The namespace's upstreams, the last place: in the order the download's
    attempts give (:meth:`regmirror._attempts.Attempts.next_order`),
    without those that served wrong bytes for the digest.
    """

    #: digest → upstreams that served wrong bytes for it
    _tainted: dict[Digest, set[str]] = field(factory=dict)
    log = Logger()

    async def open(self, download: Download) -> IResponse:
        """
        The blob's bytes from ``download.written`` on, from the first
        upstream with an answer; for a download resumed, at last those
        marked down too, rather than fail a download that progresses.

        :raises NotFoundAnywhere: when no upstream has it.
        """
        pool = download.pool
        assert pool is not None, "a follower opens nothing"
        order = download.attempts.next_order(self.trusted(pool, download.digest))
        plan = None
        if download.written == 0 and not download.resumed and order:
            plan = await self._plan(download, pool, order[0])
        upstream, response = await pool.open_blob(
            download.repository,
            download.digest,
            download.written,
            order,
            last_resort=download.resumed > 0,
            end=None if plan is None else plan[0][1],
        )
        if plan is not None and response.code == 206:
            # Else an upstream that ignores Range sends the whole blob: one GET.
            total = _range_total(response)
            if total == plan[-1][1]:
                download.segments = plan
            else:
                # The HEAD's size was not the blob's: no plan holds, one GET.
                self.log.warn(
                    "upstream {upstream}: {digest} is {total} bytes by its "
                    "ranges, not {size} as its HEAD said; fetching it in one GET",
                    upstream=upstream.name,
                    digest=str(download.digest),
                    total=total,
                    size=plan[-1][1],
                )
                discard(response)
                upstream, response = await pool.open_blob(
                    download.repository, download.digest, 0, [upstream]
                )
        download.source, download.upstream = upstream.name, upstream
        return response

    async def _plan(
        self, download: Download, pool: UpstreamPool, first: Upstream
    ) -> list[tuple[int, int]] | None:
        """
        The segments a new download is fetched in, when the first upstream
        to ask takes ``segments`` and the blob (its size asked with a
        ``HEAD``) is at least its ``segment_min_size``; else ``None``.
        """
        config = first.config
        if config.segments <= 1:
            return None
        size = download.size
        if size is None:
            try:
                size = await pool.blob_size(download.repository, download.digest)
            except (NotFoundAnywhere, RegistryError):
                return None  # the GET says why
        if size < max(config.segment_min_size, config.segments):
            return None
        step = -(-size // config.segments)
        return [(start, min(size, start + step)) for start in range(0, size, step)]

    async def size(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """
        The blob's size as the first upstream that has it says (HEAD), if
        it does.

        :raises BlobUnknown: when no upstream has it.
        """
        try:
            return await pool.blob_size(repository, digest)
        except NotFoundAnywhere:
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None

    def trusted(self, pool: UpstreamPool, digest: Digest) -> list[Upstream]:
        """The pool's upstreams, without those that served *digest* wrongly
        (all of them again if every one did)."""
        tainted = self._tainted.get(digest, set())
        trusted = [u for u in pool.upstreams if u.name not in tainted]
        return trusted or list(pool.upstreams)

    def taint(self, download: Download) -> None:
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


@define(eq=False)
class Sources:
    """The places a blob's bytes may come from, in order; the upstreams last."""

    upstreams: Upstreams = field(factory=Upstreams)
    places: Sequence[Place] = ()
    log = Logger()

    async def open(self, download: Download) -> IResponse:
        """
        The blob's bytes from ``download.written`` on, from the first place
        that has them.  Sets the download's ``source`` and ``upstream``.

        :raises NotFoundAnywhere: when no upstream has it.
        """
        for place in self.places:
            response = await place.open(download)
            if response is not None:
                return response
        return await self.upstreams.open(download)

    async def size(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """
        The blob's size, from the first place that knows it.

        :raises BlobUnknown: when no upstream has it.
        """
        for place in self.places:
            size = await place.size(digest)
            if size is not None:
                return size
        return await self.upstreams.size(pool, repository, digest)

    @property
    def redirects(self) -> bool:
        """Is a client ever sent elsewhere (``redirect = true``)?"""
        return any(place.redirects for place in self.places)

    async def redirect(self, digest: Digest) -> str | None:
        """Where to send a client for the blob instead of serving it, if
        anywhere (``redirect = true``: the bucket)."""
        for place in self.places:
            location = await place.redirect(digest)
            if location is not None:
                return location
        return None

    async def kept(self, download: Download) -> None:
        """
        The download is verified and in the cache: each place in order
        does what it does then (the bucket takes a blob from an upstream
        before the lease on it goes), whatever the others did.
        """
        for place in self.places:
            try:
                await place.kept(download)
            except Exception:
                self.log.failure(
                    "cannot share a blob: {digest}", digest=str(download.digest)
                )

    def dropped(self, download: Download) -> None:
        """The download failed, or never started."""
        for place in self.places:
            place.dropped(download)


@define(eq=False)
class Leases:
    """
    The other nodes, through the digest's lease in Redis: while a node holds
    it, it downloads the blob and the others stream it from that node;
    when none does, this node takes the lease and the places after this one
    are asked under it.  With Redis down, this node works alone.
    """

    coordinator: Coordinator
    peers: Peers
    clock: IReactorTime
    #: clients are never sent to another node
    redirects = False
    log = Logger()

    async def open(self, download: Download) -> IResponse | None:
        """
        Claim the digest for this node, or open it from the node that holds
        it.  ``None``: this node downloads it from upstream, with the lease
        (``download.lease``) or alone.
        """
        if download.lease is not None:
            return None
        coordinator, digest = self.coordinator, download.digest
        interval = coordinator.lease_ttl / CLAIM_POLLS_PER_TTL
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
                    await deferLater(self.clock, interval, lambda: None)
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
                response = await self.peers.open_blob(
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
                await deferLater(self.clock, interval, lambda: None)
                continue
            download.source = PEER_PREFIX + claim.url
            download.upstream = None
            return response
        self.log.warn(
            "the node holding {digest}'s lease never answered: downloading alone",
            digest=str(digest),
        )
        return None

    async def size(self, digest: Digest) -> None:
        """The other nodes are not asked for sizes."""
        return None

    async def redirect(self, digest: Digest) -> None:
        """Clients are never sent to another node."""
        return None

    async def kept(self, download: Download) -> None:
        """The lease goes: the other nodes take the blob from the bucket now."""
        self._release(download)

    def dropped(self, download: Download) -> None:
        """The lease goes: another node may try."""
        self._release(download)

    def _release(self, download: Download) -> None:
        """Give up the download's lease, if it has one."""
        lease, download.lease = download.lease, None
        if lease is not None:
            in_background(self.coordinator.release(lease), "release a lease", self.log)


@define(eq=False)
class _BucketAgain:
    """The bucket, looked at once more under the lease (see :func:`places`)."""

    bucket: Bucket
    redirects = False

    async def open(self, download: Download) -> IResponse | None:
        return await self.bucket.open_again(download)

    async def size(self, digest: Digest) -> None:
        return None

    async def redirect(self, digest: Digest) -> None:
        return None

    async def kept(self, download: Download) -> None:
        pass

    def dropped(self, download: Download) -> None:
        pass


def places(bucket: Bucket | None, leases: Leases | None) -> list[Place]:
    """The places before the upstreams, in order (see the module's text)."""
    found: list[Place] = []
    if bucket is not None:
        found.append(bucket)
    if leases is not None:
        found.append(leases)
        if bucket is not None:
            found.append(_BucketAgain(bucket))
    return found
