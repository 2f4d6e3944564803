"""
How the mirror reaches one upstream: TLS verification (system trust store,
a custom CA bundle, client certificates, or an explicit, loudly logged
``insecure``) and an optional outbound HTTP proxy (``CONNECT`` tunnels for
https, absolute-form requests for http), over a connection pool per way
of connecting; and the certificate and key files both ends use.  The
mirror's own ``ssl:`` listeners are :mod:`regmirror.tls_listener`'s.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from attrs import define, field
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, VerifyError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
)
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from regmirror.config import UpstreamConfig
from regmirror.hosts import same_site

log = Logger()

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
#: The most a proxy may say before its answer to CONNECT ends.
_MAX_PROXY_HEAD = 16 * 1024


#: A private key in PEM: PKCS#8 (``PRIVATE KEY``, ``ENCRYPTED PRIVATE KEY``)
#: or traditional (``RSA PRIVATE KEY``, ``EC PRIVATE KEY``).
_PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
    re.DOTALL,
)


class CertificateError(ValueError):
    """
    A certificate or key file that cannot be used, with the configuration
    *key* that names it (``ca_file``, ``client_cert``, ``client_key``).
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _read(path: str) -> bytes:
    """
    :raises ValueError: naming *path*, when it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def openssl_reasons(error: Exception) -> str:
    """OpenSSL's reasons, from its error queue's (library, function, reason)."""
    found = error.args[0] if error.args else None
    if isinstance(found, list):
        reasons = [str(entry[-1]) for entry in found if entry]
        if reasons:
            return ", ".join(reasons)
    return str(error) or type(error).__name__


def load_certificates(path: str) -> list[ssl.Certificate]:
    """
    Every PEM certificate in the file at *path*, in order.

    :raises ValueError: naming *path*: unreadable, no PEM certificate in
        it, or one that OpenSSL cannot read.
    """
    found = _PEM_CERTIFICATE.findall(_read(path))
    if not found:
        raise ValueError(f"no PEM certificate in {path}")
    try:
        return [ssl.Certificate.loadPEM(pem) for pem in found]
    except (crypto.Error, SSL.Error) as e:
        raise ValueError(
            f"a certificate in {path} is unusable: {openssl_reasons(e)}"
        ) from None


def _no_passphrase(*_: object) -> bytes:
    # Never OpenSSL's prompt on the terminal: an encrypted key fails.
    return b""


def load_private_key(path: str) -> ssl.KeyPair:
    """
    The first PEM private key in the file at *path* (with or without
    certificates around it).

    :raises ValueError: naming *path*: unreadable, no PEM private key in
        it, an encrypted one, or one that OpenSSL cannot read.
    """
    found = _PEM_KEY.search(_read(path))
    if found is None:
        raise ValueError(f"no PEM private key in {path}")
    pem = found.group(0)
    if b"ENCRYPTED" in found.group(1) or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise ValueError(f"the private key in {path} is encrypted: give it in clear")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, pem, _no_passphrase)
    except (crypto.Error, SSL.Error) as e:
        raise ValueError(
            f"the private key in {path} is unusable: {openssl_reasons(e)}"
        ) from None
    return ssl.KeyPair(key)


def _certificate_with_key(
    certificate: ssl.Certificate, key: ssl.KeyPair, key_path: str, cert_path: str
) -> ssl.PrivateCertificate:
    """
    :raises ValueError: when *key* is not the certificate's.
    """
    try:
        both: ssl.PrivateCertificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            certificate, key
        )
    except VerifyError:
        raise ValueError(
            f"the private key in {key_path} is not the key of the certificate "
            f"in {cert_path}"
        ) from None
    return both


@implementer(IPolicyForHTTPS)
class UpstreamTLS:
    """
    TLS settings of one upstream.  Hosts on the upstream's own site (its
    registrable domain: the registry, its token realm) are verified against
    ``ca_file`` when one is given and get the client certificate; any other
    host (a CDN a blob redirects to) against the system trust store.

    :raises CertificateError: from the constructor, for an unreadable or
        malformed certificate file, naming it and the key that gives it.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self._host = config.host
        self._insecure = config.insecure
        self._default = BrowserLikePolicyForHTTPS()
        self._trust: Any = None
        self._client: ssl.PrivateCertificate | None = None
        if config.ca_file is not None:
            try:
                certificates = load_certificates(config.ca_file)
            except ValueError as e:
                raise CertificateError("ca_file", str(e)) from None
            self._trust = ssl.trustRootFromCertificates(certificates)
        if config.client_cert is not None:
            self._client = _client_certificate(config.client_cert, config.client_key)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        name = hostname.decode("ascii")
        if not same_site(name, self._host):
            return self._default.creatorForNetloc(hostname, port)
        if self._insecure:
            return _Unverified(name, self._client)
        return ssl.optionsForClientTLS(
            name, trustRoot=self._trust, clientCertificate=self._client
        )


