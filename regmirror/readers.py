"""
The ways a blob's bytes reach a client.

A :class:`BlobSource` says where to read: the cache file, a download's
growing spool, or an upstream response relayed as it comes when the cache
cannot be written.  A :class:`BlobTail` is one reader's place in a file or
spool (the bytes of this process's download not yet in the spool file come
from its window in memory, :class:`regmirror._spooling.Window`);
:class:`SpoolReader` moves its bytes through twisted.web (the ``sendfile``
sender of :mod:`regmirror._sendfile` is the other kind, for plain TCP);
:class:`Relay` streams an upstream body straight through.
Each holds the last byte of a blob back until its digest is verified: a
client never receives a complete body whose digest did not match.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from regmirror._timeout import Idle
from regmirror.download import UNTIL_END, WAKE_BYTES, Download
from regmirror.errors import DownloadFailed
from regmirror.reference import Digest
from regmirror.responses import discard, skipping

#: Bytes read from disk per write to a client.
CHUNK = 256 * 1024
#: Chunks a reader sends per reactor turn before the other clients get
#: theirs: bounded work, so that one fast client cannot starve the others.
CHUNKS_PER_TURN = 16


@frozen
class BlobSource:
    """Where to read a blob from: the cache file, or a download under way."""

    size: int | None
    path: str
    download: Download | None = None
    #: an upstream response to relay as it comes, when the cache cannot
    #: be written
    relay: IResponse | None = None
    #: the upstream *relay* comes from
    upstream: str | None = None
    #: its ``idle_timeout``: the longest silence of *relay*'s body
    idle_timeout: float | None = None
    #: the download was under way or starting for another request (this
    #: process's, another worker's, one pulled ahead): joined, not started
    joined: bool = False


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

    def _in_memory(self, count: int) -> memoryview | None:
        """
        Up to *count* bytes from the position, when they are not in the
        spool file yet but in this process's download window.
        """
        download = self._download
        if (
            download is None
            or download.window is None
            or download.state != "running"
            or self._position < download.written
        ):
            return None
        return download.window.peek(self._position, count)

    def _in_file(self, count: int) -> int:
        """How many of *count* bytes from the position the file may give."""
        download = self._download
        if download is None or download.state == "done":
            return count
        return max(0, min(count, download.written - self._position))

    @property
    def position(self) -> int:
        """Where in the blob the next byte sent comes from."""
        return self._position

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
        for _ in range(CHUNKS_PER_TURN):
            if self._paused or self._stopped:
                return
            limit = self._limit()
            if limit is not None and self._position >= limit:
                self._at_limit()
                return
            size = CHUNK if limit is None else min(CHUNK, limit - self._position)
            view = self._in_memory(size)
            if view is not None:
                data = bytes(view)
            else:
                data = os.pread(
                    self._file.fileno(), self._in_file(size), self._position
                )
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


#: A relay whose upstream body breaks goes on from the byte it stopped at,
#: until this many attempts in a row brought nothing new.
RELAY_FRUITLESS = 3


@implementer(IPushProducer)
class Relay:
    """
    Streams an upstream body straight to a client (``deliverBody``), with
    back-pressure, checking the digest on the way: the last chunk is held
    back until it matches, so a client never gets a complete wrong blob.
    With *resume*, a body that breaks goes on from the byte it stopped at
    (a ``206``, or a ``200`` whose bytes before it are dropped), for as
    long as the attempts bring new bytes.

    :ivar done: fires when the client has every byte, or fails.
    """

    def __init__(
        self,
        consumer: Any,
        digest: Digest,
        count: Callable[[int], object],
        upstream: str | None = None,
        received: Callable[[str, int], object] | None = None,
        resume: Callable[[int, Sequence[str]], Awaitable[BlobSource]] | None = None,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        """
        :param count: called with the size of each write to the client.
        :param upstream: the upstream the body comes from, if known.
        :param received: called with the upstream and the size of each read
            from it.
        :param resume: the blob from an offset, anew from the upstreams,
            those that broke it off asked last.
        :param idle_timeout: with *clock*, how long the body may be silent
            before it counts as broken off.
        """
        self.done: Deferred[None] = Deferred()
        self._consumer = consumer
        self._digest = digest
        self._hasher = digest.hasher()
        self._held = b""
        self._count = count
        self._upstream = upstream
        self._received = received
        self._resume = resume
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: Idle | None = None
        self._transport: Any = None
        #: bytes of the blob received (and hashed) so far
        self._total = 0
        #: bytes at the start of the body under way that came before
        self._repeated = 0
        #: where the body broke last, and how many breaks in a row brought
        #: nothing new
        self._broke_at = -1
        self._fruitless = 0
        #: the upstreams whose bodies broke off, oldest first
        self._broke: list[str] = []

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport
        # The client's back-pressure comes through here: a body paused for
        # a slow client is not a silent upstream.
        self._consumer.registerProducer(self, True)
        if self._clock is not None and self._idle_timeout is not None:
            self._idle = Idle(self._clock, self._idle_timeout)
            # A silent upstream breaks the body off: it goes on elsewhere.
            self._idle.start(transport.stopProducing)

    def pauseProducing(self) -> None:
        if self._idle is not None:
            self._idle.stop()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._idle is not None:
            self._idle.stop()
            self._idle.start(self._transport.stopProducing)
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._received is not None and self._upstream is not None:
            self._received(self._upstream, len(data))
        if self._repeated:
            data, self._repeated = skipping(data, self._repeated)
            if not data:
                return
        self._total += len(data)
        self._hasher.update(data)
        if self._held:
            self._send(self._held)
        self._held = data

    def _send(self, data: bytes) -> None:
        self._consumer.write(data)
        self._count(len(data))

    def connectionLost(self, reason: Failure) -> None:
        if self._idle is not None:
            self._idle.stop()
        if getattr(self._consumer, "channel", True) is not None:
            self._consumer.unregisterProducer()
        if not reason.check(ResponseDone, PotentialDataLoss):
            why = f"relay broke: {reason.getErrorMessage()}"
            if self._upstream is not None:
                self._broke.append(self._upstream)
            stuck = self._total == self._broke_at
            self._fruitless = self._fruitless + 1 if stuck else 0
            self._broke_at = self._total
            gone = getattr(self._consumer, "channel", True) is None
            if self._resume is None or gone or self._fruitless >= RELAY_FRUITLESS:
                self._fail(DownloadFailed(why))
                return
            Deferred.fromCoroutine(self._go_on(why)).addErrback(self._fail)
        elif self._hasher.hexdigest() != self._digest.hex:
            self._fail(DownloadFailed(f"relayed bytes are not {self._digest}"))
        elif not self.done.called:
            if self._held:
                self._send(self._held)
            self.done.callback(None)

    def _fail(self, error: Exception | Failure) -> None:
        """Fail :attr:`done`, unless it was cancelled (the client left)."""
        if not self.done.called:
            self.done.errback(error)

    async def _go_on(self, why: str) -> None:
        """The body broke (*why*): the rest, from the byte it stopped at."""
        assert self._resume is not None
        start = self._total
        try:
            source = await self._resume(start, self._broke)
        except Exception as e:
            raise DownloadFailed(f"{why}; cannot go on: {e}") from None
        assert source.relay is not None
        if getattr(self._consumer, "channel", True) is None or self.done.called:
            discard(source.relay)  # the client went away meanwhile
            self._fail(DownloadFailed("the client went away"))
            return
        self._repeated = start if source.relay.code == 200 else 0
        self._upstream = source.upstream
        self._idle_timeout = source.idle_timeout
        source.relay.deliverBody(self)
