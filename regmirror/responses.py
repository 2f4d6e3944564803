"""
Reading what an HTTP server answered, for any client of the mirror's
(upstreams, the bucket, other nodes): a header's value, a small body read
whole within a size and an idle limit, a body dropped unread, the bytes at
a body's start that the reader already has.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from regmirror._timeout import Idle


def header(response: IResponse, name: str) -> str | None:
    """The first value of a response header, decoded, or ``None``."""
    values = response.headers.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    first: bytes = values[0]
    return first.decode("latin-1")


def skipping(data: bytes, skip: int) -> tuple[bytes, int]:
    """
    *data*, a piece of a body, without what is left of the *skip* bytes at
    the body's start a reader does not want (it has them); and how many of
    those are still to come.
    """
    dropped = min(skip, len(data))
    return data[dropped:], skip - dropped


class _Collect:
    """
    Gathers a small body (``deliverBody``), giving up — and closing the
    connection — past *limit* bytes or after *idle* seconds of silence.
    """

    def __init__(self, limit: int, clock: IReactorTime, idle: float) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._limit = limit
        self._chunks: list[bytes] = []
        self._received = 0
        self._transport: Any = None
        self._idle = Idle(clock, idle)
        self._idle.start(lambda: self._give_up(f"silent for {idle:g}s"))

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._idle.touch()
        self._received += len(data)
        if self._received > self._limit:
            self._give_up(f"body is over the limit of {self._limit} bytes")
            return
        self._chunks.append(data)

    def _give_up(self, why: str) -> None:
        self._idle.stop()
        if not self.done.called:
            self.done.errback(ValueError(why))
        if self._transport is not None:
            self._transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        self._idle.stop()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(ValueError(f"body broke off: {reason.getErrorMessage()}"))


async def read_small(
    response: IResponse, limit: int, clock: IReactorTime, idle: float
) -> bytes:
    """
    A body that should be small, from any HTTP server.

    :raises ValueError: if it is over *limit* bytes, goes silent for *idle*
        seconds, or breaks off; the connection is closed then.
    """
    length = response.length
    if isinstance(length, int) and length > limit:
        discard(response)
        raise ValueError(f"body of {length} bytes is over the limit of {limit}")
    collect = _Collect(limit, clock, idle)
    response.deliverBody(collect)
    return await collect.done


def discard(response: IResponse) -> None:
    """Drop a body unread, closing its connection."""
    response.deliverBody(_Discard())


class _Discard:
    """A body protocol that drops everything and closes."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass
