"""
A large blob fetched as several ranged GETs at once (``[upstream:NAME]
segments``), for upstreams that are slow per connection.

Each segment's body is written, as it comes, at its place in a side file
next to the spool (``<spool>.parts``).  The spool itself grows only in
order: a thread moves the side file's contiguous prefix into it batch
after batch (:meth:`regmirror._spool.Spool.append`: written, hashed), so
that readers, other worker processes following the spool and the digest
check see what one transfer would give them, and the last byte waits for
the verification as ever.  The same thread then punches the moved bytes
out of the side file (:func:`regmirror.store.punch_hole`), so that the
disk holds the blob about once while it comes, not twice: the spool, and
in the side file only the bytes waiting to follow it (where the file
system cannot punch holes, the side file keeps every byte until the end).
A segment that breaks goes on from where it stopped, on its own, from the
namespace's upstreams in the order its own attempts give
(:class:`regmirror._attempts.Attempts`); the others go on meanwhile.  No
segment is held in memory: a segment's source is paused while
:data:`PAUSE_AT` of its bytes wait for the disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from regmirror._attempts import Attempts
from regmirror._spool import Spool, punch_hole
from regmirror._timeout import Idle
from regmirror.download import Download
from regmirror.errors import RegistryError
from regmirror.pool import NotFoundAnywhere
from regmirror.responses import discard, skipping
from regmirror.upstream import Upstream, UpstreamFailure

if TYPE_CHECKING:
    from regmirror.blobs import Blobs

#: The most bytes written, or moved into the spool, at once.
BATCH = 2 * 1024 * 1024
#: A segment's source is paused while this many of its bytes wait for the
#: disk, and resumed once no more than RESUME_AT do.
PAUSE_AT = 4 * 1024 * 1024
RESUME_AT = 1024 * 1024
#: The side file's name: the spool's, and this.
PARTS_SUFFIX = ".parts"

T = TypeVar("T")


def _pwrite_all(fd: int, buffers: list[bytes], offset: int) -> int:
    """Write *buffers* at *offset* of *fd*, whole.  Blocking."""
    data = b"".join(buffers)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _pread_all(fd: int, start: int, end: int) -> bytes:
    """Bytes *start* to *end* of *fd*, which has them.  Blocking."""
    parts = []
    while start < end:
        data = os.pread(fd, end - start, start)
        if not data:
            raise OSError(f"the segments' file ends at byte {start} of {end}")
        parts.append(data)
        start += len(data)
    return b"".join(parts)


@define(eq=False)
class _Segment:
    """Bytes ``[start, end)`` of the blob, and how far they came."""

    start: int
    end: int
    #: bytes of it in the side file
    filled: int = 0
    attempts: Attempts = field(factory=Attempts)
    resumed: int = 0
    upstream: Upstream | None = None
    writer: _PartWriter | None = None

    @property
    def position(self) -> int:
        return self.start + self.filled

    @property
    def complete(self) -> bool:
        return self.position >= self.end

    def __str__(self) -> str:
        return f"bytes {self.start}-{self.end - 1}"


@define(eq=False)
class Segmented:
    """One download's segments, from their first answers to the commit."""

    blobs: Blobs
    download: Download
    segments: list[_Segment]
    path: str
    _fd: int = -1
    #: bytes moved into the spool
    _moved: int = 0
    #: the side file's bytes given back to the file system (whole blocks
    #: of it), and whether it can; the moving thread's own
    _punched: int = 0
    _punching: bool = True
    _block: int = 4096
    _moving: bool = False
    _committing: bool = False
    #: thread jobs using the side file
    _busy: int = 0

    @classmethod
    def start(cls, blobs: Blobs, download: Download, first: Any) -> Segmented:
        """
        Fetch *download*'s segments: the first from *first*, its upstream's
        206, the others asked for now.
        """
        assert download.segments is not None and download.upstream is not None
        segments = [_Segment(start, end) for start, end in download.segments]
        path = download.writer.path + PARTS_SUFFIX
        self = cls(blobs, download, segments, path)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._block = os.fstat(self._fd).st_blksize or self._block
        except OSError as error:
            discard(first)
            blobs.cache_failed(download, error)
            return self
        head = segments[0]
        head.upstream = download.upstream
        self._receive(head, first)
        for segment in segments[1:]:
            self._open(segment)
        return self

    @property
    def running(self) -> bool:
        return self.download.state == "running"

    def _contiguous(self) -> int:
        """Where the side file's bytes in order end."""
        for segment in self.segments:
            if not segment.complete:
                return segment.position
        return self.segments[-1].end

    # -- asking upstreams ----------------------------------------------------

    def _open(self, segment: _Segment) -> None:
        Deferred.fromCoroutine(self._ask(segment)).addErrback(
            lambda failure: self._fail(f"{segment}: {failure.getErrorMessage()}")
        )

    async def _ask(self, segment: _Segment) -> None:
        """Ask for *segment*'s bytes from where it stands."""
        download, blobs = self.download, self.blobs
        pool = download.pool
        assert pool is not None, "a follower does not receive"
        order = segment.attempts.next_order(
            blobs.sources.upstreams.trusted(pool, download.digest)
        )
        try:
            upstream, response = await pool.open_blob(
                download.repository,
                download.digest,
                segment.position,
                order,
                last_resort=segment.resumed > 0,
                end=segment.end,
            )
        except (NotFoundAnywhere, RegistryError) as e:
            self._fail(f"cannot fetch {segment}: {e}")
            return
        if not self.running:
            discard(response)
            return
        segment.upstream = upstream
        skip = 0
        if response.code != 206:
            # It ignores Range: the next upstream, if any, is asked instead;
            # the last one's whole blob gives the segment's bytes after
            # those before them (fetched again: better than no blob).
            if upstream is not order[-1]:
                discard(response)
                segment.attempts.began(upstream.name, segment.position)
                segment.attempts.ended(segment.position)
                self._broke(segment, f"upstream {upstream.name} ignored the Range")
                return
            skip = segment.position
        self._receive(segment, response, skip)

    def _receive(self, segment: _Segment, response: Any, skip: int = 0) -> None:
        assert segment.upstream is not None
        segment.attempts.began(segment.upstream.name, segment.position)
        segment.writer = _PartWriter(self, segment, skip=skip)
        response.deliverBody(segment.writer)

    # -- a segment's end -----------------------------------------------------

    def ended(self, segment: _Segment, reason: Failure) -> None:
        """*segment*'s body ended, its bytes all in the side file."""
        segment.writer = None
        segment.attempts.ended(segment.position)
        if not self.running:
            return
        if segment.complete:
            if segment.upstream is not None:
                segment.upstream.breaker.transferred()
            self._progress()
            return
        why = reason.getErrorMessage()
        if reason.check(ResponseDone, PotentialDataLoss):
            why = "the body ended early"
        self._broke(segment, why)

    def _broke(self, segment: _Segment, why: str) -> None:
        """*segment*'s transfer broke: go on with it from where it stopped."""
        upstream = segment.upstream
        pool = self.download.pool
        assert pool is not None
        name = "?" if upstream is None else upstream.name
        why = f"{segment} from {name} broke after {segment.filled} bytes: {why}"
        if upstream is not None:
            pool.failed(upstream, UpstreamFailure(upstream.name, "broken", why))
        enough = segment.attempts.exhausted(
            segment.end - segment.start,
            self.blobs.sources.upstreams.trusted(pool, self.download.digest),
        )
        if enough is not None:
            self._fail(f"{why}; no further attempt: {enough}")
            return
        segment.resumed += 1
        self.download.resumed += 1
        self.blobs.log.info(
            "resuming {digest} at byte {offset} ({why})",
            digest=str(self.download.digest),
            offset=segment.position,
            why=why,
        )
        self._open(segment)

    # -- into the spool, in order --------------------------------------------

    def in_thread(self, work: Callable[[], T]) -> Deferred[T]:
        """Run *work* (using the side file) in a thread."""
        self._busy += 1
        d: Deferred[T] = self.blobs.run_in_thread(work)

        def done(result: T) -> T:
            self._busy -= 1
            self._close_if_idle()
            return result

        return d.addBoth(done)

    def wrote(self) -> None:
        """More of a segment is in the side file."""
        self._progress()

    def _progress(self) -> None:
        if not self.running or self._moving:
            return
        start, end = self._moved, min(self._contiguous(), self._moved + BATCH)
        if start < end:
            self._moving = True
            fd, spool = self._fd, self.download.writer
            self.in_thread(lambda: self._move(fd, spool, start, end)).addCallbacks(
                self._appended, self._append_failed
            )
        elif (
            start == self.segments[-1].end
            and not self._committing
            and all(s.complete and s.writer is None for s in self.segments)
        ):
            self._committing = True
            self._close_if_idle()
            self.blobs._commit(self.download)

    def _move(self, fd: int, spool: Spool, start: int, end: int) -> int:
        """
        Move bytes *start* to *end* of the side file *fd* into *spool*,
        then punch the whole blocks moved by now out of the side file.
        Blocking; one move at a time.

        :return: the number of bytes moved.
        """
        count = spool.append([_pread_all(fd, start, end)])
        until = (start + count) // self._block * self._block
        if self._punching and until > self._punched:
            # Where it cannot, the side file keeps its bytes, as ever.
            self._punching = punch_hole(fd, self._punched, until - self._punched)
            self._punched = until
        return count

    def _appended(self, count: int) -> None:
        self._moving = False
        if not self.running:
            return
        self._moved += count
        self.download.writer.written += count
        self.download.appended()
        self._progress()

    def _append_failed(self, failure: Failure) -> None:
        self._moving = False
        self.failed_writing(failure)

    def failed_writing(self, failure: Failure) -> None:
        """Writing the side file or the spool failed."""
        if not self.running:
            return
        error = failure.value
        if isinstance(error, OSError):
            # The cache's fault, not the segments' sources'.
            self.blobs.cache_failed(self.download, error)
            self.stop()
            return
        self.blobs.log.failure(
            "cannot write {digest} to the spool",
            failure,
            digest=str(self.download.digest),
        )
        self._fail("cannot write to the spool")

    def _fail(self, why: str) -> None:
        if not self.running:
            return
        done = ", ".join(
            f"{s}: {s.filled} in, resumed {s.resumed} times" for s in self.segments
        )
        self.blobs._fail(self.download, f"{why} (segments: {done})")
        self.stop()

    def stop(self) -> None:
        """The download ended: close every segment's connection."""
        for segment in self.segments:
            if segment.writer is not None:
                segment.writer.stop()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        """Once the download ended and no thread uses it, drop the side file."""
        if self._busy or self._fd < 0:
            return
        if self.running and not all(s.complete for s in self.segments):
            return
        if self.running and self._moved < self.segments[-1].end:
            return
        os.close(self._fd)
        self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@define(eq=False)
