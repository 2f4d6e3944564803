"""
Request bodies for S3: small ones written at once, and slices of a file
streamed a chunk at a time while the transport takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: File bodies are read this much at a time, and at most this many chunks
#: per turn of the reactor.
CHUNK = 64 * 1024
BURST = 16


@frozen
class Slice:
    """*length* bytes of the file at *path* from *offset*."""

    path: str
    offset: int
    length: int


@implementer(IBodyProducer)
class BytesBody:
    """A small body, written at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class FileSliceBody:
    """
    A slice of a file as a request body of known length (RGW answers a
    chunked upload with 411), read :data:`CHUNK` bytes at a time while the
    transport takes them: a push producer the transport pauses when its
    buffer fills.  *progress* is called after every chunk.
    """

    def __init__(
        self, part: Slice, clock: IReactorTime, progress: Callable[[], None]
    ) -> None:
        self.length = part.length
        self._part = part
        self._clock = clock
        self._progress = progress
        self._left = part.length
        self._file: Any = None
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()
        self._call: IDelayedCall | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        try:
            self._file = open(self._part.path, "rb")  # noqa: SIM115 -- closed in _end
            self._file.seek(self._part.offset)
        except OSError as e:
            self._end(Failure(e))
            return self._done
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if self._call is None and not (self._paused or self._stopped):
            self._call = self._clock.callLater(0, self._produce)

    def _produce(self) -> None:
        self._call = None
        try:
            for _ in range(BURST):
                if self._paused or self._stopped:
                    return
                if self._left == 0:
                    self._end(None)
                    return
                data = self._file.read(min(CHUNK, self._left))
                if not data:
                    raise OSError(f"{self._part.path} ended {self._left} bytes early")
                self._left -= len(data)
                assert self._consumer is not None
                self._consumer.write(data)
                self._progress()
        except OSError as e:
            self._end(Failure(e))
            return
        self._schedule()

    def _end(self, failure: Failure | None) -> None:
        stopped, self._stopped = self._stopped, True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if stopped:
            return  # stopProducing: the Deferred must never fire
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._stopped = True
        self._end(None)
