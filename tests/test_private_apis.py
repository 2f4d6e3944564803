"""
The private APIs of Twisted and botocore that regmirror relies on, each in
one place: these tests fail when a release changes them, before a user
notices.
"""

from __future__ import annotations

import inspect

from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel

from regmirror.http.channel import MirrorChannel
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
