"""
Where an upstream's redirects and token realms may lead the mirror
(issue 16, item 7): not to loopback, private or link-local addresses,
however they are spelled, except the upstream's own host.  With a
``Clock`` and ``treq.testing``; the end-to-end counterpart (a real mirror,
a real proxy) is in ``tests/e2e/test_hostile.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image
from treq import content
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent
from twisted.python.failure import Failure

from regmirror.config import DEFAULT_DENY, Network, UpstreamConfig
from regmirror.upstream import Upstream, UpstreamFailure

#: Loopback, however a URL parser or a resolver lets it be written.
LOOPBACK = [
    "http://127.0.0.1",
    "http://127.0.0.2:8080",
    "HTTP://127.0.0.1",
    "https://127.0.0.1:443",
    "http://user:pass@127.0.0.1",
    "http://127.1",
    "http://2130706433",
    "http://0x7f000001",
    "http://0x7f.0.0.1",
    "http://0177.0.0.1",
    "http://017700000001",
    "http://[::1]",
    "http://[0:0:0:0:0:0:0:1]",
    "http://[::1%25lo]",
    "http://[::ffff:127.0.0.1]",
    "http://[::ffff:7f00:1]",
    "http://[0:0:0:0:0:ffff:127.0.0.1]",
    "http://[::127.0.0.1]",
    "http://[::ffff:0:127.0.0.2]",
    "http://[::ffff:0:7f00:1]",
    "http://[64:ff9b:1::7f00:2]",
    "http://[64:ff9b:1:2:3:4:7f00:1]",
    "http://0.0.0.0",
    "http://0",
    "http://[::]",
    "http://localhost",
    "http://LOCALHOST.",
    "http://app.localhost",
]
#: RFC 1918, unique local IPv6, shared address space (RFC 6598), and IPv4
#: private addresses inside IPv6 (mapped, NAT64, 6to4).
PRIVATE = [
    "http://10.0.0.1",
    "http://10.255.255.255:5000",
    "http://167772161",
    "http://172.16.0.1",
    "http://172.31.255.254",
    "http://192.168.1.1",
    "http://0xc0a80101",
    "http://[fc00::1]",
    "http://[fd12:3456:789a::1]",
    "http://[FD00:EC2::254]",
    "http://[::ffff:10.0.0.1]",
    "http://[64:ff9b::a00:1]",
    "http://[2002:c0a8:101::1]",
    "http://100.64.0.1",
    "http://100.127.255.254",
]
LINK_LOCAL = [
    "http://169.254.169.254",
    "http://[fe80::1]",
    "http://[64:ff9b:1::a9fe:a9fe]",
    "http://[::ffff:0:169.254.169.254]",
]
#: Special-purpose ranges no redirect has business reaching (RFC 6890):
#: IETF protocol assignments, benchmarking, multicast, reserved and the
#: limited broadcast, the IPv6 discard prefix, IPv6 multicast; and AWS's
#: name for its metadata service.
SPECIAL = [
    "http://192.0.0.1",
    "http://192.0.0.170",
    "http://198.18.0.1",
    "http://198.19.255.254",
    "http://224.0.0.1",
    "http://239.255.255.250",
    "http://240.0.0.1",
    "http://255.255.255.255",
    "http://4294967295",
    "http://[::ffff:255.255.255.255]",
    "http://[64:ff9b::e000:1]",
    "http://[100::1]",
    "http://[ff02::1]",
    "http://[FF05::1:3]",
    "http://instance-data",
    "http://INSTANCE-DATA.",
    "http://metadata",
]
#: Near the ranges above, but outside them.
PUBLIC = [
    "http://172.32.0.1",
    "http://192.169.0.1",
    "http://100.128.0.1",
    "http://11.0.0.1",
    "http://128.0.0.1",
    "http://[2001:db8::1]",
    "http://192.0.1.1",
    "http://198.17.255.255",
    "http://198.20.0.1",
    "http://223.255.255.255",
    "http://[100:0:0:1::1]",
    "http://[64:ff9b:2::7f00:1]",
    "http://[::fffe:0:7f00:1]",
    "http://instance-data.example",
    "http://cdn.example",
    "http://localhost.example",
]


def upstream(
    fake: FakeRegistry,
    url: str = "http://registry.example",
    deny: tuple[Network | str, ...] = DEFAULT_DENY,
    **settings: Any,
) -> tuple[Upstream, RequestTraversalAgent]:
    agent = RequestTraversalAgent(fake)
    config = UpstreamConfig("origin", url, **settings)
    return Upstream(config, agent, Clock(), deny=deny), agent


def fetch_blob(origin: Upstream, agent: RequestTraversalAgent, digest: str) -> Any:
    """The response to a blob GET, or the ``Failure`` it ended with."""
    outcome: list[Any] = []
    d = Deferred.fromCoroutine(origin.request("GET", f"app/blobs/{digest}"))
    d.addBoth(outcome.append)
    for _ in range(20):
        if outcome:
            break
        agent.flush()
    assert outcome, "no answer"
    return outcome[0]


def redirected(
    target: str,
    url: str = "http://registry.example",
    deny: tuple[Network | str, ...] = DEFAULT_DENY,
) -> tuple[Any, FakeRegistry]:
    """A blob GET that *url*'s upstream redirects to *target*."""
    fake = FakeRegistry()
    digest = image(fake)["layer"]
    fake.redirect = target
    origin, agent = upstream(fake, url, deny)
    return fetch_blob(origin, agent, digest), fake