def _client_certificate(cert_path: str, key_path: str | None) -> ssl.PrivateCertificate:
    """
    ``client_cert``'s certificate with its key: from ``client_key``, else
    from ``client_cert``'s own file.

    :raises CertificateError: naming the key whose file is at fault.
    """
    try:
        (certificate, *_) = load_certificates(cert_path)
    except ValueError as e:
        raise CertificateError("client_cert", str(e)) from None
    key_key = "client_cert" if key_path is None else "client_key"
    try:
        key = load_private_key(cert_path if key_path is None else key_path)
    except ValueError as e:
        extra = " (give it in client_key)" if key_path is None else ""
        raise CertificateError(key_key, f"{e}{extra}") from None
    try:
        return _certificate_with_key(certificate, key, key_path or cert_path, cert_path)
    except ValueError as e:
        raise CertificateError(key_key, str(e)) from None


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without any certificate check, for ``insecure = true`` only."""

    def __init__(self, hostname: str, client: ssl.PrivateCertificate | None) -> None:
        extra: dict[str, Any] = {}
        if client is not None:
            extra = {
                "privateKey": client.privateKey.original,
                "certificate": client.original,
            }
        self._context = ssl.CertificateOptions(verify=False, **extra).getContext()
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        try:
            ipaddress.ip_address(self._hostname)
        except ValueError:
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


_CLOSED = Failure(ConnectError(string="the proxy closed the connection"))


class _Tunnel(Protocol):
    """Asks an HTTP proxy for a ``CONNECT`` tunnel, then hands the socket over."""

    def __init__(self, target: bytes, factory: IProtocolFactory) -> None:
        self.ready: Deferred[IProtocol] = Deferred()
        self._target = target
        self._factory = factory
        self._head = b""
        self._inner: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (self._target, self._target)
        )

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._head += data
        if b"\r\n\r\n" not in self._head:
            if len(self._head) > _MAX_PROXY_HEAD:
                self._refuse("the proxy's answer is too long")
            return
        head, rest = self._head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if len(status) < 2 or status[1] != b"200":
            line = head.split(b"\r\n", 1)[0].decode("latin-1")[:100]
            self._refuse(f"the proxy refused CONNECT: {line}")
            return
        assert self.transport is not None
        self._inner = self._factory.buildProtocol(self.transport.getPeer())
        self._inner.makeConnection(self.transport)
        self.ready.callback(self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        transport: Any = self.transport
        transport.abortConnection()
        if not self.ready.called:
            self.ready.errback(ConnectError(string=why))

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(reason)


@implementer(IStreamClientEndpoint)
class _TunnelEndpoint:
    def __init__(self, proxy: IStreamClientEndpoint, host: bytes, port: int) -> None:
        self._proxy = proxy
        self._target = b"%s:%d" % (host, port)

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        tunnel = _Tunnel(self._target, factory)
        connecting = self._proxy.connect(Factory.forProtocol(lambda: tunnel))
        return connecting.addCallback(lambda _: tunnel.ready)


@implementer(IAgentEndpointFactory)
class _TunnelEndpoints:
    def __init__(self, proxy: IStreamClientEndpoint, tls: IPolicyForHTTPS) -> None:
        self._proxy = proxy
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise ConnectError(string="only https is tunnelled")
        creator = self._tls.creatorForNetloc(uri.host, uri.port)
        return wrapClientTLS(creator, _TunnelEndpoint(self._proxy, uri.host, uri.port))


@implementer(IAgent)
class _ProxiedAgent:
    """https through ``CONNECT`` tunnels, http as absolute-form requests."""

    def __init__(self, https: IAgent, http: IAgent) -> None:
        self._https = https
        self._http = http

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        agent = self._https if uri.startswith(b"https:") else self._http
        return agent.request(method, uri, headers, bodyProducer)


def connection_identity(config: UpstreamConfig | None) -> tuple[object, ...]:
    """
    What a connection opened for *config*'s upstream is bound to: its
    outbound proxy, and its TLS settings with the host they apply to (see
    :class:`UpstreamTLS`).  ``None`` (the bucket's and the other nodes'
    agents) is an upstream without either.
    """
    if config is None:
        return (None, ())
    tls: tuple[object, ...] = ()
    if config.insecure or config.ca_file or config.client_cert or config.client_key:
        tls = (
            config.host,
            config.insecure,
            config.ca_file,
            config.client_cert,
            config.client_key,
        )
    return (config.proxy, tls)


@define(eq=False)
class ConnectionPools:
    """
    Persistent connection pools, one per way of connecting
    (:func:`connection_identity`).  Twisted's pool keys connections by
    scheme, host and port alone: in one pool, a connection opened with one
    upstream's TLS settings (no verification, a client certificate, its
    own CA) or through its proxy would carry another upstream's request or
    redirect to the same host.  Upstreams that connect alike share a pool,
    and each keeps its warm connections.

    :ivar make: a new, empty pool.
    """

    make: Callable[[], HTTPConnectionPool]
    _pools: dict[tuple[object, ...], HTTPConnectionPool] = field(factory=dict)

    def pool_for(self, config: UpstreamConfig | None = None) -> HTTPConnectionPool:
        """The pool for *config*'s upstream (``None``: no TLS settings)."""
        identity = connection_identity(config)
        pool = self._pools.get(identity)
        if pool is None:
            pool = self._pools[identity] = self.make()
        return pool


def agent_for(config: UpstreamConfig, reactor: Any, pool: HTTPConnectionPool) -> IAgent:
    """The agent that reaches *config*'s upstream as configured."""
    tls = UpstreamTLS(config)
    if config.insecure:
        log.warn(
            "upstream {upstream}: TLS certificate verification is OFF (insecure = "
            "true): anyone on the path can impersonate {host}",
            upstream=config.name,
            host=config.host,
        )
    if config.proxy is None:
        return Agent(
            reactor,
            contextFactory=tls,
            connectTimeout=config.connect_timeout,
            pool=pool,
        )
    proxy_uri = URI.fromBytes(config.proxy.encode("ascii"))
    proxy = HostnameEndpoint(
        reactor, proxy_uri.host, proxy_uri.port, timeout=config.connect_timeout
    )
    return _ProxiedAgent(
        Agent.usingEndpointFactory(reactor, _TunnelEndpoints(proxy, tls), pool=pool),
        ProxyAgent(proxy, reactor, pool=pool),
    )


# -- serving TLS ------------------------------------------------------------
