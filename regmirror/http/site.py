"""
The site: hardened connections (:mod:`regmirror.http.channel`), requests
that carry what the API learnt (:mod:`regmirror.http.request`), and an
access log of one structured event per request, under the
``regmirror.access`` namespace (``twistd --logger regmirror.logs.json_lines``
writes its fields as JSON keys).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Site

from regmirror.access.clients import Client, client_address, unmapped
from regmirror.config import FORWARDED_HEADERS, Network
from regmirror.http.channel import REFUSED_LINE_LIMIT, MirrorChannel
from regmirror.http.request import MirrorRequest, RequestInfo
from regmirror.metrics import Metrics

ACCESS_FORMAT = (
    '{client} - {user} "{method} {uri} {protocol}" {status} {bytes} '
    '"{referrer}" "{agent}" ns={namespace} cache={cache} upstream={upstream} '
    "{duration}s"
)
#: The line of a request whose connection was lost before it finished.
ABORTED_FORMAT = ACCESS_FORMAT + " aborted"
#: The status logged for a request whose connection was lost before its
#: head was sent (nginx's "client closed request").
CLOSED_EARLY = 499
#: The methods counted by name in ``regmirror_requests_total`` (clients
#: choose methods: a label of fixed values); any other is ``other``.
COUNTED_METHODS = (b"GET", b"HEAD")


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
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(resource, reactor=clock)
        self._clock = clock
        self._trusted = trusted_proxies
        self._forwarded_header = forwarded_header
        self._metrics = metrics

    def serving(self, resource: Any) -> MirrorSite:
        """
        A site for *resource* whose clients are told, and whose access lines
        written, as this one's (``metrics_listen``'s scrapes); the requests
        it refuses are not counted in ``regmirror_requests_total``, as the
        ones it answers are not.
        """
        return MirrorSite(resource, self._clock, self._trusted, self._forwarded_header)

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN may pick for this site's connections: ``http/1.1`` only,
        even where twisted.web could speak HTTP/2 (the ``h2`` package
        installed), since :class:`MirrorChannel` speaks nothing else.
        """
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """
        The access line of *request*: when it finished, or when its
        connection was lost before (``aborted``: the status as sent, or
        :data:`CLOSED_EARLY` when no head was, and the bytes written).
        """
        info = request.info if isinstance(request, MirrorRequest) else None
        aborted = isinstance(request, MirrorRequest) and request.aborted
        self._write(
            client=self._client(request),
            method=request.method,
            uri=request.uri,
            protocol=request.clientproto,
            status=request.code
            if request.startedWriting or not aborted
            else CLOSED_EARLY,
            sent=request.sentLength,
            request=request,
            info=info,
            aborted=aborted,
        )

    def log_refused(
        self,
        peer: Any,
        status: int,
        sent: int,
        line: bytes | None,
        request: http.Request | None = None,
        *,
        http_line: bool = True,
    ) -> None:
        """
        The access line of a request the connection refused before any
        resource saw it (:class:`MirrorChannel`'s 4xx answers, a TLS
        handshake on a plain port), counted in ``regmirror_requests_total``
        as a request refused before routing is.

        :param peer: the connection's peer address.
        :param status: the status of the answer; *sent*, its body's bytes.
        :param line: what arrived of its request line (``None``: nothing),
            shown escaped and cut at :data:`REFUSED_LINE_LIMIT` bytes.
        :param request: the request object, if the channel made one: its
            forwarding header, ``User-Agent`` and ``Referer``, as far as
            they were read.
        :param http_line: false for bytes that are no request line at all
            (a TLS ClientHello), shown whole where the target goes.
        """
        method, uri, protocol = _request_line(line, http_line)
        if request is not None:
            client = self._client(request)
        else:
            # A peer without an address (a unix: socket) as a request's.
            host = str(getattr(peer, "host", "0.0.0.0"))
            try:
                client = unmapped(ipaddress.ip_address(host))
            except ValueError:
                client = None
        self._write(
            client=client,
            method=method,
            uri=uri,
            protocol=protocol,
            status=status,
            sent=sent,
            request=request,
            info=None,
            aborted=False,
        )
        if self._metrics is not None:
            # As the API counts a request it refuses before routing.
            self._metrics.requests.labels(
                "",
                "other",
                method.decode() if method in COUNTED_METHODS else "other",
                str(status),
            ).inc()

    def _client(self, request: http.Request) -> Client | str:
        try:
            return client_address(request, self._trusted, self._forwarded_header)
        except ValueError:
            return "-"

    def _write(
        self,
        *,
        client: Client | str,
        method: bytes | str | None,
        uri: bytes | str | None,
        protocol: bytes | str | None,
        status: int,
        sent: int,
        request: http.Request | None,
        info: RequestInfo | None,
        aborted: bool,
    ) -> None:
        """The one access line of a request, whichever way it ended."""
        access.info(
            ABORTED_FORMAT if aborted else ACCESS_FORMAT,
            client="unknown" if client is None else str(client),
            user=_field(None if info is None else info.user),
            method=_shown(method),
            uri=_shown(uri),
            protocol=_shown(protocol),
            status=status,
            bytes=sent,
            referrer=_text(_header(request, b"referer") or b"-"),
            agent=_text(_header(request, b"user-agent") or b"-"),
            namespace=_field((info and info.namespace) or None),
            cache=_field(None if info is None else info.cache),
            upstream=_field(None if info is None else info.upstream),
            duration=0.0
            if info is None
            else round(self._clock.seconds() - info.started, 3),
            aborted=aborted,
        )


