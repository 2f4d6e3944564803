"""
The TLS of the mirror's own ``ssl:`` listeners: their description, their
certificate, reloaded on SIGHUP (:class:`ReloadableTLS`), HTTP/1.1 offered
by ALPN, and a TLS protocol that writes large bodies in bulk
(:class:`BulkTLS`).
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from regmirror.transport import (
    load_certificates,
    load_private_key,
    openssl_reasons,
)

log = Logger()


_TLS_KEYS = frozenset(
    {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}
)


def parse_tls_listener(description: str) -> dict[str, str]:
    """
    The parts of an ``ssl:PORT:privateKey=…:certKey=…`` listener, unescaped.

    :raises ValueError: for anything but port, interface, backlog and the
        three file names.
    """
    pieces = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if pieces[0] != "ssl" or len(pieces) < 2:
        raise ValueError("not an ssl: listener")
    parts: dict[str, str] = {}
    for piece in pieces[1:]:
        key, equals, value = piece.partition("=")
        if not equals:
            if "port" in parts:
                raise ValueError(f"unexpected {piece!r}")
            key, value = "port", piece
        if key not in _TLS_KEYS:
            raise ValueError(f"unsupported option {key!r} for ssl: listeners")
        parts[key] = value
    if "port" not in parts or not parts["port"].isdigit():
        raise ValueError("an ssl: listener needs a port number")
    if "privateKey" not in parts:
        raise ValueError("an ssl: listener needs privateKey=")
    parts.setdefault("certKey", parts["privateKey"])
    return parts


#: The one application protocol the mirror's listeners speak over TLS.
_HTTP11 = b"http/1.1"

#: ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (OpenSSL's ``ssl.h``; pyOpenSSL sets it
#: on every context and exports no name for it).
_PARTIAL_WRITE = 0x1
#: The most plaintext handed to OpenSSL in one call: many TLS records.
_BULK = 1024 * 1024
#: Bytes a TLS record adds to its plaintext, at most (TLS 1.3: header 5,
#: content type 1, AEAD tag 16; TLS 1.2 AES-GCM: header 5, nonce 8, tag 16).
_RECORD_OVERHEAD = 32
_RECORD = 16 * 1024
#: What Twisted reads from the send BIO at a time.
_BIO_READ = 32 * 1024


class BulkTLS(BufferingTLSTransport):
    """
    TLS on the mirror's listeners, written in bulk.

    Twisted hands OpenSSL 16 KiB of plaintext at a time and moves each
    record to the socket on its own: for a blob that is 64 trips a MiB
    through pyOpenSSL and the TCP transport, each with a copy of its
    slice, which cost more CPU than the encryption.  Here one write of the
    body (a reader's chunk) goes to OpenSSL at once, without a copy (the
    listener's context does not allow partial writes, so OpenSSL cuts all
    its records in one call, into the memory BIO that never fills), and
    the records come out of the BIO in one read, as one write to the TCP
    transport, whose back-pressure (pausing the producer) is unchanged.
    Everything else, the handshake, reading, shutdown, is Twisted's.

    Kernel TLS, which would let ``sendfile`` serve TLS too, is out of reach:
    OpenSSL enables it only on a socket BIO, and Twisted drives OpenSSL
    through memory BIOs (pyOpenSSL exposes no way to hand the keys over).
    """

    def _write(self, data: bytes) -> None:
        # Overrides Twisted's private method, with its contract: called
        # with the application's bytes, and by _unbufferPendingWrites with
        # those OpenSSL could not take yet.
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        done = 0
        while done < len(view):
            piece = view[done : done + _BULK]
            try:
                sent: int = self._tlsConnection.send(piece)
            except SSL.WantReadError:
                # OpenSSL needs the peer first (a handshake under way):
                # tried again, from the same byte, once it has spoken.
                self._bufferedWrite(bytes(view[done:]))
                return
            except SSL.Error:
                # As Twisted does: the connection ends with this failure.
                self._tlsShutdownFinished(Failure())
                return
            done += sent
            self._drain(sent + (sent // _RECORD + 1) * _RECORD_OVERHEAD)

    def makeConnection(self, transport: Any) -> None:
        # A bulk write's records go to the socket in one call when it has
        # room, not 128 KiB (Twisted's SEND_LIMIT) per reactor turn.
        transport.SEND_LIMIT = _BULK
        super().makeConnection(transport)

    def _flushSendBIO(self) -> None:
        # Twisted's reads at most 32 KiB, one record after one write of
        # 16 KiB; a bulk write leaves many.
        self._drain(_BIO_READ)

    def _drain(self, size: int) -> None:
        """
        Move everything in the send BIO to the TCP transport, *size* bytes
        at most at a time: a read that returns less has emptied it.
        """
        transport = self.transport
        assert transport is not None
        while True:
            try:
                records: bytes = self._tlsConnection.bio_read(size)
            except SSL.WantReadError:
                return
            transport.write(records)
            if len(records) < size:
                return


class ListenerTLSFactory(TLSMemoryBIOFactory):
    """TLS in front of a listener's factory, with :class:`BulkTLS`."""

    protocol = BulkTLS


