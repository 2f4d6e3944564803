"""
Upstream tokens per scope, with a ``Clock`` and an agent that answers at
once: one token per repository a client asks for, kept only while it is
good and only so many of them (issue 16, item 6).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from regmirror.config import UpstreamConfig
from regmirror.upstream import MAX_TOKENS, Tokens, Upstream

TOKEN_LIFETIME = 300


class _Response:
    """Just enough of an ``IResponse`` for :class:`Upstream`."""

    def __init__(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.code = code
        self.length = len(body)
        self.headers = Headers({k: [v] for k, v in headers.items()})
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_Transport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _Transport:
    def stopProducing(self) -> None:
        pass


@implementer(IAgent)
class TokenRegistry:
    """
    A registry whose every repository wants its own Bearer token, and the
    realm that issues them, answering without any I/O.

    :ivar issued: how many tokens the realm gave out.
    """

    def __init__(self) -> None:
        self.issued = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[_Response]:
        if uri.startswith(b"https://auth.origin.test/token"):
            self.issued += 1
            token = {"token": f"t{self.issued}", "expires_in": TOKEN_LIFETIME}
            return succeed(_Response(200, json.dumps(token).encode(), {}))
        sent = headers.getRawHeaders(b"authorization") if headers else None
        if not sent:
            challenge = 'Bearer realm="https://auth.origin.test/token",service="o"'
            return succeed(_Response(401, b"{}", {"WWW-Authenticate": challenge}))
        return succeed(_Response(200, b"{}", {}))


def upstream(clock: Clock) -> tuple[Upstream, TokenRegistry]:
    registry = TokenRegistry()
    config = UpstreamConfig("origin", "https://registry.origin.test")
    return Upstream(config, registry, clock), registry


def ask(upstream: Upstream, repository: str) -> int:
    outcome: list[Any] = []
    d = Deferred.fromCoroutine(
        upstream.request("GET", f"{repository}/manifests/latest")
    )
    d.addBoth(outcome.append)
    assert outcome and not isinstance(outcome[0], Failure), outcome
    code: int = outcome[0].code
    return code


def test_tokens_of_100000_scopes_stay_bounded() -> None:
    """
    100,000 distinct scopes (one per repository name a client asks for)
    within one token lifetime: at most ``MAX_TOKENS`` are kept, the newest.
    """
    clock = Clock()
    tokens = Tokens(clock)
    for number in range(100_000):
        tokens.put(f"repository:r/{number}:pull", f"t{number}", TOKEN_LIFETIME)
        assert len(tokens) <= MAX_TOKENS
        clock.advance(0.001)
    assert MAX_TOKENS < 100_000
    assert len(tokens) == MAX_TOKENS
    assert tokens.get("repository:r/99999:pull") == "t99999"
    assert tokens.get(f"repository:r/{100_000 - MAX_TOKENS - 1}:pull") is None


def test_an_upstream_keeps_only_the_newest_tokens() -> None:
    """
    Through :meth:`Upstream.request`: 2,000 repositories, each with its own
    token, past a limit of 500: 500 kept; the repository asked last uses
    its token again, the first one asked gets a new token.
    """
    clock = Clock()
    origin, registry = upstream(clock)
    origin._tokens.limit = 500
    for number in range(2000):
        assert ask(origin, f"r/{number}") == 200
    assert len(origin._tokens) == 500
    issued = registry.issued
    assert ask(origin, "r/1999") == 200
    assert registry.issued == issued, "the newest token was not kept"
    assert ask(origin, "r/0") == 200
    assert registry.issued == issued + 1, "the oldest token was kept"


def test_expired_tokens_go() -> None:
    """Tokens past their lifetime are dropped, not kept until the cap."""
    clock = Clock()
    origin, registry = upstream(clock)
    for number in range(100):
        ask(origin, f"r/{number}")
    assert len(origin._tokens) == 100
    clock.advance(TOKEN_LIFETIME)
    ask(origin, "r/new")
    assert list(origin._tokens) == ["repository:r/new:pull"]
    clock.advance(TOKEN_LIFETIME)
    ask(origin, "r/new")
    assert registry.issued == 102, "an expired token was used"
