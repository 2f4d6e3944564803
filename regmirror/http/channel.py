"""
The HTTP connection: twisted.web's channel hardened for a read-only
registry on the internet, and a listener wrapper that answers a TLS
handshake on a plain-HTTP port at once.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import evolve
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from regmirror.errors import Unsupported
from regmirror.http.errors import error_answer

# -- the HTTP connection ------------------------------------------------------

#: The longest a client may take to send a request's head (slowloris).
HEADER_TIMEOUT = 30.0
#: The longest request line taken, in bytes without its line end (twisted's
#: line limit); a longer one is answered with 414.
MAX_REQUEST_LINE = 16384
#: The most bytes of header lines a request may carry, line ends not
#: counted; more, or one longer line, is answered with 431.
MAX_HEADER_BYTES = 16384
#: The most header lines a request may carry (twisted's own limit); more is
#: answered with 431.
MAX_HEADERS = 500

#: Methods by the first segment of the path; GET and HEAD anywhere else.
_METHODS = {b"token": (b"GET",)}
_ANYWHERE = (b"GET", b"HEAD")

#: The most bytes of a refused request's line its access line shows (a
#: request line may be 16 KiB, and one refused as too long is longer); a
#: line cut there ends in ``...``.  One more is kept, to tell.
REFUSED_LINE_LIMIT = 512

_REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def allowed_methods(target: bytes) -> tuple[bytes, ...]:
    """
    The methods the mirror answers for a request target: GET and HEAD,
    the token endpoint GET only.  Everything it serves is read-only.
    """
    path = target
    if not path.startswith(b"/"):
        # absolute-form (``http://host/path``) or ``*``
        _, scheme, rest = path.partition(b"://")
        path = b"/" + rest.partition(b"/")[2] if scheme else b""
    first = path.split(b"?", 1)[0].split(b"/")[1:2]
    return _METHODS.get(unquote_to_bytes(first[0]) if first else b"", _ANYWHERE)


def _bare_lf(before: bytes, data: bytes) -> bool:
    """Does *data* (after the byte *before*) hold an LF without its CR?"""
    start = 0
    for _ in range(len(data)):
        index = data.find(b"\n", start)
        if index < 0:
            return False
        previous = data[index - 1 : index] if index else before
        if previous != b"\r":
            return True
        start = index + 1
    return False


class MirrorChannel(HTTPChannel):
    """
    twisted.web's HTTP connection, hardened for a read-only registry on the
    internet: the request head must arrive within :data:`HEADER_TIMEOUT`
    and fit the limits above (414 or 431 otherwise), a method the mirror
    does not serve gets 405 as soon as the head has arrived, request bodies
    are refused before a byte of them is read (no buffering, no smuggling
    through Content-Length/Transfer-Encoding games), and every protocol
    error is answered with an OCI error body and a closed connection.
    """

    MAX_LENGTH = max(MAX_REQUEST_LINE, MAX_HEADER_BYTES)
    # Ours are checked first, each with its own answer; twisted's would
    # only ever say 400.
    totalHeadersSize = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1
    maxHeaders = MAX_HEADERS + 1

    _head_timer: Any = None
    _refused = False
    #: the last byte received, for a CRLF split between two reads
    _before = b""
    #: between a request line and the end of its head
    _in_head = False
    _method = b""
    _header_bytes = 0
    _header_lines = 0
    #: what the request's method should have been, when it is not
    _not_allowed: tuple[bytes, ...] | None = None
    #: the request line of the request whose head is being read, for the
    #: access line of a refusal
    _line: bytes | None = None
    #: the first bytes of a request line not yet whole (as many as the
    #: access line would show, and one more)
    _start = b""
    #: the request object twisted.web made for that request, if any
    _current: Any = None

    def dataReceived(self, data: bytes) -> None:
        # The clock for a request head starts at its first byte, not at its
        # first complete line: a request line dripped a byte at a time
        # must be cut too.
        if self._head_timer is None and self.line_mode and not self._refused:
            self._head_timer = self.callLater(HEADER_TIMEOUT, self._head_too_slow)
        kept = len(self._start)
        if self.line_mode and not self._in_head and kept <= REFUSED_LINE_LIMIT:
            self._start += data[: REFUSED_LINE_LIMIT + 1 - kept]
        if self.line_mode and not self._refused and _bare_lf(self._before, data):
            # Lines end with CRLF here; a head of bare LFs would otherwise
            # wait, one unfinished line, for the head timeout.
            self._refuse(400, "request lines must end with CRLF, not a bare LF")
            return
        self._before = data[-1:] or self._before
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not self._in_head:
            if line:
                self._request_line(line)
            else:
                super().lineReceived(line)  # tolerated before a request
        elif line:
            self._header_line(line)
        else:
            self._end_of_head()

    def _request_line(self, line: bytes) -> None:
        self._in_head = True
        self._header_bytes = self._header_lines = 0
        self._not_allowed = None
        self._line, self._start, self._current = line, b"", None
        made = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > made:
            self._current = self.requests[-1]
        parts = line.split(b" ")
        if self._refused or len(parts) != 3:
            return
        # METHOD TARGET VERSION, or twisted would have refused it.
        method, target, _ = parts
        self._method = method
        allowed = allowed_methods(target)
        if method not in allowed:
            self._not_allowed = allowed

    def _header_line(self, line: bytes) -> None:
        self._header_bytes += len(line)
        self._header_lines += 1
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(
                431, f"the request's header lines exceed {MAX_HEADER_BYTES} bytes"
            )
        elif self._header_lines > MAX_HEADERS:
            self._refuse(431, f"the request has more than {MAX_HEADERS} header lines")
        elif self._not_allowed is None:
            super().lineReceived(line)
        # else: the headers of a request refused anyway are not even parsed,
        # so that no framing game can turn its 405 into anything else.

    def _end_of_head(self) -> None:
        self._in_head = False
        allowed = self._not_allowed
        if allowed is None:
            super().lineReceived(b"")
            # Answered (413) or dispatched: what comes next is another request.
            self._method = b""
            self._line = self._current = None
            return
        self._refuse(
            405,
            "this mirror is read-only: only "
            + " and ".join(m.decode("ascii") for m in allowed)
            + " here",
            {"Allow": ", ".join(m.decode("ascii") for m in allowed)},
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_head:
            self._refuse(431, f"a header line exceeds {MAX_HEADER_BYTES} bytes")
        else:
            self._start = line[: REFUSED_LINE_LIMIT + 1]
            self._refuse(414, f"the request line exceeds {MAX_REQUEST_LINE} bytes")

    def allHeadersReceived(self) -> None:
        self._stop_head_timer()
        if self.length != 0:
            self._refuse(
                413, "request bodies are not accepted: this mirror is read-only"
            )
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._refuse(408, f"the request head did not arrive within {HEADER_TIMEOUT:g}s")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel's private hook for every malformed request (the one
        # place a private Twisted API is overridden; tests/test_private_apis.py
        # fails if it changes): an OCI error instead of a bare 400.
        self._refuse(400, "malformed HTTP request")

    def _refuse(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Answer with an OCI error, drop whatever else comes, and close."""
        if self._refused:
            return
        self._refused = True
        self._stop_head_timer()
        # Not 0: HTTPChannel would go on to dispatch the request; anything
        # else, in raw mode, makes rawDataReceived drop it all unparsed.
        self.length = None
        self.setRawMode()
        # Every protocol error is UNSUPPORTED, with the status that names it.
        answer = evolve(error_answer(Unsupported(message, headers)), status=status)
        fields = b"".join(b"%s: %s\r\n" % field for field in answer.headers)
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\n%sConnection: close\r\n\r\n"
            % (answer.status, _REASONS[answer.status], fields)
        )
        if self._method != b"HEAD":
            transport.write(answer.body)
        transport.loseConnection()
        self._log_refused(status, 0 if self._method == b"HEAD" else len(answer.body))

    def _log_refused(self, status: int, sent: int) -> None:
        """The access line of the request refused: one per request."""
        log = getattr(getattr(self, "site", None), "log_refused", None)
        if log is None:
            return
        line = self._line
        if line is None and self._start:
            # Not whole: as far as it came, to its first line end.
            line = self._start.split(b"\n", 1)[0].removesuffix(b"\r") or None
        transport: Any = self.transport
        log(transport.getPeer(), status, sent, line, self._current)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_head_timer()
        super().connectionLost(reason)