def assert_refused(outcome: Any, fake: FakeRegistry, logged: list[LogEvent]) -> None:
    assert isinstance(outcome, Failure), f"followed: {outcome.code}"
    assert isinstance(outcome.value, UpstreamFailure), outcome
    assert outcome.value.reason == "invalid"
    assert "denied host" in outcome.value.detail
    assert fake.count("GET", "/cdn/") == 0, "the target was asked"
    assert any("denied host" in str(e.get("log_format")) for e in logged)


@pytest.mark.parametrize("target", LOOPBACK + PRIVATE + LINK_LOCAL + SPECIAL)
def test_redirect_to_a_loopback_private_or_link_local_address_is_refused(
    target: str, logged: list[LogEvent]
) -> None:
    """
    A blob redirect to loopback (``127.0.0.0/8``, ``::1``, ``0.0.0.0``,
    ``::``, ``localhost`` and names under it), private (RFC 1918,
    ``fc00::/7``), shared (``100.64.0.0/10``) or link-local addresses,
    in every spelling a resolver takes (decimal, hex, octal, short forms;
    IPv4-mapped, -compatible, -translated (``::ffff:0:0:0/96``), NAT64
    (well-known and local-use ``64:ff9b:1::/48``) and 6to4 IPv6; a zone;
    any case of the scheme; user info; a port), and the special-purpose
    ranges and names no redirect has business reaching (``192.0.0.0/24``,
    benchmarking, multicast, reserved, ``100::/64``, ``ff00::/8``,
    ``instance-data``): refused before any connection.
    """
    outcome, fake = redirected(target)
    assert_refused(outcome, fake, logged)


@pytest.mark.parametrize("target", PUBLIC)
def test_redirect_near_but_outside_the_denied_ranges_is_followed(target: str) -> None:
    """Addresses next to the denied ranges, and names that merely contain
    ``localhost``, are followed."""
    outcome, fake = redirected(target)
    assert not isinstance(outcome, Failure), outcome
    assert outcome.code == 200
    assert fake.count("GET", "/cdn/") == 1


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:6000"),
        ("http://127.0.0.1:5000", "http://2130706433:6000"),
        ("http://127.0.0.1:5000", "http://[::ffff:127.0.0.1]:6000"),
        ("http://127.0.0.1:5000", "http://localhost:6000"),
        ("http://localhost:5000", "http://127.0.0.1:6000"),
        ("http://localhost:5000", "http://[::1]:6000"),
        ("http://localhost:5000", "http://LocalHost.:6000"),
        ("http://[::1]:5000", "http://[0::1]:6000"),
        ("http://10.1.2.3:5000", "https://10.1.2.3"),
        ("http://[fd00::5]:5000", "http://[FD00:0::5]:9000"),
        ("http://registry.internal", "http://REGISTRY.internal.:9000"),
    ],
)
def test_an_upstream_on_a_private_address_keeps_its_own_host(
    url: str, target: str
) -> None:
    """
    An upstream configured on a loopback or private address (or a name)
    may redirect to its own host, on any port, however the host is spelled
    (``localhost`` is ``127.0.0.1`` and ``::1``).
    """
    outcome, fake = redirected(target, url)
    assert not isinstance(outcome, Failure), outcome
    assert outcome.code == 200
    assert fake.count("GET", "/cdn/") == 1


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.2:5000"),
        ("http://127.0.0.1:5000", "http://[::1]:5000"),
        ("http://127.0.0.1:5000", "http://10.0.0.1"),
        ("http://127.0.0.1:5000", "http://169.254.169.254"),
        ("http://localhost:5000", "http://127.0.0.2:5000"),
        ("http://10.1.2.3:5000", "http://10.1.2.4:5000"),
        ("http://10.1.2.3:5000", "http://127.0.0.1:5000"),
        ("http://[fd00::5]:5000", "http://[fd00::6]:5000"),
        ("http://registry.internal", "http://10.0.0.1"),
        ("http://registry.internal", "http://localhost"),
    ],
)
def test_an_upstream_on_a_private_address_keeps_no_neighbours(
    url: str, target: str, logged: list[LogEvent]
) -> None:
    """
    Only the upstream's own host: its neighbours on the same network, other
    loopback addresses or the other loopback family are refused.
    """
    outcome, fake = redirected(target, url)
    assert_refused(outcome, fake, logged)


