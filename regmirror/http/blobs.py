"""
Blobs to clients: ``GET`` and ``HEAD`` of ``/v2/<name>/blobs/<digest>``,
redirects to the cluster's bucket, ``Range``, the reader that streams the
bytes (``sendfile`` on plain TCP), and blobs for the cluster's other nodes
at ``/_cluster/blobs/``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from attrs import define, evolve
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from regmirror import nodes
from regmirror._sendfile import SocketSender
from regmirror.cluster import CoordinatorDown
from regmirror.errors import (
    BlobUnknown,
    Denied,
    DownloadFailed,
    NotFound,
    RangeInvalid,
    UpstreamUnavailable,
)
from regmirror.fetch import Fetcher
from regmirror.http.channel import _PlainOnly
from regmirror.http.errors import break_connection
from regmirror.http.request import RequestInfo, text_header
from regmirror.metrics import Metrics
from regmirror.readers import BlobSource, Relay, SpoolReader
from regmirror.reference import Digest, parse_digest
from regmirror.routing import Route

__all__ = [
    "CLUSTER_BLOBS",
    "BlobEndpoint",
    "asks_range",
    "parse_range",
    "sendfile_transport",
]

#: Where the other nodes of a cluster fetch blobs (see :mod:`regmirror.nodes`).
CLUSTER_BLOBS = b"/" + nodes.PATH + b"/blobs/"

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """
    Interpret a ``Range`` header for a body of *size* bytes.

    :return: ``(start, end)`` with *end* exclusive, or ``None`` to send the
        whole body (no header, a malformed one, or several ranges, all of
        which RFC 9110 lets a server ignore).
    :raises RangeInvalid: when the single range cannot be satisfied.
    """
    spec = _single_range(value)
    if value is None or spec is None:
        return None
    first, last = spec
    unsatisfiable = RangeInvalid(
        f"range {value[:80]} cannot be satisfied", _unsatisfied(size)
    )
    if not first:
        # A suffix: the last N bytes.
        length = _number(last)
        if length == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - length), size
    start = _number(first)
    if start >= size:
        raise unsatisfiable
    end = size if not last else min(_number(last) + 1, size)
    return start, end


def asks_range(value: str | None) -> bool:
    """Does a ``Range`` header ask for one range (which :func:`parse_range`
    answers, or refuses, once the size is known)?"""
    return _single_range(value) is not None


def _single_range(value: str | None) -> tuple[str, str] | None:
    """The first and last byte positions (either may be empty, not both) of
    a single range, or ``None`` for a header to ignore."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if first and last and _order(last) < _order(first):
        return None
    return first, last


def _order(digits: str) -> tuple[int, str]:
    """Sorts digit strings by value, however long, without converting them."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _number(digits: str) -> int:
    """A byte position; absurdly long ones are merely "very large"."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else 10**18


def _unsatisfied(size: int) -> dict[str, str]:
    return {"Content-Range": f"bytes */{size}"}


def sendfile_transport(request: Request) -> Any:
    """
    The TCP transport under a request whose body may go out with
    ``sendfile``, or ``None`` to write it through twisted.web as usual:
    under TLS, or anything else but a plain HTTP/1.x connection whose
    response has a length and whose transport is ready to take more.
    """
    channel = request.channel
    if (
        not isinstance(channel, HTTPChannel)
        or request.method != b"GET"
        or request.clientproto not in (b"HTTP/1.0", b"HTTP/1.1")
        or not request.responseHeaders.hasHeader(b"Content-Length")
        or request.startedWriting
    ):
        return None
    transport: Any = channel.transport
    while isinstance(transport, _PlainOnly):
        transport = transport.transport
    # TLS wraps the protocol (another transport in between) or, after
    # startTLS, says so on the TCP transport itself.
    if (
        type(transport) is not tcp.Server
        or getattr(transport, "TLS", True)
        or not transport.connected
        or transport.disconnecting
        or transport.producer is not channel
        or not transport.streamingProducer
        or transport.producerPaused
    ):
        return None
    return transport


