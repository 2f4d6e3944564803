"""
The mirror's listeners in memory: TLS with ALPN as browsers, curl, Go and
urllib3 offer it, wired as :func:`regmirror.service.build_tree` wires them
in the parent and in the worker processes.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Site

from regmirror.http.channel import PlainHTTPFactory
from regmirror.http.site import MirrorSite
from regmirror.ini import load
from regmirror.listeners import (
    DEFAULT_BACKLOG,
    Adopt,
    AdoptedListener,
    Bind,
    BoundListener,
    Inherited,
    listen_address,
    with_backlog,
)
from regmirror.service import Worker, build_tree, make_service
from regmirror.tls_listener import ListenerTLSFactory, ReloadableTLS

HOST = "regmirror.test"
GET = b"GET /healthz HTTP/1.1\r\nHost: regmirror.test\r\nConnection: close\r\n\r\n"


def write_certificate(folder: Path, name: str = HOST) -> bytes:
    """``key.pem`` and ``cert.pem`` for *name* in *folder*; the certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / "cert.pem").write_bytes(pem)
    return pem


class _Client(Protocol):
    """Keeps what it receives, the ALPN protocol it was received over, and
    why the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.negotiated: bytes | None = None
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.negotiated = getattr(self.transport, "negotiatedProtocol", None)
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def behind_tls(factory: Any, certificate: Any) -> TLSMemoryBIOFactory:
    """*factory* behind TLS with *certificate*, as ``listenSSL`` wires them."""
    return TLSMemoryBIOFactory(certificate, False, factory, clock=CLOCK)


#: TLS aggregates small writes until the next reactor turn, on this clock.
CLOCK = Clock()


def handshake(
    server: Any,
    certificate: bytes,
    offered: list[bytes] | None,
    data: bytes = GET,
    clock: Clock = CLOCK,
) -> _Client:
    """
    Connect a TLS client offering *offered* over ALPN (``None``: no ALPN)
    to *server*, a TLS protocol factory using *clock*, in memory; send
    *data*.

    :return: the client's application protocol, once every byte has moved.
    """
    options = ssl.optionsForClientTLS(
        HOST,
        trustRoot=ssl.Certificate.loadPEM(certificate),
        acceptableProtocols=offered,
    )
    application = _Client()
    client_factory = TLSMemoryBIOFactory(
        options, True, Factory.forProtocol(lambda: application), clock=clock
    )
    address = IPv4Address("TCP", "127.0.0.1", 443)
    _, _, pump = connectedServerAndClient(
        lambda: server.buildProtocol(address),
        lambda: client_factory.buildProtocol(address),
        clock=clock,
    )
    assert application.transport is not None
    application.transport.write(data)
    pump.flush()
    return application


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


def _mirror_site() -> MirrorSite:
    root = Resource()
    root.putChild(b"healthz", _Ok())
    return MirrorSite(root, Clock())


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[ReloadableTLS, bytes]:
    pem = write_certificate(tmp_path)
    parts = {
        "privateKey": str(tmp_path / "key.pem"),
        "certKey": str(tmp_path / "cert.pem"),
    }
    return ReloadableTLS(parts), pem


SERVED = {
    "mirror-site": _mirror_site,
    "plain-port-wrapper": lambda: PlainHTTPFactory(_mirror_site()),
    "twisted-site": lambda: Site(_Ok()),
}


@pytest.mark.parametrize("behind", list(SERVED))
@pytest.mark.parametrize(
    "offered",
    [
        [b"h2", b"http/1.1"],
        [b"http/1.1"],
        [b"http/1.1", b"h2"],
        [b"spdy/3", b"http/1.1"],
    ],
)
def test_tls_listener_negotiates_http11_with_alpn_clients(
    certificate: tuple[ReloadableTLS, bytes], behind: str, offered: list[bytes]
) -> None:
    """
    A listener's certificate (:class:`ReloadableTLS`) picks ``http/1.1``
    for a client that offers it over ALPN, ``h2`` first or not (curl,
    Chromium, Go, urllib3 2.x), whatever protocol factory is behind it:
    a wrapper that knows nothing of ALPN made OpenSSL answer every such
    client with an ``internal_error`` alert.
    """
    listener, pem = certificate
    application = handshake(behind_tls(SERVED[behind](), listener), pem, offered)
    assert application.negotiated == b"http/1.1", application.lost
    assert application.received.startswith(b"HTTP/1.1 200 "), application.lost


class _Sender(Protocol):
    """Writes *body* in one write once connected: before the TLS handshake
    is over, so that TLS holds it until then."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.body)


