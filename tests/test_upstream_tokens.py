"""
Upstream tokens per scope, with a ``Clock`` and an agent that answers at
once: one token per repository a client asks for, kept only while it is
good and only so many of them (issue 16, item 6).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from regmirror.config import Secret, UpstreamConfig
from regmirror.upstream import MAX_TOKENS, Tokens, Upstream, UpstreamFailure

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

    def __init__(self, realm: str = "https://auth.origin.test/token") -> None:
        self.issued = 0
        self.realm = realm
        #: every URI asked for
        self.asked: list[str] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[_Response]:
        self.asked.append(uri.decode("ascii"))
        if uri.lower().startswith(self.realm.lower().encode("ascii")):
            self.issued += 1
            token = {"token": f"t{self.issued}", "expires_in": TOKEN_LIFETIME}
            return succeed(_Response(200, json.dumps(token).encode(), {}))
        sent = headers.getRawHeaders(b"authorization") if headers else None
        if not sent:
            challenge = f'Bearer realm="{self.realm}",service="o"'
            return succeed(_Response(401, b"{}", {"WWW-Authenticate": challenge}))
        return succeed(_Response(200, b"{}", {}))


def upstream(
    clock: Clock,
    realm: str = "https://auth.origin.test/token",
    url: str = "https://registry.origin.test",
    **settings: Any,
) -> tuple[Upstream, TokenRegistry]:
    registry = TokenRegistry(realm)
    config = UpstreamConfig("origin", url, **settings)
    return Upstream(config, registry, clock), registry


def answer(upstream: Upstream, repository: str) -> Any:
    """What :meth:`Upstream.request` gives: a response or a ``Failure``."""
    outcome: list[Any] = []
    d = Deferred.fromCoroutine(
        upstream.request("GET", f"{repository}/manifests/latest")
    )
    d.addBoth(outcome.append)
    assert outcome, "no answer"
    return outcome[0]


def ask(upstream: Upstream, repository: str) -> int:
    outcome = answer(upstream, repository)
    assert not isinstance(outcome, Failure), outcome
    code: int = outcome.code
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


# -- where a token may be asked for (issue 16, item 8) --------------------------


@pytest.mark.parametrize(
    "realm",
    [
        "http://auth.origin.test/token",
        "HTTP://auth.origin.test/token",
        "Http://registry.origin.test/token",
        "http://registry.origin.test:443/token",
    ],
)
def test_plain_http_realm_of_an_https_upstream_is_refused(
    realm: str, logged: list[LogEvent]
) -> None:
    """
    An https upstream whose challenge names an ``http://`` realm (any case
    of the scheme, its own host, port 443): no token is asked for, so the
    credentials never travel in clear; the request fails as the upstream's
    failure, and the log names the upstream but no secret.
    """
    origin, registry = upstream(
        Clock(), realm, username="alice", password=Secret("s3cret-pass")
    )
    outcome = answer(origin, "app")
    assert isinstance(outcome, Failure), outcome
    failure = outcome.value
    assert isinstance(failure, UpstreamFailure)
    assert (failure.upstream, failure.reason) == ("origin", "invalid")
    assert [uri for uri in registry.asked if "token" in uri] == []
    lines = [formatEvent(event) for event in logged]
    refusals = [line for line in lines if "plain http" in line]
    assert refusals and "origin" in refusals[0], lines
    text = " ".join(repr(event) for event in logged) + " ".join(lines)
    assert "s3cret-pass" not in text
    assert "czNjcmV0" not in text  # base64 of the password's start


def test_plain_http_realm_of_a_plain_http_upstream_is_used() -> None:
    """An upstream that is itself plain http may have a plain http realm."""
    origin, registry = upstream(
        Clock(), "http://auth.origin.test/token", url="http://registry.origin.test"
    )
    assert ask(origin, "app") == 200
    assert registry.issued == 1