def test_deny_hosts_none_lets_redirects_reach_private_addresses() -> None:
    """``deny_hosts = none`` (an empty list) lets the operator allow them."""
    outcome, fake = redirected("http://10.0.0.1", deny=())
    assert not isinstance(outcome, Failure), outcome
    assert fake.count("GET", "/cdn/") == 1


# -- token realms ---------------------------------------------------------------


def realm_answer(
    realm: str, url: str = "http://registry.example", **settings: Any
) -> tuple[Any, FakeRegistry]:
    fake = FakeRegistry()
    digest = image(fake)["layer"]
    fake.token = "granted"
    fake.realm = realm
    origin, agent = upstream(fake, url, **settings)
    return fetch_blob(origin, agent, digest), fake


@pytest.mark.parametrize(
    "realm",
    [
        "http://127.0.0.1/token",
        "http://[::1]:5001/token",
        "http://2130706433/token",
        "http://localhost:5001/token",
        "http://10.0.0.1/token",
        "http://[fd00::1]/token",
        "http://100.64.0.1/token",
        "http://[::ffff:192.168.0.1]/token",
    ],
)
def test_token_realm_on_a_loopback_or_private_address_is_refused(
    realm: str, logged: list[LogEvent]
) -> None:
    """A challenge may not send the mirror to loopback or a private network
    for a token: refused before the realm is asked."""
    outcome, fake = realm_answer(realm)
    assert isinstance(outcome, Failure), outcome
    assert isinstance(outcome.value, UpstreamFailure)
    assert fake.count("GET", "/token") == 0
    assert any("denied host" in str(e.get("log_format")) for e in logged)


@pytest.mark.parametrize(
    ("url", "realm", "settings"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", {}),
        ("http://127.0.0.1:5000", "http://localhost:5001/token", {}),
        ("http://10.1.2.3", "https://10.1.2.3:8443/token", {}),
        (
            "http://registry.example",
            "http://10.0.0.9/token",
            {"token_realms": ("10.0.0.9",)},
        ),
    ],
)
def test_token_realm_on_the_upstreams_own_host_or_listed_is_asked(
    url: str, realm: str, settings: dict[str, Any]
) -> None:
    """A realm on the upstream's own host (any port), or one the operator
    listed in ``token_realms``, is asked for a token."""
    outcome, fake = realm_answer(realm, url, **settings)
    assert not isinstance(outcome, Failure), outcome
    assert outcome.code == 200
    assert fake.count("GET", "/token") == 1


def test_blob_bytes_pass_once_redirected_to_the_own_host() -> None:
    """The bytes of a blob fetched through an allowed redirect are its own."""
    outcome, _ = redirected("http://127.0.0.1:6000", "http://127.0.0.1:5000")
    body: list[bytes] = []
    content(outcome).addCallback(body.append)
    assert body == [LAYER]


# -- URLs no parser takes -----------------------------------------------------------

MALFORMED = ["http://[::1", "http://[zz]", "http://[127.0.0.1]", "http://[::1]]"]


@pytest.mark.parametrize("target", MALFORMED)
def test_a_redirect_to_a_malformed_url_is_an_upstream_failure(
    tmp_path: Any, target: str
) -> None:
    """A ``Location`` no URL parser takes (an unclosed or bad IPv6
    bracket): the upstream's failure, a 502 OCI error, never a crash."""
    outcome, fake = redirected(target)
    assert isinstance(outcome, Failure), outcome
    assert isinstance(outcome.value, UpstreamFailure), outcome.value
    assert fake.count("GET", "/cdn/") == 0
    origin = FakeRegistry()
    digest = image(origin)["layer"]
    origin.redirect = target
    mirror = Harness(str(tmp_path), {"origin": origin})
    response = mirror.request("GET", f"/v2/app/blobs/{digest}")
    assert response.code == 502


@pytest.mark.parametrize("realm", [f"{target}/token" for target in MALFORMED])
def test_a_malformed_token_realm_is_an_upstream_failure(realm: str) -> None:
    """A challenge whose realm no URL parser takes: the upstream's failure."""
    outcome, fake = realm_answer(realm)
    assert isinstance(outcome, Failure), outcome
    assert isinstance(outcome.value, UpstreamFailure), outcome.value
    assert fake.count("GET", "/token") == 0