@pytest.mark.parametrize("size", [1, 16 * 1024, 1024 * 1024 + 5, 3 * 1024 * 1024])
def test_tls_listener_writes_a_large_body_in_bulk(
    certificate: tuple[ReloadableTLS, bytes], size: int
) -> None:
    """
    A listener's TLS (``BulkTLS``) encrypts one large write whole and hands
    its records to the TCP transport in a few writes, where Twisted's own
    TLS makes one per 16 KiB record (65 for a MiB); the client gets every
    byte, in order, also of a write made before the handshake was over.
    """
    listener, pem = certificate
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    server_factory = ListenerTLSFactory(
        listener, False, Factory.forProtocol(lambda: _Sender(body)), clock=CLOCK
    )
    application = _Client()
    client_factory = TLSMemoryBIOFactory(
        ssl.optionsForClientTLS(HOST, trustRoot=ssl.Certificate.loadPEM(pem)),
        True,
        Factory.forProtocol(lambda: application),
        clock=CLOCK,
    )
    address = IPv4Address("TCP", "127.0.0.1", 443)
    _, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(address),
        lambda: client_factory.buildProtocol(address),
        greet=False,
        clock=CLOCK,
    )
    writes: list[int] = []
    tcp = server.transport
    write = tcp.write

    def counted(data: bytes) -> None:
        writes.append(len(data))
        write(data)

    tcp.write = counted
    pump.flush()
    assert application.received == body, application.lost
    assert sum(writes) > size
    # The handshake's flights, a few small records after it, and the body's
    # records: one write a MiB (Twisted's own TLS: 64).
    assert len(writes) < 10 + size // (1024 * 1024), writes


def test_tls_listener_without_alpn(certificate: tuple[ReloadableTLS, bytes]) -> None:
    """A client offering no ALPN (skopeo, ctr, ``openssl s_client``) gets
    no protocol named and is served HTTP/1.1."""
    listener, pem = certificate
    application = handshake(behind_tls(_mirror_site(), listener), pem, None)
    assert application.negotiated is None
    assert application.received.startswith(b"HTTP/1.1 200 ")


def test_tls_listener_refuses_h2_only_clients_with_the_right_alert(
    certificate: tuple[ReloadableTLS, bytes],
) -> None:
    """A client that offers nothing but ``h2`` gets the alert RFC 7301
    names for it, ``no_application_protocol``, not an ``internal_error``
    that sends its operator looking for a bug."""
    listener, pem = certificate
    application = handshake(behind_tls(_mirror_site(), listener), pem, [b"h2"])
    assert application.received == b""
    assert application.lost is not None
    assert "no application protocol" in str(application.lost.value), application.lost


def test_reloaded_certificate_still_negotiates_http11(
    tmp_path: Path, certificate: tuple[ReloadableTLS, bytes]
) -> None:
    """After :meth:`ReloadableTLS.reload` (SIGHUP), ALPN clients are served
    with the new certificate, still on ``http/1.1``."""
    listener, _ = certificate
    renewed = write_certificate(tmp_path)
    listener.reload()
    application = handshake(
        behind_tls(_mirror_site(), listener), renewed, [b"h2", b"http/1.1"]
    )
    assert application.negotiated == b"http/1.1", application.lost
    assert application.received.startswith(b"HTTP/1.1 200 ")


def test_certificate_without_its_key_is_not_reloaded(
    tmp_path: Path, certificate: tuple[ReloadableTLS, bytes]
) -> None:
    """A renewal caught half way (a new certificate beside the old key) is
    refused with a ValueError naming the file, which the SIGHUP handler
    logs on one line; the old certificate goes on serving."""
    listener, old = certificate
    renewed = tmp_path / "renewed"
    write_certificate(renewed)
    (tmp_path / "cert.pem").write_bytes((renewed / "cert.pem").read_bytes())
    with pytest.raises(ValueError, match="cert.pem: .*do not match"):
        listener.reload()
    application = handshake(behind_tls(_mirror_site(), listener), old, [b"http/1.1"])
    assert application.received.startswith(b"HTTP/1.1 200 ")


