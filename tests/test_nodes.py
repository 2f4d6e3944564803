"""Tests for :mod:`regmirror.nodes`: fetching a blob from another node."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from regmirror.nodes import Peers, PeerUnavailable
from regmirror.reference import parse_digest

DIGEST = parse_digest("sha256:" + "ab" * 32)


@implementer(IAgent)
class SilentAgent:
    """An agent whose requests are never answered, until cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[IResponse]:
        def cancel(_: Deferred[IResponse]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class PeersTests(SynchronousTestCase):
    def test_silent_node_times_out(self) -> None:
        """
        A node that never answers is reported, after the timeout, as not
        having answered in time (not as an unknown error), and its request
        is cancelled.
        """
        clock, agent = Clock(), SilentAgent()
        peers = Peers(agent, clock, timeout=10.0)
        d = Deferred.fromCoroutine(
            peers.open_blob("http://10.0.0.5:5000", b"key", DIGEST)
        )
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failure = self.failureResultOf(d, PeerUnavailable)
        self.assertEqual(
            failure.getErrorMessage(),
            "http://10.0.0.5:5000 did not answer within 10s",
        )
        self.assertEqual(agent.cancelled, 1)
