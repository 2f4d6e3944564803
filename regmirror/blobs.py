"""
Blobs as clients ask for them: one download per digest, any number of
readers.

:meth:`Blobs.blob` answers with the cached file, or with a download under
way in this process, which it starts or joins: any number of requests for
one digest share one download, whose spool each reader tails at its own
pace (:mod:`regmirror.readers`), so a slow client never slows the download
or the others.  A download another worker process runs is followed
(:mod:`regmirror.siblings`); when the cache cannot be written, an upstream
response is relayed to the client as it comes.

A download's bytes come from the first of its :class:`~regmirror.sources.Sources`
that has them.  Whatever the source, the bytes are verified here before
they count as cached.  A transfer that breaks goes on where it stopped,
from the sources again (the next upstream in the namespace's order, flaky
ones taking turns), for as long as attempts bring new bytes
(:class:`regmirror._attempts.Attempts` decides).

Downloads started ahead of clients (:mod:`regmirror.ahead`) are guesses:
a download that anyone else starts may :meth:`~Blobs.cancel` those that
no one else asked for, when the cache has no room for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, Protocol

from attrs import Factory, define, field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from regmirror._flight import SingleFlight
from regmirror._receiving import SpoolWriter
from regmirror._segments import Segmented
from regmirror._spool import SIZE_SUFFIX, DigestMismatch
from regmirror._spooling import CallFromThread, call_here
from regmirror.download import Download
from regmirror.errors import BlobUnknown, DownloadFailed, RegistryError
from regmirror.housekeeping import Housekeeping, RunInThread
from regmirror.metrics import Metrics
from regmirror.pool import NotFoundAnywhere, UpstreamPool
from regmirror.readers import BlobSource
from regmirror.reference import Digest
from regmirror.responses import discard
from regmirror.siblings import Siblings
from regmirror.sources import Sources
from regmirror.store import AlreadyCached, SpoolBusy, Store
from regmirror.upstream import Upstream, UpstreamFailure
from regmirror.vouches import Vouches

#: How long a source other than an upstream may stay silent mid-body.
IDLE_TIMEOUT = 60.0
#: The largest blob taken from an upstream that does not say its size
#: (``[cache] max_blob_size``).
MAX_BLOB_SIZE = 64 * 1024**3
#: How many blobs without a stated size that turned out too big for the
#: cache a process remembers, to relay them rather than download them again.
OVERSIZED_REMEMBERED = 1024
#: How many times a start goes round again after another process's start
#: of the same digest (for another namespace, maybe) came to nothing.
START_ROUNDS = 3


class _CannotSpool(Exception):
    """The cache cannot take a new download now."""


class _StartAgain(Exception):
    """Another process's start of the digest came to nothing: try ourselves."""


class _Uncached(Exception):
    """
    The blob is not to be cached (larger than the cache keeps, or the disk
    would go below ``min_free``): its response goes to the client who
    started it; the others who asked meanwhile relay their own.
    """

    def __init__(self, response: IResponse, upstream: Upstream) -> None:
        super().__init__()
        self._response: IResponse | None = response
        #: the upstream the response comes from
        self.upstream = upstream

    def take(self) -> IResponse | None:
        """The response, to the first who asks."""
        response, self._response = self._response, None
        return response


class Guesses(Protocol):
    """The downloads started ahead of clients (:class:`regmirror.ahead.Ahead`),
    told of everyone else's requests."""

    def asked(self, digest: Digest) -> None:
        """Someone, not a guess, asks for *digest*: a guess's download of it
        is theirs now."""

    def make_room(self, digest: Digest, size: int | None) -> None:
        """A download of *digest* of *size* bytes (``None``: unknown) is
        about to start in this process."""


class _NoGuesses:
    """Nothing is fetched ahead."""

    def asked(self, digest: Digest) -> None:
        pass

    def make_room(self, digest: Digest, size: int | None) -> None:
        pass