def test_mirror_site_offers_http11_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirror's channel speaks HTTP/1.1 only, so its site never names
    ``h2`` as acceptable, even where twisted.web could speak HTTP/2 (the
    ``h2`` package installed): an HTTP/2 client on an HTTP/1.1 channel
    would get nothing but errors."""
    monkeypatch.setattr(http, "H2_ENABLED", True)
    assert Site(Resource()).acceptableProtocols()[0] == b"h2"
    assert _mirror_site().acceptableProtocols() == [b"http/1.1"]


def _config(tmp_path: Path) -> Path:
    tls = "ssl:0:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"
    return write_config(
        tmp_path, f"metrics_listen = {tls}", listen=f"tcp:0:interface=127.0.0.1 {tls}"
    )


def test_service_tls_listeners_negotiate_http11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    As :func:`make_service` wires them: the ``ssl:`` listener of the API
    and the ``ssl:`` metrics listener both pick ``http/1.1`` for a client
    offering ``h2`` and ``http/1.1`` and answer it; the plain listener
    still answers a TLS handshake with the plain-port 400.
    """
    pem = write_certificate(tmp_path)
    monkeypatch.chdir(tmp_path)
    reactor = MemoryReactorClock()
    service = make_service(load(str(_config(tmp_path))), reactor)
    service.privilegedStartService()
    # TCP listeners whose factory puts TLS in front: the API's listeners
    # first, then the metrics listener's.
    tls = [f for _, f, _, _ in reactor.tcpServers if isinstance(f, ListenerTLSFactory)]
    for path, factory in zip((b"/healthz", b"/metrics"), tls, strict=True):
        request = GET.replace(b"/healthz", path)
        application = handshake(
            factory, pem, [b"h2", b"http/1.1"], request, clock=reactor
        )
        assert application.negotiated == b"http/1.1", (path, application.lost)
        assert application.received.startswith(b"HTTP/1.1 200 "), path
    [plain] = [f for _, f, _, _ in reactor.tcpServers if f not in tls]
    protocol = plain.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")


def _inherited(description: str) -> Inherited:
    """A listening socket as a worker inherits it (the tree closes it)."""
    return Inherited(socket.socket().detach(), socket.AF_INET, description)


