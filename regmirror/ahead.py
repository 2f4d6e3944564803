"""
Pulling ahead: when an image manifest is served to a client, its config
and layers that are not cached start downloading, so that the client's own
requests for them, a moment later, find them cached or in flight.

A prefetch is an ordinary download of :mod:`regmirror.blobs` (the one
download per digest that a client's request joins: one upstream ``GET``
either way), started through the namespace that served the manifest (which
vouches for what it references: :mod:`regmirror.vouches`), from its
sources in their order.  It is a guess, so it gives way:

- at most ``[namespace:NAME] prefetch`` blobs ahead at once for each
  namespace in each process: a blob a client of this process asks for is
  no longer ahead, and its download (which the client joins) leaves its
  place to the next; the others wait their turn, and are dropped from the
  queue when meanwhile cached or under way;
- none that would take the cache past ``max_size`` (counting the downloads
  under way) or below ``min_free``: nothing is evicted for a guess;
- none while every upstream of the namespace is marked down or backing off
  after a 429 (a guess is not a breaker's probe);
- none for a digest another worker process is downloading (its spool is
  locked): a client's request follows that download, as it would anyway;
- none for a blob whose clients are sent to the cluster's bucket
  (``redirect = true``);
- and once running, a prefetch that no client has asked for is cancelled,
  the newest first, when a download of another blob starts here for
  anyone else (:meth:`Ahead.make_room`) and the downloads under way and
  that one would take the cache past ``max_size`` or below ``min_free``:
  its connection is closed and its spool discarded, and a client asking
  for its blob later starts a download of its own.

Each prefetch that is not started, and each that ends, is counted in
``regmirror_prefetch_total`` by namespace and result (:data:`RESULTS`).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror.blobs import Blobs
from regmirror.download import UNTIL_END
from regmirror.metrics import Metrics
from regmirror.pool import Manifest, UpstreamPool
from regmirror.reference import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Digest,
    descriptors,
    parse_digest,
)
from regmirror.responses import discard
from regmirror.store import Store

#: The manifests whose blobs are fetched ahead: a single image's (an index
#: names manifests for every platform, of which a client pulls one).
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

#: The values of ``regmirror_prefetch_total``'s ``result`` label.
RESULTS = ("fetched", "failed", "full", "down", "busy", "cancelled")

#: Blobs waiting for their turn, per namespace; beyond, they are not queued.
MAX_WAITING = 1000
#: Manifests remembered as having every blob here (not looked at again
#: while remembered: a blob evicted since is fetched by its client).
MAX_COMPLETE = 10_000

#: Layers a registry does not serve (Windows' foreign layers): a client
#: fetches them from the descriptor's ``urls``, if at all.
_NOT_SERVED = ("foreign", "nondistributable")


@frozen
class _Wanted:
    """One blob to fetch ahead, through the namespace that served it."""

    pool: UpstreamPool
    repository: str
    digest: Digest
    size: int


@define(eq=False)
class _Lane:
    """One namespace's prefetches: those running, those waiting."""

    limit: int
    #: prefetches started that no client has asked for yet
    running: int = 0
    waiting: deque[_Wanted] = field(factory=deque)
    #: the digests waiting or running
    planned: set[Digest] = field(factory=set)


