"""
The private Twisted APIs regmirror relies on, each in one place: these
tests fail when a Twisted release changes them, before a user notices.
"""

from __future__ import annotations

from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel

from regmirror.channel import MirrorChannel
from regmirror.service import _QuietPool


def test_connection_pool_builds_its_factories_from_a_class_attribute() -> None:
    """``service._QuietPool`` quiets the pool's connection factories through
    ``HTTPConnectionPool._factory``."""
    assert HTTPConnectionPool._factory is _HTTP11ClientFactory
    pool = _QuietPool(Clock(), persistent=True)
    factory = pool._factory(lambda protocol: None, "upstream")
    assert isinstance(factory, _HTTP11ClientFactory)
    assert factory.noisy is False


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