def test_worker_tls_listeners_negotiate_http11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A worker process serves the sockets it adopted as the parent serves
    them: its ``ssl:`` listeners (the API's and the metrics one) pick
    ``http/1.1`` for ALPN clients and answer, also after a reload; its
    plain listener still answers a TLS handshake with the plain-port 400.
    """
    write_certificate(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load(str(_config(tmp_path)))
    reactor = MemoryReactorClock()
    descriptions = [*config.server.listen, *config.server.metrics_listen]
    worker = Worker(
        tuple(_inherited(d) for d in descriptions), socket.socket().detach()
    )
    service = build_tree(config, reactor, worker)
    service.startService()
    plain, api, metrics = (
        listener.port.factory
        for listener in service
        if isinstance(listener, AdoptedListener)
    )
    for _ in range(2):
        pem = write_certificate(tmp_path)
        service.reload()
        for path, factory in ((b"/healthz", api), (b"/metrics", metrics)):
            application = handshake(
                factory,
                pem,
                [b"h2", b"http/1.1"],
                GET.replace(b"/healthz", path),
                clock=reactor,
            )
            assert application.negotiated == b"http/1.1", application.lost
            assert application.received.startswith(b"HTTP/1.1 200 "), path
    protocol = plain.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert isinstance(plain, PlainHTTPFactory)
    service.stopService()
    reactor.advance(0)  # the ports close their sockets


# -- the listen queue -----------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "backlog"),
    [
        ("tcp:5000", DEFAULT_BACKLOG),
        ("tcp:5000:interface=127.0.0.1", DEFAULT_BACKLOG),
        ("tcp:5000:interface=127.0.0.1:backlog=10", 10),
        ("tcp:5000:127.0.0.1:10", 10),
        ("tcp6:5000", DEFAULT_BACKLOG),
        ("tcp6:5000:10", 10),
    ],
)
def test_tcp_listeners_queue_a_burst_of_connections(
    description: str, backlog: int
) -> None:
    """
    A listener whose description names no ``backlog`` listens with a queue
    of :data:`DEFAULT_BACKLOG`, not Twisted's 50, whose overflow during a
    burst of pulls left clients waiting a second to send their SYN again;
    one that names it keeps it.
    """
    reactor = MemoryReactorClock()
    listener, _ = Bind(reactor).listener(description, Factory.forProtocol(Protocol))
    listener.privilegedStartService()
    ((_, _, queued, _),) = reactor.tcpServers
    assert queued == backlog


def test_tls_listeners_queue_a_burst_of_connections(
    tmp_path: Path, certificate: tuple[ReloadableTLS, bytes]
) -> None:
    """``ssl:`` listeners too, unless their description names a backlog."""
    files = f"privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
    for description, backlog in [
        (f"ssl:5443:{files}", DEFAULT_BACKLOG),
        (f"ssl:5443:{files}:backlog=7", 7),
    ]:
        reactor = MemoryReactorClock()
        listener, _ = Bind(reactor).listener(description, Factory.forProtocol(Protocol))
        listener.privilegedStartService()
        ((_, _, queued, _),) = reactor.tcpServers
        assert queued == backlog


@pytest.mark.parametrize(
    "description",
    ["unix:/run/regmirror.sock", "unix:address=/run/r.sock:mode=660"],
)
def test_unix_listeners_get_the_queue_too(description: str) -> None:
    assert with_backlog(description) == f"{description}:backlog={DEFAULT_BACKLOG}"
    assert with_backlog(description + ":backlog=5") == description + ":backlog=5"


def test_other_listeners_are_left_as_given() -> None:
    description = "systemd:domain=INET:index=0"
    assert with_backlog(description) == description


# -- UNIX sockets shared with workers ---------------------------------------------


def test_a_workers_unix_listener_leaves_the_socket_file_to_twistd(
    tmp_path: Path,
) -> None:
    """
    A worker accepting on the UNIX socket ``twistd`` bound stops without
    removing the socket's file: Twisted's port removes it, which took the
    path from the processes still serving it when one worker stopped, and
    failed with FileNotFoundError in every worker stopping after the first.
    """
    path = tmp_path / "mirror.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))
    bound.listen(5)
    bound.setblocking(False)
    reactor = MemoryReactorClock()
    listener = AdoptedListener(
        reactor,
        Inherited(os.dup(bound.fileno()), socket.AF_UNIX, f"unix:{path}"),
        Factory.forProtocol(Protocol),
    )
    listener.startService()
    stopped = listener.stopService()
    reactor.advance(0)
    assert stopped is not None and stopped.called
    assert path.exists()
    bound.close()


# -- sockets shared with workers: one connection at a time ---------------------


class _Counting(Factory):
    """Serves every connection with a bare protocol, and counts them."""

    protocol = Protocol
    built = 0

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.built += 1
        return super().buildProtocol(addr)


def _parent(
    reactor: Any, description: str, factory: _Counting
) -> tuple[Any, socket.socket | None]:
    """The parent's listener of *description*, shared with workers, bound."""
    listener, _ = Bind(reactor, shared=True).listener(description, factory)
    listener.privilegedStartService()
    return listener, None


def _worker(
    reactor: Any, description: str, factory: _Counting
) -> tuple[Any, socket.socket | None]:
    """A worker's listener of *description*, started, on a socket bound and
    listening as twistd hands it over; that socket, which twistd keeps."""
    address = listen_address(description)
    assert address is not None
    if address.path is None:
        bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bound.bind((address.interface, 0))
    else:
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(address.path)
    bound.listen(5)
    bound.setblocking(False)
    inherited = Inherited(os.dup(bound.fileno()), bound.family, description)
    listener, _ = Adopt(reactor, [inherited]).listener(description, factory)
    listener.startService()
    return listener, bound


@pytest.mark.parametrize("listen", [_parent, _worker])
@pytest.mark.parametrize(
    "description",
    [
        "tcp:0:interface=127.0.0.1",
        "ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem",
        "unix:mirror.sock",
    ],
)
def test_a_listener_shared_with_workers_accepts_one_connection_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: Any, description: str
) -> None:
    """
    With ``workers``, every process waiting on the listening socket is
    woken for a new connection; the parent's listeners and a worker's
    (TCP, TLS, UNIX) accept one connection each time their socket is
    readable, not every one pending as Twisted's port does (up to 100 at
    once, more after a full batch), which gave one process a whole burst
    of TLS handshakes while another sat idle.  Three clients connected at
    once are accepted one at a time, also after the first (Twisted's port
    raises its batch after a full one).
    """
    monkeypatch.chdir(tmp_path)
    write_certificate(tmp_path)
    reactor = MemoryReactorClock()
    factory = _Counting()
    listener, bound = listen(reactor, description, factory)
    port = listener.port
    clients = []
    for _ in range(3):
        if description.startswith("unix:"):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect("mirror.sock")
        else:
            client = socket.create_connection(("127.0.0.1", port.getHost().port))
        clients.append(client)
    accepted = []
    for _ in range(4):
        port.doRead()
        accepted.append(factory.built)
    assert accepted == [1, 2, 3, 3]
    for client in clients:
        client.close()
    for connection in reactor.readers - {port}:
        connection.abortConnection()
    listener.stopService()
    reactor.advance(0)
    if bound is not None:
        bound.close()