class _PartWriter:
    """Receives one segment's body (``deliverBody``) into the side file."""

    segmented: Segmented
    segment: _Segment
    #: bytes at the start of the body before the segment's position (an
    #: upstream's whole blob, for one that ignores Range)
    skip: int = 0
    _transport: Any = None
    _queue: list[bytes] = field(factory=list)
    _queued: int = 0
    _writing: bool = False
    _paused: bool = False
    _stopped: bool = False
    _overflow: bool = False
    _lost: Failure | None = None
    _idle: Idle = field(init=False)

    def __attrs_post_init__(self) -> None:
        upstream = self.segment.upstream
        assert upstream is not None
        blobs = self.segmented.blobs
        self._idle = Idle(blobs.clock, upstream.config.idle_timeout)

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport
        self._idle.start(self._stalled)

    def _stalled(self) -> None:
        upstream = self.segment.upstream
        self.segmented.blobs.log.warn(
            "upstream {source} stalled on {digest}",
            source="?" if upstream is None else upstream.name,
            digest=str(self.segmented.download.digest),
        )
        if self._transport is not None:
            self._transport.stopProducing()

    def stop(self) -> None:
        """The download ended: drop what comes, close the connection."""
        self._stopped = True
        self._queue.clear()
        self._idle.stop()
        if self._transport is not None:
            self._transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped or self._overflow or not self.segmented.running:
            return
        self._idle.touch()
        upstream = self.segment.upstream
        assert upstream is not None
        self.segmented.blobs.metrics.upstream_bytes.labels(upstream.name).inc(len(data))
        if self.skip:
            data, self.skip = skipping(data, self.skip)
            if not data:
                return
        room = self.segment.end - self.segment.position - self._queued
        if len(data) > room:
            # More than the range asked for: what is past it is no part of
            # this segment, and the connection goes.
            self._overflow = True
            data = data[:room]
            if self._transport is not None:
                self._transport.stopProducing()
            if not data:
                return
        self._queue.append(data)
        self._queued += len(data)
        if not self._paused and self._queued >= PAUSE_AT:
            self._paused = True
            if self._transport is not None:
                self._transport.pauseProducing()
        self._write()

    def _write(self) -> None:
        if self._writing or not self._queue:
            return
        batch, size = [], 0
        while self._queue and size < BATCH:
            data = self._queue.pop(0)
            batch.append(data)
            size += len(data)
        offset, fd = self.segment.position, self.segmented._fd
        self._writing = True
        self.segmented.in_thread(lambda: _pwrite_all(fd, batch, offset)).addCallbacks(
            self._wrote, self._failed
        )

    def _wrote(self, count: int) -> None:
        self._writing = False
        if self._stopped or not self.segmented.running:
            self._maybe_ended()
            return
        self.segment.filled += count
        self._queued -= count
        self._idle.touch()
        if self._paused and self._queued <= RESUME_AT:
            self._paused = False
            if self._transport is not None:
                self._transport.resumeProducing()
        self.segmented.wrote()
        self._write()
        self._maybe_ended()

    def _failed(self, failure: Failure) -> None:
        self._writing = False
        self.stop()
        self.segmented.failed_writing(failure)

    def connectionLost(self, reason: Failure) -> None:
        self._idle.stop()
        self._lost = reason
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self._lost is None or self._writing or self._queue:
            return
        lost, self._lost = self._lost, None
        if self._stopped:
            return
        self.segmented.ended(self.segment, lost)
