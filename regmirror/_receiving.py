"""
A source's body received into a download's spool (``deliverBody``), for
:mod:`regmirror.blobs`: the bytes go to the spool and its hash in threads
(:mod:`regmirror._spooling`), held to the size the source stated (or
``max_blob_size``, and what the cache keeps after eviction, without one);
a source silent too long is hung up on; the body's end is taken once
every byte is in.  What the download does then (resume, commit, fail) is
the :class:`~regmirror.blobs.Blobs`' call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from regmirror._spooling import Appender
from regmirror._timeout import Idle
from regmirror.download import Download
from regmirror.responses import skipping

if TYPE_CHECKING:
    from regmirror.blobs import Blobs


@define(eq=False)
class SpoolWriter:
    """
    Receives a source's body into a download's spool (``deliverBody``):
    the bytes are appended in a thread (:mod:`regmirror._spooling`), and
    the body's end is taken once every byte is in the spool.
    """

    blobs: Blobs
    download: Download
    clock: IReactorTime
    idle_timeout: float
    #: bytes at the start of the body the spool already has
    skip: int = 0
    _transport: Any = None
    _idle: Idle = field(init=False)
    _appender: Appender = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._idle = Idle(self.clock, self.idle_timeout)
        self._appender = Appender(
            self.download.writer,
            self.blobs.run_in_thread,
            self.blobs.call_from_thread,
            self._appended,
            self._append_failed,
        )
        # This process's readers send what came and is not yet written.
        self.download.window = self._appender.window

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport
        self._appender.producer = transport
        self._idle.start(self._stalled)

    def _stalled(self) -> None:
        download = self.download
        source = download.source
        if download.upstream is not None:
            source = f"upstream {source}"
        self.blobs.log.warn(
            "{source} stalled on {digest}", source=source, digest=str(download.digest)
        )
        if self._transport is not None:
            self._transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.download.state != "running":
            return
        self._idle.touch()
        self.blobs.metrics.upstream_bytes.labels(self.download.source).inc(len(data))
        if self.skip:
            data, self.skip = skipping(data, self.skip)
            if not data:
                return
        size = self.download.written + self._appender.pending + len(data)
        limit = self.download.size or self.blobs.max_blob_size
        if size > limit:
            # More than announced, or an endless body without a length:
            # no blob is worth filling the disk for.
            self._abandon(f"the body went past {limit} bytes")
            return
        target = self.blobs.store.eviction_target
        if self.download.size is None and target is not None and size > target:
            # Caching it would evict it with everything else: its readers'
            # responses break, and their retries are relayed.
            self.blobs.oversized(self.download.digest)
            self._abandon(
                f"the body went past {target} bytes, more than the cache keeps "
                "after eviction (90% of max_size); relaying it from now on"
            )
            return
        self._appender.add(data)
        self.download.appended()

    def _appended(self) -> None:
        # Bytes reaching the spool are progress, even with the source paused.
        self._idle.touch()
        if self.download.state == "running":
            self.download.appended()

    def _append_failed(self, failure: Failure) -> None:
        if self.download.state != "running":
            return
        error = failure.value
        if isinstance(error, OSError):
            # Failed first: stopping lets the body's end go, which must
            # not be taken for a short body.
            self.blobs.cache_failed(self.download, error)
            self._appender.stop()
            if self._transport is not None:
                self._transport.stopProducing()
            return
        self.blobs.log.failure(
            "cannot write {digest} to the spool",
            failure,
            digest=str(self.download.digest),
        )
        self._abandon("cannot write to the spool")

    def _abandon(self, why: str) -> None:
        self._appender.stop()
        self.blobs._fail(self.download, why)
        self.stop()

    def stop(self) -> None:
        """The download ended: drop what comes, close the connection."""
        self._appender.stop()
        if self._transport is not None:
            self._transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        self._idle.stop()

        def appended(_: None) -> None:
            if self.download.state == "running":
                self.blobs._finish(self.download, reason)

        self._appender.drained().addCallback(appended).addErrback(
            lambda failure: self.blobs.log.failure(
                "cannot finish {digest}", failure, digest=str(self.download.digest)
            )
        )