def _request_line(
    line: bytes | None, http_line: bool
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """
    Method, target and version of a refused request's *line*, as far as
    they can be told (``None`` where not), cut at
    :data:`REFUSED_LINE_LIMIT` bytes: a cut line ends in ``...`` (what
    comes after, the version usually, is not shown).  A target with a
    space in it is everything between the first space and the last.
    """
    if line is None:
        return None, None, None
    cut = len(line) > REFUSED_LINE_LIMIT
    line = line[:REFUSED_LINE_LIMIT]
    method: bytes | None = None
    protocol: bytes | None = None
    target = line
    if http_line:
        first, space, rest = line.partition(b" ")
        if space:
            method, target = first, rest
            if not cut:
                before, space, last = rest.rpartition(b" ")
                if space:
                    target, protocol = before, last
    return method, target + (b"..." if cut else b""), protocol


def _shown(value: bytes | str | None) -> str:
    """A part of the request line, escaped; ``-`` when there is none."""
    return "-" if value is None else _text(value)


def _header(request: http.Request | None, name: bytes) -> bytes | None:
    """A request header's last line, as bytes (a str name would make
    Twisted decode it as UTF-8, which a client can make fail)."""
    if request is None:
        return None
    lines = request.requestHeaders.getRawHeaders(name)
    return lines[-1] if lines else None


def _field(value: str | None) -> str:
    """A field of the access line: ``-`` when there is nothing to say."""
    return "-" if value is None else _text(value)


#: What a field of the access line shows as it is: printable ASCII but
#: the quote (which ends a field of the text line) and the backslash
#: (which starts an escape).
_PLAIN = re.compile(r"[ !#-\[\]-~]*")
#: Unicode categories escaped: controls (ESC and the C1 set among them),
#: format characters (bidirectional overrides), line and paragraph
#: separators, surrogates, private use and unassigned.
_ESCAPED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _text(value: bytes | str) -> str:
    """
    A field of the access line, whose bytes a client chose (the request
    line, ``User-Agent``, ``Referer``, a user name): nothing in it reaches
    the terminal or the log shipper as a control.  Bytes are read as
    UTF-8; a byte that is not, a control or format character, ``"`` and
    ``\\`` are written ``\\xHH`` (``\\uHHHH`` beyond), in text and JSON
    lines alike, as nginx escapes its log.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if _PLAIN.fullmatch(value):
        return value
    out = []
    for character in value:
        code = ord(character)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is no UTF-8
            out.append(f"\\x{code - 0xDC00:02X}")
        elif character in '"\\' or unicodedata.category(character) in _ESCAPED:
            out.append(f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}")
        else:
            out.append(character)
    return "".join(out)