@define(eq=False)
class Ahead:
    """Fetches the blobs of served image manifests ahead of their clients."""

    blobs: Blobs
    store: Store
    clock: IReactorTime
    metrics: Metrics
    _lanes: dict[str, _Lane] = field(factory=dict)
    #: the size each prefetch under way is expected to add to the cache
    _reserved: dict[Digest, int] = field(factory=dict)
    #: the prefetches under way that no client has asked for yet, the
    #: oldest first
    _ahead: dict[Digest, _Lane] = field(factory=dict)
    #: the prefetches cancelled for another download, until they end
    _cancelled: set[Digest] = field(factory=set)
    #: (namespace, manifest) whose blobs were all here when last served,
    #: at most MAX_COMPLETE, the least recently served first
    _complete: OrderedDict[tuple[str, Digest], None] = field(factory=OrderedDict)
    log = Logger()

    def served(
        self, pool: UpstreamPool, repository: str, manifest: Manifest, limit: int
    ) -> None:
        """
        *manifest* was served to a client through *pool*'s namespace (a
        ``GET``): fetch its config and layers that are not here, at most
        *limit* at once for the namespace.  Returns at once, having queued
        those neither cached nor downloading here (a ``stat`` each; a
        manifest found complete is remembered, and not even parsed when
        served again): the first starts once the reactor has sent the
        answer on its way, and nothing here can fail the client's request.
        """
        if limit <= 0 or manifest.media_type not in IMAGE_TYPES:
            return
        try:
            self._queue(pool, repository, manifest, limit)
        except Exception:
            self.log.failure(
                "cannot fetch the blobs of {digest} ahead", digest=str(manifest.digest)
            )

    def asked(self, digest: Digest) -> None:
        """
        A client of this process asks for *digest* (a ``GET``): if it is
        being fetched ahead, the download is the client's now, and its
        place goes to the next blob waiting (once the reactor is free).
        """
        lane = self._ahead.pop(digest, None)
        if lane is not None:
            lane.running -= 1
            self.clock.callLater(0, self._next, lane)

    def make_room(self, digest: Digest, size: int | None) -> None:
        """
        A download of *digest*, *size* bytes (``None``: unknown, taken as
        0), is starting here, not a prefetch's: while it and the downloads
        under way would take the cache past ``max_size`` or below
        ``min_free``, cancel the prefetches running that no client asked
        for, the newest first.  Their places go to the next blobs waiting
        once the reactor is free (when that download counts among those
        under way).
        """
        if digest in self._ahead:
            return  # a prefetch starting its own download
        for ahead in reversed(list(self._ahead)):
            if self._fits(size or 0, {}):
                return
            # Marked first: the prefetch may end within the call.
            self._cancelled.add(ahead)
            if not self.blobs.cancel(ahead, f"room for {digest}"):
                self._cancelled.discard(ahead)  # not downloading yet

    def _queue(
        self, pool: UpstreamPool, repository: str, manifest: Manifest, limit: int
    ) -> None:
        namespace = pool.namespace
        if (namespace, manifest.digest) in self._complete:
            self._complete.move_to_end((namespace, manifest.digest))
            return
        lane = self._lanes.get(namespace)
        if lane is None:
            lane = self._lanes[namespace] = _Lane(limit)
        lane.limit = limit
        queued, everything_here = False, True
        for digest, size in contents(manifest.body):
            # Only the cheap looks here; another process's download is
            # looked for when its turn comes.
            if self.store.has_blob(digest):
                continue
            everything_here = False
            if digest in lane.planned or self.blobs.underway(digest):
                continue
            if len(lane.waiting) >= MAX_WAITING:
                self._count(namespace, "busy")
                continue
            lane.waiting.append(_Wanted(pool, repository, digest, size))
            lane.planned.add(digest)
            queued = True
        if queued:
            self.clock.callLater(0, self._next, lane)
        if everything_here:
            # The warm path, which from now on parses nothing.
            self._complete[(namespace, manifest.digest)] = None
            while len(self._complete) > MAX_COMPLETE:
                self._complete.popitem(last=False)

    def _here(self, digest: Digest) -> bool:
        """Is *digest* cached, or on its way (this process, or another)?"""
        return (
            self.store.has_blob(digest)
            or self.blobs.underway(digest)
            or not self.store.spool_abandoned(self.store.spool_path(digest))
        )

    def _next(self, lane: _Lane) -> None:
        """Start waiting prefetches while the lane has room; those cached or
        on their way meanwhile are dropped without a count."""
        while lane.running < lane.limit and lane.waiting:
            wanted = lane.waiting.popleft()
            try:
                result = "here" if self._here(wanted.digest) else self._refused(wanted)
            except Exception:
                self.log.failure(
                    "cannot fetch {digest} ahead", digest=str(wanted.digest)
                )
                result = "failed"
            if result is not None:
                lane.planned.discard(wanted.digest)
                if result != "here":
                    self._count(wanted.pool.namespace, result)
                continue
            lane.running += 1
            self._ahead[wanted.digest] = lane
            self._reserved[wanted.digest] = wanted.size
            self.log.debug(
                "{namespace}: fetching {digest} of {repository} ahead",
                namespace=wanted.pool.namespace,
                digest=str(wanted.digest),
                repository=wanted.repository,
            )
            d = Deferred.fromCoroutine(self._fetch(wanted))
            d.addErrback(self._crashed, wanted)
            d.addCallback(self._ended, lane, wanted)
            d.addErrback(lambda f: self.log.failure("pulling ahead", f))

    def _refused(self, wanted: _Wanted) -> str | None:
        """Why *wanted* is not to be fetched now (a result), if it is not."""
        if not self.store.writable() or not self._fits(wanted.size, self._reserved):
            return "full"
        if not any(
            u.breaker.opened == 0 and u.backing_off() is None
            for u in wanted.pool.upstreams
        ):
            return "down"
        return None

    def _fits(self, size: int, reserved: dict[Digest, int]) -> bool:
        """
        Would *size* more bytes, with what the downloads under way and the
        prefetches *reserved* (digest: size; downloads or not yet) will add
        once cached, keep the cache within ``max_size`` and ``min_free``?
        """
        store = self.store
        downloads = self.blobs.downloads
        pending = sum(reserved.values()) + sum(
            d.written if d.size is None else d.size
            for d in downloads
            if d.digest not in reserved
        )
        coming = pending - sum(d.written for d in downloads)
        if store.max_size is not None and store.size + pending + size > store.max_size:
            return False
        if store.min_free is not None:
            try:
                free = store.free_space()
            except OSError:
                return False
            if free - coming - size < store.min_free:
                return False
        return True

    async def _fetch(self, wanted: _Wanted) -> str | None:
        """Download *wanted* (or join its download); the result, if any."""
        sources = self.blobs.sources
        try:
            if sources.redirects and await sources.redirect(wanted.digest):
                # Its client will be sent to the bucket (``redirect =
                # true``): the bytes are not to flow through this node.
                return None
            source = await self.blobs.blob(
                wanted.pool, wanted.repository, wanted.digest, guess=True
            )
        except Exception as e:
            self.log.warn(
                "{namespace}: cannot fetch {digest} ahead: {why}",
                namespace=wanted.pool.namespace,
                digest=str(wanted.digest),
                why=str(e) or type(e).__name__,
            )
            return "failed"
        if source.relay is not None:
            # The cache could not take it after all: nobody reads this.
            discard(source.relay)
            return "full"
        download = source.download
        if download is None:
            return "fetched"
        while download.state == "running":
            await download.changed(UNTIL_END)
        return "fetched" if download.state == "done" else "failed"

    def _crashed(self, failure: Failure, wanted: _Wanted) -> str:
        self.log.failure("fetching {digest} ahead", failure, digest=str(wanted.digest))
        return "failed"

    def _ended(self, result: str | None, lane: _Lane, wanted: _Wanted) -> None:
        if self._ahead.pop(wanted.digest, None) is not None:
            lane.running -= 1
        self._reserved.pop(wanted.digest, None)
        lane.planned.discard(wanted.digest)
        if wanted.digest in self._cancelled:
            self._cancelled.discard(wanted.digest)
            self._count(wanted.pool.namespace, "cancelled")
            # Once the download it made room for counts among those
            # under way: it is not under way yet.
            self.clock.callLater(0, self._next, lane)
            return
        if result is not None:
            self._count(wanted.pool.namespace, result)
        self._next(lane)

    def _count(self, namespace: str, result: str) -> None:
        self.metrics.prefetch.labels(namespace, result).inc()


def contents(body: bytes) -> list[tuple[Digest, int]]:
    """
    An image manifest's config and layers that a registry serves, in that
    order (a client asks for the config first), with the sizes the
    manifest gives; nothing for a body that is no such document, and no
    entry without a digest and size.
    """
    found: list[tuple[Digest, int]] = []
    seen: set[Digest] = set()
    for descriptor in descriptors(body, "layers"):
        media_type = str(descriptor.get("mediaType", ""))
        size = descriptor.get("size")
        if any(word in media_type for word in _NOT_SERVED):
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            continue
        try:
            digest = parse_digest(str(descriptor.get("digest")))
        except Exception:  # a malformed entry is nothing to fetch
            continue
        if digest not in seen:
            seen.add(digest)
            found.append((digest, size))
    return found
