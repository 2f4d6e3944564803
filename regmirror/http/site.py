"""
The site: hardened connections (:mod:`regmirror.http.channel`), requests
that carry what the API learnt (:mod:`regmirror.http.request`), and an
access log of one structured event per request, under the
``regmirror.access`` namespace (``twistd --logger regmirror.logs.json_lines``
writes its fields as JSON keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Site

from regmirror.access.clients import client_address
from regmirror.config import FORWARDED_HEADERS, Network
from regmirror.http.channel import MirrorChannel
from regmirror.http.request import MirrorRequest

ACCESS_FORMAT = (
    '{client} - {user} "{method} {uri} {protocol}" {status} {bytes} '
    '"{referrer}" "{agent}" ns={namespace} cache={cache} upstream={upstream} '
    "{duration}s"
)


#: The access log's own namespace, so that it can be routed or filtered.
access = Logger(namespace="regmirror.access")


class MirrorSite(Site):
    """
    A Site whose access log is structured events, one per request, and
    whose connections are :class:`MirrorChannel`: hardened HTTP.
    """

    # HTTP/1.1 only: no HTTP/2 negotiation to harden as well.
    protocol = MirrorChannel  # type: ignore[assignment]
    requestFactory = MirrorRequest

    def __init__(
        self,
        resource: Any,
        clock: Any,
        trusted_proxies: Sequence[Network] = (),
        forwarded_header: str = FORWARDED_HEADERS[0],
    ) -> None:
        super().__init__(resource, reactor=clock)
        self._clock = clock
        self._trusted = trusted_proxies
        self._forwarded_header = forwarded_header

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN may pick for this site's connections: ``http/1.1`` only,
        even where twisted.web could speak HTTP/2 (the ``h2`` package
        installed), since :class:`MirrorChannel` speaks nothing else.
        """
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        info = request.info if isinstance(request, MirrorRequest) else None
        try:
            address = client_address(request, self._trusted, self._forwarded_header)
        except ValueError:
            client = "-"
        else:
            client = "unknown" if address is None else str(address)
        access.info(
            ACCESS_FORMAT,
            client=client,
            user=_field(None if info is None else info.user),
            method=_text(request.method),
            uri=_text(request.uri),
            protocol=_text(request.clientproto),
            status=request.code,
            bytes=request.sentLength,
            referrer=_text(request.getHeader(b"referer") or b"-"),
            agent=_text(request.getHeader(b"user-agent") or b"-"),
            namespace=(info and info.namespace) or "-",
            cache=_field(None if info is None else info.cache),
            upstream=_field(None if info is None else info.upstream),
            duration=0.0
            if info is None
            else round(self._clock.seconds() - info.started, 3),
        )


def _field(value: str | None) -> str:
    """A field of the access line: ``-`` when there is nothing to say."""
    return "-" if value is None else value


def _text(value: bytes | str) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.replace('"', "%22")