@define(eq=False)
class BlobEndpoint:
    """
    Answers the requests for blobs the API hands it: from the cache, a
    download, a relay or a redirect, whole or the requested range.
    """

    fetcher: Fetcher
    clock: IReactorTime
    metrics: Metrics

    log = Logger()

    async def blob(
        self, request: Request, info: RequestInfo, route: Route, digest: Digest
    ) -> None:
        """``GET`` or ``HEAD`` of *digest* through *route*."""
        request.setHeader("Docker-Content-Digest", str(digest))
        request.setHeader("ETag", f'"{digest}"')
        request.setHeader("Accept-Ranges", "bytes")
        request.setHeader("Content-Type", "application/octet-stream")
        if request.method == b"HEAD":
            size = await self.fetcher.blob_size(route.pool, route.repository, digest)
            if size is not None:
                request.setHeader("Content-Length", str(size))
            request.finish()
            return
        location = await self.fetcher.redirect(route.pool, route.repository, digest)
        if location is not None:
            info.cache = "redirect"
            request.setResponseCode(307)
            request.setHeader("Location", location)
            request.setHeader("Content-Length", "0")
            request.finish()
            return
        source = await self.fetcher.blob(route.pool, route.repository, digest)

        async def again(offset: int, broke: Sequence[str]) -> BlobSource:
            return await self.fetcher.relay(
                route.pool, route.repository, digest, offset, broke
            )

        await self._serve(request, info, source, digest, again)

    async def peer_blob(
        self, request: Request, info: RequestInfo, reference: bytes
    ) -> None:
        """
        A blob for another node of the cluster: only what this node has
        or downloads itself (``Fetcher.local_blob``), for a request that
        carries the digest's token under the cluster's key.
        """
        coordinator = self.fetcher.coordinator
        if coordinator is None:
            raise NotFound("this node is not in a cluster")
        digest = parse_digest(reference.decode("ascii", "replace"))
        try:
            key = await coordinator.peer_key()
        except CoordinatorDown:
            raise UpstreamUnavailable("the cluster's Redis is down") from None
        given = request.requestHeaders.getRawHeaders(nodes.AUTH_HEADER) or []
        # One token, on one line: a second line is no honest node's.
        if not nodes.authorized(key, digest, given[0] if len(given) == 1 else None):
            raise Denied("not a node of this cluster")
        source = await self.fetcher.local_blob(digest)
        if source is None:
            raise BlobUnknown(f"this node is not downloading {digest}")
        request.setHeader("Docker-Content-Digest", str(digest))
        request.setHeader("Content-Type", "application/octet-stream")
        await self._serve(request, info, source, digest)

    async def _serve(
        self,
        request: Request,
        info: RequestInfo,
        source: BlobSource,
        digest: Digest,
        again: Callable[[int, Sequence[str]], Awaitable[BlobSource]] | None = None,
    ) -> None:
        """
        Stream a blob source, whole or the requested range.  With *again*
        (the blob from an offset, anew from the upstreams), a relay whose
        upstream broke off goes on from where it stopped.
        """
        if source.download is not None:
            info.cache = "joined" if source.joined else "miss"
            info.upstream = source.download.source
        elif source.relay is not None:
            info.cache = "relay"
            info.upstream = source.upstream
        else:
            info.cache = "hit"
        if source.relay is not None:
            # Sent whole, as it comes: no range of it is answered.
            request.setHeader("Accept-Ranges", "none")
            relayed = Deferred.fromCoroutine(
                self._relay(request, source, digest, again)
            )
            await self._deliver(request, relayed, digest)
            return
        download = source.download
        if (
            source.size is None
            and download is not None
            and asks_range(text_header(request, "Range"))
        ):
            # No source stated the size: the range waits for it (the end of
            # the download), then is answered as a cached blob's, 206 or 416.
            size = await download.sized()
            if size is None:
                raise DownloadFailed(f"download of {digest} failed")
            source = evolve(source, size=size)
        start, end = 0, source.size
        if source.size is not None:
            wanted = parse_range(text_header(request, "Range"), source.size)
            if wanted is not None:
                start, end = wanted
                request.setResponseCode(206)
                request.setHeader(
                    "Content-Range", f"bytes {start}-{end - 1}/{source.size}"
                )
            request.setHeader("Content-Length", str((end or 0) - start))
        served = self.metrics.served_bytes.labels(
            "cache" if source.download is None else "download"
        )
        reader: SpoolReader | SocketSender
        transport = sendfile_transport(request)
        if transport is not None and end is not None:

            def sent(size: int) -> None:
                served.inc(size)
                request.sentLength += size

            reader = SocketSender(
                source, transport, start, end, sent, self.metrics.sendfile_bytes.inc
            )
            request.write(b"")  # the head, into the transport's buffer
        else:
            reader = SpoolReader(source, request, self.clock, start, end, served.inc)
        store = self.fetcher.store
        store.acquire(digest)
        reader.begin()
        try:
            await self._deliver(request, reader.done, digest, reader.stopProducing)
        finally:
            store.release(digest)

    async def _relay(
        self,
        request: Request,
        source: BlobSource,
        digest: Digest,
        again: Callable[[int, Sequence[str]], Awaitable[BlobSource]] | None = None,
    ) -> None:
        """
        Stream a blob straight from upstream (the cache cannot take it);
        with *again*, going on from where the upstream broke off.
        """
        assert source.relay is not None

        def received(upstream: str, size: int) -> None:
            # Received all the same, though not cached.
            self.metrics.upstream_bytes.labels(upstream).inc(size)

        served = self.metrics.served_bytes.labels("relay").inc
        relay = Relay(
            request,
            digest,
            served,
            source.upstream,
            received,
            again,
            self.clock,
            source.idle_timeout,
        )
        if source.size is not None:
            request.setHeader("Content-Length", str(source.size))
        request.write(b"")  # the headers go now; the body follows as it comes
        source.relay.deliverBody(relay)
        await relay.done

    async def _deliver(
        self,
        request: Request,
        done: Deferred[None],
        digest: Digest,
        stop: Callable[[], object] | None = None,
    ) -> None:
        """
        Wait for a body to be sent, then finish; if it failed, break the
        connection so that the client cannot take a short body for whole.
        """
        try:
            await done
        except CancelledError:
            if stop is not None:
                stop()
            raise
        except Exception as e:
            self.log.warn(
                "breaking the response for {digest}: {why}",
                digest=str(digest),
                why=str(e),
            )
            break_connection(request)
            return
        request.finish()