@define(eq=False)
class Blobs:
    """
    Serves blobs from the store, filling it from their sources with one
    download per digest.
    """

    store: Store
    clock: IReactorTime
    sources: Sources
    housekeeping: Housekeeping
    metrics: Metrics
    #: runs blocking work (appending to a spool, fsync of a finished blob)
    #: off the reactor thread
    run_in_thread: RunInThread = maybeDeferred
    max_blob_size: int = MAX_BLOB_SIZE
    #: which namespaces vouch for which digests
    vouches: Vouches = field(
        default=Factory(lambda self: Vouches(self.store), takes_self=True)
    )
    #: how a thread appending to a spool hands its progress to the reactor
    #: (``reactor.callFromThread``; with a synchronous ``run_in_thread``,
    #: a plain call)
    call_from_thread: CallFromThread = call_here
    #: the downloads started ahead of clients, which the others' requests
    #: take over or cancel
    guesses: Guesses = field(factory=_NoGuesses)
    _running: dict[Digest, Download] = field(factory=dict)
    #: the start of a download, one per namespace and digest: where the
    #: bytes come from (and a 404) is each namespace's own decision
    _starting: SingleFlight[tuple[str, Digest], Download] = field(factory=SingleFlight)
    #: digest → those waiting for the start under way in this process
    #: (of whichever namespace) to end, before they start their own
    _opening: dict[Digest, list[Deferred[None]]] = field(factory=dict)
    #: another process's download, followed once however many ask
    _following: SingleFlight[Digest, Download] = field(factory=SingleFlight)
    #: a namespace's upstreams asked whether they have a digest, once at a time
    _confirming: SingleFlight[tuple[str, Digest], int | None] = field(
        factory=SingleFlight
    )
    #: the blobs without a stated size that went past what the cache
    #: keeps, oldest first: relayed (see :meth:`oversized`)
    _oversized: dict[Digest, None] = field(factory=dict)
    _siblings: Siblings = field(init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._siblings = Siblings(self.store, self.clock, self._running)

    @property
    def downloads(self) -> list[Download]:
        """The downloads under way."""
        return list(self._running.values())

    async def blob(
        self, pool: UpstreamPool, repository: str, digest: Digest, guess: bool = False
    ) -> BlobSource:
        """
        A source for the blob's bytes: the cached file, or a download that
        this call starts or joins.  Whatever another namespace fetched is
        served through *pool*'s namespace only once it vouches for it
        (:mod:`regmirror.vouches`): else its upstreams are asked first.

        :param guess: for a download ahead of clients; else a guess's
            download of the blob becomes the caller's (:meth:`Guesses.asked`).
        :raises BlobUnknown: when no upstream of the namespace has it.
        """
        if not guess:
            self.guesses.asked(digest)
        key = (pool.voucher(repository), digest)
        # A start of this namespace's own under way is joined: no asking
        # (of this repository's, in a namespace that vouches per
        # repository: see UpstreamPool.voucher).
        vouched = key in self._starting or self._vouches_for(*key)
        if not vouched and self._elsewhere(digest):
            await self._confirm(pool, repository, digest)
        running = self._running.get(digest)
        if running is not None:
            self._lookup("joined")
            self._join(running, pool, repository)
            return BlobSource(running.size, running.spool.path, running, joined=True)
        size = self.store.blob_size(digest)
        if size is not None:
            self._lookup("hit")
            return BlobSource(size, self.store.blob_path(digest))

        async def start() -> Download:
            return await self._start(pool, repository, digest)

        # A lookup is counted once the blob comes (a 404 or a failure is
        # none: the access log's cache=-).
        joining = key in self._starting
        if not self.store.writable():
            return self._missed(await self.relay(pool, repository, digest))
        try:
            download = await self._starting.run(key, start)
        except _CannotSpool:
            return self._missed(await self.relay(pool, repository, digest))
        except _Uncached as uncached:
            response = None if joining else uncached.take()
            if response is None:
                return self._missed(await self.relay(pool, repository, digest))
            return self._missed(_relayed(response, uncached.upstream))
        except AlreadyCached:
            self._lookup("hit")
            return BlobSource(
                self.store.blob_size(digest), self.store.blob_path(digest)
            )
        # Started here, or joined: this namespace's start under way, a
        # download of another namespace's (its pool), another worker's
        # (followed, no pool).
        joined = joining or download.pool is not pool
        self._lookup("joined" if joined else "miss")
        if download.state == "done":
            return BlobSource(download.written, download.spool.final_path)
        return BlobSource(download.size, download.spool.path, download, joined=joined)

    def underway(self, digest: Digest) -> bool:
        """Is a download of *digest* under way or starting in this process
        (for whichever namespace)?"""
        return digest in self._running or digest in self._opening

    def _elsewhere(self, digest: Digest) -> bool:
        """
        Is *digest* here already, from whichever namespace: in this cache,
        or a download under way or starting in this process?  (Then the
        asking namespace must vouch for it first.  The bucket and the other
        nodes are asked in :meth:`_open`.)
        """
        return (
            digest in self._running
            or digest in self._opening
            or self.store.has_blob(digest)
        )

    def _vouches_for(self, namespace: str, digest: Digest) -> bool:
        """
        Does *namespace* (a voucher: :meth:`UpstreamPool.voucher`) vouch for
        *digest*: on record, or by a download of it under way here that is
        its own or that it joined?
        """
        running = self._running.get(digest)
        if running is not None and (
            (
                running.pool is not None
                and running.pool.voucher(running.repository) == namespace
            )
            or namespace in running.vouchers
            or namespace in running.joined
        ):
            return True
        return self.vouches.has(namespace, digest)

    async def _confirm(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """
        Ask the namespace's upstreams whether they have *digest* (``HEAD``,
        once at a time per namespace and digest); if one does, the
        namespace vouches for it from now on.  Only an answer with the size
        the mirror knows (the cached file's, a download's announced size)
        counts: see :meth:`UpstreamPool.blob_size`.

        :return: the size the upstream says.
        :raises BlobUnknown: when none has it.
        """
        namespace = pool.voucher(repository)

        async def ask() -> int | None:
            try:
                size = await pool.blob_size(repository, digest, self._known(digest))
            except NotFoundAnywhere:
                raise BlobUnknown(
                    f"blob {digest} is unknown to every upstream of {pool.namespace}"
                ) from None
            self._vouched(namespace, digest)
            return size

        return await self._confirming.run((namespace, digest), ask)

    def _known(self, digest: Digest) -> int | None:
        """The size of *digest* as this machine knows it: a download's here,
        the cached file's, another worker's announced one."""
        running = self._running.get(digest)
        if running is not None and running.size is not None:
            return running.size
        size = self.store.blob_size(digest)
        if size is not None:
            return size
        path = self.store.spool_path(digest)
        if self.store.spool_abandoned(path):
            return None  # a size left by a process that died: not known
        try:
            with open(path + SIZE_SUFFIX, "rb") as f:
                return int(f.read(32))
        except (OSError, ValueError):
            return None

    def _vouched(self, namespace: str, digest: Digest) -> None:
        """*namespace*'s upstream confirmed *digest*: record it with the
        content (at once when cached, at the end of a download under way
        here), else remember it."""
        running = self._running.get(digest)
        if running is not None and not running.follower:
            self.vouches.remember(namespace, digest)
            running.vouchers.add(namespace)
        elif self.store.has_blob(digest):
            self.vouches.add(namespace, [digest])
        else:
            self.vouches.remember(namespace, digest)

    async def _vouch(self, pool: UpstreamPool, repository: str, digest: Digest) -> None:
        """Make sure the namespace vouches for *digest*: asking, if need be."""
        if not self._vouches_for(pool.voucher(repository), digest):
            await self._confirm(pool, repository, digest)

    async def size(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> int | None:
        """
        The blob's size without downloading it (HEAD).  A download under
        way in the namespace answers: with the size its source stated,
        else once it is cached (its upstream may state none to a HEAD
        either, and a HEAD answer without a length is no answer).

        :raises BlobUnknown: when no upstream of the namespace has it.
        """
        # A start under way (its source's answer not in yet) is waited for:
        # the download it makes answers.
        await self._opened(digest)
        if not self._vouches_for(pool.voucher(repository), digest):
            # Its own upstreams, not what the bucket knows.
            return await self._confirm(pool, repository, digest)
        size = self._known(digest)
        if size is not None:
            return size
        running = self._running.get(digest)
        if running is not None:
            size = await running.sized()
            if size is not None:
                return size
        return await self.sources.size(pool, repository, digest)

    async def redirect(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> str | None:
        """
        Where to send a client for a blob that this node's cache does not
        have (``redirect = true``: to the bucket, if it has the blob, and
        the namespace vouches for it), else ``None``.

        :raises BlobUnknown: when the namespace does not vouch for a blob
            that the bucket has, nor do its upstreams have it.
        """
        if not self.sources.redirects:
            return None
        if digest in self._running or self.store.blob_size(digest) is not None:
            return None
        location = await self.sources.redirect(digest)
        if location is not None:
            await self._vouch(pool, repository, digest)
            self._lookup("redirect")
        return location

    async def local(self, digest: Digest) -> BlobSource | None:
        """
        What this node has of *digest* without asking anyone: its cache,
        its own download, another worker's.  For the other nodes, so never
        what this node itself takes from another node; a guess's download
        is theirs then (:meth:`Guesses.asked`).
        """
        self.guesses.asked(digest)
        await self._opened(digest)
        running = self._running.get(digest)
        if running is None:
            size = self.store.blob_size(digest)
            if size is not None:
                return BlobSource(size, self.store.blob_path(digest))
            path = self.store.spool_path(digest)
            if self.store.spool_abandoned(path):
                return None
            running = await self._follow(digest, path)
        if running.from_peer or running.state == "failed":
            return None
        if running.state == "done":
            return BlobSource(running.written, running.spool.final_path)
        return BlobSource(running.size, running.spool.path, running)

    def _lookup(self, result: str) -> None:
        self.metrics.cache.labels("blob", result).inc()

    def _missed(self, source: BlobSource) -> BlobSource:
        self._lookup("miss")
        return source

    # -- one download ---------------------------------------------------------

    async def _start(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> Download:
        """
        Start the namespace's download of *digest*, or join one that began
        meanwhile (another namespace's, once this one vouches for it).  A
        start under way in this process for another namespace is waited
        for first: if it comes to nothing (a 404 there), this namespace
        still asks its own sources.
        """
        for _ in range(START_ROUNDS):
            await self._opened(digest)
            running = self._running.get(digest)
            if running is not None:
                await self._vouch(pool, repository, digest)
                self._join(running, pool, repository)
                return running
            waiting: list[Deferred[None]] = []
            self._opening[digest] = waiting
            try:
                return await self._open(pool, repository, digest)
            except _StartAgain:
                continue
            finally:
                del self._opening[digest]
                for waiter in waiting:
                    waiter.callback(None)
        raise DownloadFailed(f"other processes' downloads of {digest} kept failing")

    async def _opened(self, digest: Digest) -> None:
        """Return once no start of *digest* is under way in this process."""
        while digest in self._opening:
            ended: Deferred[None] = Deferred()
            self._opening[digest].append(ended)
            await ended

    async def _follow(self, digest: Digest, path: str) -> Download:
        """Another process's download of *digest*, followed once."""
        return await self._following.run(
            digest, lambda: self._siblings.follow(digest, path)
        )

    async def _open(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> Download:
        try:
            spool = self.store.spool(digest)
        except SpoolBusy as busy:
            # Another process downloads it, for whichever namespace.
            await self._vouch(pool, repository, digest)
            followed = await self._follow(digest, busy.path)
            if followed.state == "failed":
                raise _StartAgain() from None
            return followed
        except AlreadyCached:
            await self._vouch(pool, repository, digest)
            raise
        except OSError as error:
            self.store.degrade(error)
            raise _CannotSpool() from None
        download = Download(digest, spool, pool, repository, clock=self.clock)
        try:
            response = await self.sources.open(download)
        except NotFoundAnywhere:
            self.sources.dropped(download)
            spool.discard()
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None
        except BaseException:
            self.sources.dropped(download)
            spool.discard()
            raise
        if download.upstream is None:
            # From the bucket or another node, which hold every namespace's
            # blobs: only for a namespace that vouches for it.
            try:
                await self._vouch(pool, repository, digest)
            except BaseException:
                discard(response)
                self.sources.dropped(download)
                spool.discard()
                raise
        self.vouches.remember(pool.voucher(repository), digest)
        length = response.length
        download.size = length if isinstance(length, int) else None
        if download.segments is not None:
            download.size = download.segments[-1][1]
        target = self.store.eviction_target
        if target is not None and download.size is not None and download.size > target:
            self._not_caching(
                download,
                response,
                "more than the cache keeps after eviction (90% of max_size, "
                f"{target} bytes)",
            )
        if download.size is None and digest in self._oversized:
            self._not_caching(
                download,
                response,
                f"its body went past {target} bytes, 90% of max_size, last time",
            )
        # Before the look at min_free: what guesses give up is room for it.
        self.guesses.make_room(digest, download.size)
        if download.size is not None and not self.store.room_for(
            download.size, self._coming()
        ):
            self._not_caching(
                download,
                response,
                "the cache's file system would have less than min_free left",
            )
        spool.announce(download.size)
        self._running[digest] = download
        self.log.info(
            "downloading {digest} ({size} bytes) from {source}",
            digest=str(digest),
            size=download.size,
            source=download.source,
        )
        if download.segments is None:
            self._receive(download, response, skip=0)
        else:
            download.stop = Segmented.start(self, download, response).stop
        return download

    def _not_caching(
        self, download: Download, response: IResponse, why: str
    ) -> NoReturn:
        """
        *download* is not to be cached (too big for the cache, or for the
        disk): nothing is written, nothing evicted, and its response goes
        to the client as it comes (:class:`_Uncached`).
        """
        self.sources.dropped(download)
        download.writer.discard()
        size = download.size
        self.log.info(
            "not caching {digest} ({length}): {why}; relaying it",
            digest=str(download.digest),
            length="size not stated" if size is None else f"{size} bytes",
            size=size,
            why=why,
        )
        if download.segments is not None or download.upstream is None:
            discard(response)  # a segment, or no upstream's: relay anew
            raise _CannotSpool()
        raise _Uncached(response, download.upstream)

    def oversized(self, digest: Digest) -> None:
        """
        A body without a stated size went past what the cache keeps
        (:attr:`Store.eviction_target`): the next requests for *digest*
        are relayed, not downloaded into the cache again (remembered by
        this process, for the last :data:`OVERSIZED_REMEMBERED` such blobs).
        """
        self._oversized.pop(digest, None)
        self._oversized[digest] = None
        while len(self._oversized) > OVERSIZED_REMEMBERED:
            del self._oversized[next(iter(self._oversized))]

    async def relay(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        offset: int = 0,
        broke: Sequence[str] = (),
    ) -> BlobSource:
        """
        An upstream response to stream straight through, uncached: for a
        client when the cache cannot take the blob, to carry on with a
        client's body once the cache refused its download's bytes, or
        from *offset* on, for a relay whose upstream broke off (a ``206``,
        or a ``200`` with the whole blob), the upstreams that *broke* it
        (oldest first) asked last, the one that broke it longest ago first.

        :raises BlobUnknown: when no upstream of the namespace has it.
        """
        try:
            # Those that never broke it first, then the one that broke
            # longest ago: flaky ones take turns.
            last = {name: i for i, name in enumerate(broke)}
            order = sorted(pool.upstreams, key=lambda u: last.get(u.name, -1))
            upstream, response = await pool.open_blob(
                repository, digest, offset, order, last_resort=offset > 0
            )
        except NotFoundAnywhere:
            raise BlobUnknown(f"blob {digest} is unknown to every upstream") from None
        return _relayed(response, upstream)

    def _coming(self) -> int:
        """The bytes the downloads under way here still add to the disk."""
        return sum(
            d.size - d.written
            for d in self._running.values()
            if d.size is not None and not d.follower
        )

    def _receive(self, download: Download, response: IResponse, skip: int) -> None:
        download.attempts.began(download.source, download.written)
        idle = IDLE_TIMEOUT
        if download.upstream is not None:
            idle = download.upstream.config.idle_timeout
        writer = SpoolWriter(self, download, self.clock, idle, skip)
        download.stop = writer.stop
        response.deliverBody(writer)

    async def _resume(self, download: Download, why: str) -> None:
        """
        Carry on a broken transfer where it stopped, with a Range request:
        from the sources again, the upstreams in the order
        :meth:`Attempts.next_order` gives (the next one first; one that
        broke during this download only after the others), and as a last
        resort those among them marked down, rather than fail a download
        that progresses.  A transfer from the bucket goes on from an
        upstream; one from another node, from whoever holds the digest's
        lease next (this node, once the other's lease expired).
        """
        offset = download.written
        download.resumed += 1
        response: IResponse | None
        try:
            response = await self.sources.open(download)
        except (NotFoundAnywhere, RegistryError) as e:
            response = await self._resume_elsewhere(download)
            if response is None:
                self._fail(download, f"{why}; cannot resume: {e}")
                return
        if download.state != "running":
            discard(response)  # cancelled meanwhile
            return
        self.log.info(
            "resuming {digest} at byte {offset} from {source} ({why})",
            digest=str(download.digest),
            offset=offset,
            source=download.source,
            why=why,
        )
        self._receive(download, response, skip=offset if response.code == 200 else 0)

    async def _resume_elsewhere(self, download: Download) -> IResponse | None:
        """
        The rest of a download its own namespace's upstreams cannot give,
        from those of the other namespaces that joined it (having vouched
        for the digest), in the order they joined; ``None`` if none can.
        From then on, the download goes on in that namespace's name.
        """
        for namespace, (pool, repository) in list(download.joined.items()):
            del download.joined[namespace]
            download.pool, download.repository = pool, repository
            try:
                return await self.sources.upstreams.open(download)
            except (NotFoundAnywhere, RegistryError):
                continue
        return None

    def _upstreams_of(self, download: Download) -> list[Upstream]:
        """The upstreams a download may go on from: its namespace's and
        those of the namespaces that joined it."""
        assert download.pool is not None, "a follower does not receive"
        found = self.sources.upstreams.trusted(download.pool, download.digest)
        for pool, _ in download.joined.values():
            found += [
                u
                for u in self.sources.upstreams.trusted(pool, download.digest)
                if u not in found
            ]
        return found

    def _join(self, running: Download, pool: UpstreamPool, repository: str) -> None:
        """A namespace that vouches for *running*'s digest joins it: should
        the download's own upstreams fail, its upstreams may give the rest."""
        own = running.pool
        voucher = pool.voucher(repository)
        if own is not None and own.voucher(running.repository) != voucher:
            running.joined.setdefault(voucher, (pool, repository))

    def _finish(self, download: Download, reason: Failure) -> None:
        """The body ended: verify and commit, resume, or discard."""
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
                download.size, self._upstreams_of(download)
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
        self._commit(download)

    def _commit(self, download: Download) -> None:
        """Every byte is in the spool: verify, and into the cache."""
        download.stop = None  # too late to cancel: the bytes are all here
        d = self.run_in_thread(download.writer.commit)

        def committed(_: None) -> None:
            download.state = "done"
            del self._running[download.digest]
            assert download.pool is not None, "a follower does not commit"
            own = download.pool.voucher(download.repository)
            for namespace in {own, *download.vouchers}:
                self.vouches.add(namespace, [download.digest])
            self.store.added(download.written)
            self.housekeeping.run()
            self.log.info(
                "cached {digest} ({size} bytes) from {source}",
                digest=str(download.digest),
                size=download.written,
                source=download.source,
            )
            download.notify()
            Deferred.fromCoroutine(self.sources.kept(download)).addErrback(
                lambda failure: self.log.failure("cannot share a blob", failure)
            )

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, OSError):
                self.cache_failed(download, failure.value)
            elif failure.check(DigestMismatch):
                self.sources.upstreams.taint(download)
                self._fail(download, f"digest mismatch: {failure.getErrorMessage()}")
            else:
                self.log.failure(
                    "cannot store {digest}", failure, digest=str(download.digest)
                )
                self._fail(download, "cannot store the blob")

        d.addCallbacks(committed, failed)

    def cache_failed(self, download: Download, error: OSError) -> None:
        """
        The cache could not take *download*'s bytes (a full disk, a quota,
        an I/O error, a read-only file system): the cache's fault, not the
        source's, whose breaker and attempts are not charged.  The store
        serves without caching for a while (:meth:`Store.degrade`, which
        names the error).
        """
        if download.state != "running":
            return
        self.store.degrade(error)
        download.cache_error = error
        # The error itself is in the store's line, once per period.
        self._fail(download, "the cache folder cannot be written")

    def cancel(self, digest: Digest, why: str) -> bool:
        """
        Cancel this process's download of *digest* (a guess that no one
        else asked for: :mod:`regmirror.ahead`): its connections closed,
        its spool discarded, so that the digest's lock is free and a later
        request starts a fresh download.  Not a download whose bytes are
        all in, nor another worker's.

        :return: whether a download was cancelled.
        """
        download = self._running.get(digest)
        if download is None or download.stop is None or download.follower:
            return False
        stop = download.stop
        self.log.info(
            "cancelled the download of {digest} from {source} after {written} "
            "bytes: {why}",
            digest=str(digest),
            source=download.source,
            written=download.written,
            why=why,
        )
        download.attempts.ended(download.written)
        # Failed first: the connection's end is then no broken transfer
        # to resume.
        self._end(download)
        stop()
        return True

    def _fail(self, download: Download, why: str) -> None:
        if download.state != "running":
            return  # cancelled: ended already
        download.attempts.ended(download.written)
        if download.cache_error is not None:
            self.log.warn(
                "not caching {digest} from {source} after {written} bytes: {why}",
                digest=str(download.digest),
                source=download.source,
                written=download.written,
                why=why,
            )
        else:
            self.log.error(
                "download of {digest} from {source} failed: {why} (sources: {sources})",
                digest=str(download.digest),
                source=download.source,
                why=why,
                sources=download.attempts.summary(),
            )
        self._end(download)

    def _end(self, download: Download) -> None:
        """*download* failed: its spool goes, its readers are told."""
        self.sources.dropped(download)
        download.writer.discard()
        download.state = "failed"
        download.stop = None
        self._running.pop(download.digest, None)
        download.notify()


def _relayed(response: IResponse, upstream: Upstream) -> BlobSource:
    """*upstream*'s response to stream straight through, uncached."""
    length = response.length
    size = length if isinstance(length, int) else None
    return BlobSource(
        size,
        "",
        relay=response,
        upstream=upstream.name,
        idle_timeout=upstream.config.idle_timeout,
    )
