"""
The HTTP connection: twisted.web's channel hardened for a read-only
registry on the internet, and a listener wrapper that answers a TLS
handshake on a plain-HTTP port at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from regmirror.errors import Unsupported

# -- the HTTP connection ------------------------------------------------------

#: The longest a client may take to send a request's head (slowloris).
HEADER_TIMEOUT = 30.0


class MirrorChannel(HTTPChannel):
    """
    twisted.web's HTTP connection, hardened for a read-only registry on the
    internet: the request head must arrive within :data:`HEADER_TIMEOUT`,
    request bodies are refused before a byte of them is read (no buffering,
    no smuggling through Content-Length/Transfer-Encoding games), and every
    protocol error is answered with an OCI error body.
    """

    _head_timer: Any = None
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        # The clock for a request head starts at its first byte, not at its
        # first complete line: a request line dripped a byte at a time
        # must be cut too.
        if self._head_timer is None and self.line_mode and not self._refused:
            self._head_timer = self.callLater(HEADER_TIMEOUT, self._head_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        super().lineReceived(line)

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
        self._refuse(400, "malformed HTTP request")

    def _refuse(self, status: int, message: str) -> None:
        """Answer with an OCI error, drop whatever else comes, and close."""
        if self._refused:
            return
        self._refused = True
        self._stop_head_timer()
        # Not 0: HTTPChannel would go on to dispatch the request; anything
        # else puts it in raw mode, where rawDataReceived drops it all.
        self.length = None
        body = Unsupported(message).body()
        reason = {
            400: b"Bad Request",
            408: b"Request Timeout",
            413: b"Content Too Large",
        }
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason[status], len(body), body)
        )
        transport.loseConnection()

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
                return
        super().dataReceived(data)


class PlainHTTPFactory(WrappingFactory):
    """
    Wraps a Site so that a TLS ClientHello arriving on a plain-HTTP
    listener is answered at once with a 400 and a closed connection.
    Harmless behind TLS, where the first decrypted byte is never 0x16.
    """

    protocol = _PlainOnly