def _choose_http11(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """
    ALPN on the mirror's listeners: ``http/1.1`` whenever the client offers
    it, ``h2`` first or not (curl, browsers, Go, urllib3 2.x); to a client
    that does not, the ``no_application_protocol`` alert of RFC 7301.

    Twisted's own choice asks the protocol factory behind TLS for its
    protocols; a wrapping factory has none, and the empty choice it then
    returns made OpenSSL answer every ALPN client with ``internal_error``.
    """
    if _HTTP11 in offered:
        return _HTTP11
    # pyOpenSSL re-raises this from the handshake, where Twisted reads it as
    # OpenSSL's own error queue: (library, function, reason) triples.
    raise SSL.Error([("regmirror", "ALPN", "no application protocol in common")])


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    A listener's certificate: TLS 1.2 or newer, the chain taken from the
    certificate file itself (certbot's ``fullchain.pem``) and from
    ``extraCertChain``, and ``http/1.1`` for clients that negotiate an
    application protocol (ALPN), whatever factory serves the connections.
    :meth:`reload` reads the files again; connections already open keep
    the certificate they started with.

    :raises ValueError: from the constructor, for unusable files.
    """

    def __init__(self, parts: dict[str, str]) -> None:
        self._parts = parts
        self._options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        parts = self._parts
        # Each raises ValueError naming the file that is not usable.
        key = load_private_key(parts["privateKey"])
        chain = load_certificates(parts["certKey"])
        if "extraCertChain" in parts:
            chain += load_certificates(parts["extraCertChain"])
        try:
            leaf = ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], key)
            extra = [certificate.original for certificate in chain[1:]]
            options = ssl.CertificateOptions(
                privateKey=leaf.privateKey.original,
                certificate=leaf.original,
                extraCertChain=extra,
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            )
            # The context every connection of these options is made from;
            # nothing has used it yet, so it may still be changed.
            context = options.getContext()
            context.set_alpn_select_callback(_choose_http11)
            # One call encrypts the whole of a bulk write (BulkTLS); Twisted
            # itself never gives OpenSSL more than a record at a time.
            context.clear_mode(_PARTIAL_WRITE)
        except VerifyError as e:
            # A renewal that wrote the certificate but not yet the key.
            raise ValueError(f"{parts['certKey']}: {e}") from None
        except (SSL.Error, crypto.Error) as e:
            raise ValueError(
                f"unusable certificate or key: {openssl_reasons(e)}"
            ) from None
        return options

    def reload(self) -> None:
        """Read the files again; keep the old certificate if they are bad."""
        self._options = self._load()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.serverConnectionForTLS(tlsProtocol)
        return connection


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """A TCP endpoint whose connections speak TLS (:class:`BulkTLS`)."""

    def __init__(
        self, tcp: IStreamServerEndpoint, tls: ReloadableTLS, clock: Any
    ) -> None:
        self._tcp = tcp
        self._tls = tls
        self._clock = clock

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        tls = ListenerTLSFactory(self._tls, False, factory, clock=self._clock)
        listening: Deferred[Any] = self._tcp.listen(tls)
        return listening


def tls_listener(reactor: Any, description: str) -> tuple[Any, ReloadableTLS]:
    """An endpoint for an ``ssl:`` description, with a reloadable certificate."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    parts = parse_tls_listener(description)
    tls = ReloadableTLS(parts)
    # What Twisted's SSL4ServerEndpoint does (listenSSL), with BulkTLS.
    tcp = TCP4ServerEndpoint(
        reactor,
        int(parts["port"]),
        backlog=int(parts.get("backlog", "50")),
        interface=parts.get("interface", ""),
    )
    return _TLSServerEndpoint(tcp, tls, reactor), tls
