"""
The private APIs of Twisted and botocore that regmirror relies on, each in
one place: these tests fail when a release changes them, before a user
notices.
"""

from __future__ import annotations

import inspect
import socket

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel

from regmirror.http.channel import MirrorChannel
from regmirror.service import UPSTREAM_READ_SIZE, _QuietPool


def test_connection_pool_builds_its_factories_from_a_class_attribute() -> None:
    """``service._QuietPool`` quiets the pool's connection factories through
    ``HTTPConnectionPool._factory``."""
    assert HTTPConnectionPool._factory is _HTTP11ClientFactory
    pool = _QuietPool(Clock(), persistent=True)
    factory = pool._factory(lambda protocol: None, "upstream")
    assert isinstance(factory, _HTTP11ClientFactory)
    assert factory.noisy is False


def test_the_pools_connections_read_large_pieces_over_plain_tcp() -> None:
    """``service._QuietFactory`` builds its protocols with the pool's
    quiescent callback, which ``_HTTP11ClientFactory`` keeps in its private
    ``_quiescentCallback``; over plain TCP they read UPSTREAM_READ_SIZE
    bytes at once (Twisted's ``bufferSize``), other transports are left
    alone."""

    def returned(protocol: object) -> None:
        pass

    factory = _QuietPool(Clock(), persistent=True)._factory(returned, "upstream")
    assert factory._quiescentCallback is returned
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, HTTP11ClientProtocol)
    assert protocol._quiescentCallback is returned
    with socket.socket() as skt:
        connection = tcp.Connection(skt, protocol, reactor=MemoryReactor())
        assert connection.bufferSize < UPSTREAM_READ_SIZE
        protocol.makeConnection(connection)
        assert connection.bufferSize == UPSTREAM_READ_SIZE
        protocol.connectionLost(Failure(ConnectionDone()))
    other = factory.buildProtocol(None)
    transport = StringTransport()
    other.makeConnection(transport)
    assert not hasattr(transport, "bufferSize")


def test_malformed_requests_go_through_the_bad_request_hook() -> None:
    """``channel.MirrorChannel`` answers malformed requests with an OCI
    error by overriding ``HTTPChannel._respondToBadRequestAndDisconnect``."""
    assert callable(HTTPChannel._respondToBadRequestAndDisconnect)
    channel = MirrorChannel()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"code": "UNSUPPORTED"' in answer
    channel.connectionLost(connectionDone)


def test_client_service_logs_through_a_class_attribute() -> None:
    """``_redis._Keeper`` quiets ClientService's retry lines by replacing
    its private ``_log``, which ClientService's machinery logs through."""
    from twisted.application import _client_service, internet
    from twisted.logger import Logger

    from regmirror._redis import _Keeper

    assert internet.ClientService is _client_service.ClientService
    assert isinstance(internet.ClientService._log, Logger)
    assert "log=self._log" in inspect.getsource(_client_service)
    assert _Keeper._log is not internet.ClientService._log


def test_botocore_signs_in_the_steps_s3_repeats() -> None:
    """``s3.signing._ClockedSigning.add_auth`` repeats botocore's SigV4 ``add_auth``
    step by step, two of the steps being private methods."""
    from botocore.auth import S3SigV4Auth, SigV4Auth

    steps = inspect.getsource(SigV4Auth.add_auth)
    for name in ("_modify_request_before_signing", "_inject_signature_to_request"):
        assert f"self.{name}(" in steps
        assert callable(getattr(S3SigV4Auth, name))


def test_tls_writes_go_through_the_methods_bulk_tls_overrides() -> None:
    """``tls_listener.BulkTLS`` replaces ``TLSMemoryBIOProtocol._write`` and
    ``_flushSendBIO``, through which every application write and every
    flush of the send BIO goes, and calls the private helpers and state its
    ``_write`` relies on."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from regmirror.tls_listener import BulkTLS

    assert "self._write(" in inspect.getsource(TLSMemoryBIOProtocol.write)
    assert "self._write(" in inspect.getsource(
        TLSMemoryBIOProtocol._unbufferPendingWrites
    )
    for name in ("_checkHandshakeStatus", "_flushReceiveBIO", "_shutdownTLS"):
        source = inspect.getsource(getattr(TLSMemoryBIOProtocol, name))
        assert "self._flushSendBIO()" in source, name
    for name in ("_bufferedWrite", "_tlsShutdownFinished"):
        assert callable(getattr(TLSMemoryBIOProtocol, name))
    source = inspect.getsource(TLSMemoryBIOProtocol)
    for state in ("self._lostTLSConnection", "self._tlsConnection"):
        assert state in source
    assert issubclass(BulkTLS, TLSMemoryBIOProtocol)


def test_adopting_a_unix_socket_builds_the_port_from_a_class_method() -> None:
    """``listeners._AdoptedUNIXPort`` is adopted as ``adoptStreamPort`` adopts
    UNIX sockets (``unix.Port._fromListeningDescriptor``, then
    ``startListening``), and overrides ``connectionLost``, where Twisted's
    port removes the socket's file before ``tcp.Port.connectionLost``."""
    from twisted.internet import posixbase, unix

    adopt = inspect.getsource(posixbase.PosixReactorBase.adoptStreamPort)
    assert "unix.Port._fromListeningDescriptor" in adopt
    assert "p.startListening()" in adopt
    lost = inspect.getsource(unix.Port.connectionLost)
    assert "os.unlink(self._bindPath)" in lost
    assert "tcp.Port.connectionLost(self, reason)" in lost


def test_shared_ports_are_made_as_the_reactor_makes_its_own() -> None:
    """
    ``listeners._SharedListening`` and ``AdoptedListener`` make ports as the
    reactor's ``listenTCP``, ``listenUNIX`` and ``adoptStreamPort`` make
    Twisted's (the port's constructor, or ``_fromListeningDescriptor``,
    then ``startListening``); ``_SharedTCPPort`` pins ``numberAccepts``,
    the number of connections ``doRead`` accepts at once, which
    ``startListening`` sets and ``doRead`` raises after a full batch.
    """
    from twisted.internet import posixbase

    reactor = posixbase.PosixReactorBase
    listen_tcp = inspect.getsource(reactor.listenTCP)
    assert "tcp.Port(port, factory, backlog, interface, self)" in listen_tcp
    listen_unix = inspect.getsource(reactor.listenUNIX)
    assert "unix.Port(address, factory, backlog, mode, self, wantPID)" in listen_unix
    adopt = inspect.getsource(reactor.adoptStreamPort)
    assert "tcp.Port._fromListeningDescriptor(" in adopt
    for made in (listen_tcp, listen_unix, adopt):
        assert "p.startListening()" in made
    read = inspect.getsource(tcp.Port.doRead)
    assert "numAccepts = self.numberAccepts" in read
    assert "range(numAccepts)" in read
    assert "self.numberAccepts += 20" in read