# -- TLS on a plain port ----------------------------------------------------

#: What Go's net/http answers; clients recognise it and fall back to HTTP.
_TLS_ON_PLAIN = (
    b"HTTP/1.0 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n"
    b"Client sent an HTTPS request to an HTTP server.\n"
)


class _PlainOnly(ProtocolWrapper):
    """Watches the first byte: 0x16 starts a TLS handshake, never HTTP."""

    _checked = False

    def dataReceived(self, data: bytes) -> None:
        if not self._checked and data:
            self._checked = True
            if data[:1] == b"\x16":
                transport: Any = self.transport
                transport.write(_TLS_ON_PLAIN)
                transport.loseConnection()
                site = getattr(self.factory, "wrappedFactory", None)
                log = getattr(site, "log_refused", None)
                if log is not None:
                    log(
                        transport.getPeer(),
                        400,
                        len(_TLS_ON_PLAIN.partition(b"\r\n\r\n")[2]),
                        data,
                        http_line=False,
                    )
                return
        super().dataReceived(data)


class PlainHTTPFactory(WrappingFactory):
    """
    Wraps a Site so that a TLS ClientHello arriving on a plain-HTTP
    listener is answered at once with a 400 and a closed connection.

    For plain listeners only: behind TLS it is pointless, and it hides the
    Site's ALPN protocols (``IProtocolNegotiationFactory``) from the TLS
    layer, which then answered every client offering ALPN with an
    ``internal_error`` alert.
    """

    protocol = _PlainOnly


def listener_factory(site: IProtocolFactory, description: str) -> IProtocolFactory:
    """
    What serves a listener described by *description*: the plain-port
    sniffer around *site* on plain listeners, *site* itself behind TLS
    (``ssl:``), where ALPN must see the site.
    """
    if description.startswith("ssl:"):
        return site
    return PlainHTTPFactory(site)