def test_the_parent_alone_listens_with_twisteds_own_ports(tmp_path: Path) -> None:
    """With ``workers = 1`` the parent, alone on its sockets, listens
    through the reactor (Twisted's ports, accepting a burst at once); with
    workers it binds sockets they share."""
    for workers, through_reactor in ((1, 1), (2, 0)):
        reactor = MemoryReactorClock()
        config = load(str(write_config(tmp_path, f"workers = {workers}")))
        tree = make_service(config, reactor)
        tree.privilegedStartService()
        assert len(reactor.tcpServers) == through_reactor, workers
        for service in tree:
            if isinstance(service, BoundListener):
                service.stopService()
        reactor.advance(0)


def test_a_stale_lock_naming_this_process_is_removed_before_listening(
    tmp_path: Path,
) -> None:
    """
    A UNIX listener's lock (``PATH.lock``, a link naming the binder's pid)
    left by an earlier run with this very pid (``twistd`` is pid 1 in every
    container) is removed before listening: Twisted found the pid alive and
    refused to listen at every restart.  A lock naming another live
    process is left to Twisted, which refuses.
    """
    path = tmp_path / "mirror.sock"
    lock = tmp_path / "mirror.sock.lock"
    os.symlink(str(os.getpid()), lock)
    Bind(MemoryReactorClock()).listener(f"unix:{path}", Factory.forProtocol(Protocol))
    assert not os.path.lexists(lock)
    os.symlink("1", lock)  # init: alive, not this process
    Bind(MemoryReactorClock()).listener(f"unix:{path}", Factory.forProtocol(Protocol))
    assert os.readlink(lock) == "1"


def test_the_metrics_listener_logs_access_lines_as_the_api_listener_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: list[LogEvent]
) -> None:
    """
    ``metrics_listen``'s listener was a plain twisted.web Site, whose
    access lines were one unstructured string each (``log_io``, in the
    ``twisted.python.log`` namespace), besides the JSON lines' fields.
    A scrape has the API listener's access line: a ``regmirror.access``
    event with the client, request, status and bytes as fields, at info
    as the API's health probes are.
    """
    monkeypatch.chdir(tmp_path)
    plain = "tcp:0:interface=127.0.0.1"
    config = load(str(write_config(tmp_path, f"metrics_listen = {plain}")))
    reactor = MemoryReactorClock()
    service = make_service(config, reactor)
    service.privilegedStartService()
    [_, (_, metrics, _, _)] = reactor.tcpServers
    metrics.doStart()  # as the listening port does
    client = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = metrics.buildProtocol(client)
    transport = StringTransport(peerAddress=client)
    protocol.makeConnection(transport)
    protocol.dataReceived(GET.replace(b"/healthz", b"/metrics"))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert not [e for e in logged if "log_io" in e]
    [line] = [e for e in logged if e.get("log_namespace") == "regmirror.access"]
    assert line["log_level"] == LogLevel.info
    assert (line["client"], line["method"], line["uri"]) == (
        "127.0.0.1",
        "GET",
        "/metrics",
    )
    assert line["status"] == 200 and line["bytes"] > 0
