"""
Talking to real registries' auth and limits, in memory: Basic and Bearer
challenges, where credentials may go, token caching, 429 back-off, pull
quotas, and what never leaves the mirror.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image
from twisted.logger import LogEvent
from twisted.web.server import Request

from regmirror.config import Secret
from regmirror.hosts import same_site

CREDENTIALS = {"username": "alice", "password": Secret("s3cret-pass")}
BASIC = "Basic " + base64.b64encode(b"alice:s3cret-pass").decode()


def secured(tmp_path: Path, origin: FakeRegistry, **settings: object) -> Harness:
    return Harness(str(tmp_path / "cache"), {"origin": origin}, {"origin": settings})


def test_basic_challenge_answered_with_credentials(tmp_path: Path) -> None:
    """An upstream asking for Basic auth gets the configured credentials,
    and after the first challenge they are sent up front."""
    origin = FakeRegistry()
    content = image(origin)
    origin.basic = BASIC
    mirror = secured(tmp_path, origin, **CREDENTIALS)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert (
        mirror.body(mirror.request("GET", f"/v2/app/blobs/{content['layer']}")) == LAYER
    )
    challenged = [auth for _, auth in origin.authorizations if auth is None]
    assert len(challenged) == 1


def test_bearer_token_fetched_with_credentials_on_the_same_site(tmp_path: Path) -> None:
    """A realm on the upstream's registrable domain receives the credentials;
    the token is fetched once and reused for the repository."""
    origin = FakeRegistry()
    content = image(origin)
    origin.token = "granted"
    origin.realm = "http://auth.origin.test/token"
    origin.token_credentials = BASIC
    mirror = Harness(
        str(tmp_path),
        {"origin": origin},
        {"origin": {**CREDENTIALS}},
    )
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert (
        mirror.body(mirror.request("GET", f"/v2/app/blobs/{content['layer']}")) == LAYER
    )
    assert origin.count("GET", "/token") == 1
    assert ("/token", BASIC) in origin.authorizations


def test_credentials_withheld_from_a_foreign_realm(tmp_path: Path) -> None:
    """A challenge naming a realm on another domain gets an anonymous token
    request: the credentials never leave for it."""
    origin = FakeRegistry()
    image(origin)
    origin.token = "granted"
    origin.realm = "http://evil.example/token"
    mirror = secured(tmp_path, origin, **CREDENTIALS)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert ("/token", None) in origin.authorizations
    assert all(auth != BASIC for _, auth in origin.authorizations)


def test_token_realms_allows_a_named_realm(tmp_path: Path) -> None:
    """``token_realms`` lets a named host outside the domain receive them."""
    origin = FakeRegistry()
    image(origin)
    origin.token = "granted"
    origin.realm = "http://auth.example/token"
    mirror = secured(tmp_path, origin, token_realms=("auth.example",), **CREDENTIALS)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert ("/token", BASIC) in origin.authorizations


def test_wrong_credentials_are_unauthorized_and_never_logged(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A realm refusing the credentials: the client gets 502 UNAUTHORIZED
    (the upstream refused the mirror's credentials: no challenge a client
    could answer), the log names the upstream, and the password appears
    nowhere in the log."""
    origin = FakeRegistry()
    image(origin)
    origin.token = "granted"
    origin.realm = "http://auth.origin.test/token"
    origin.token_credentials = "Basic something-else"
    mirror = secured(tmp_path, origin, **CREDENTIALS)
    response = mirror.request("GET", "/v2/app/manifests/latest")
    assert response.code == 502
    assert not response.headers.hasHeader("WWW-Authenticate")
    assert error_code(mirror, response) == "UNAUTHORIZED"
    text = " ".join(repr(event) for event in logged)
    assert "origin" in text
    assert "s3cret-pass" not in text
    assert "czNjcmV0" not in text  # base64 of the password's start


def test_static_token_sent_and_client_credentials_never_forwarded(
    tmp_path: Path,
) -> None:
    """A configured token is sent as a Bearer token; the Authorization a
    client sent to the mirror never reaches an upstream."""
    origin = FakeRegistry()
    image(origin)
    mirror = secured(tmp_path, origin, token=Secret("pre-issued"))
    response = mirror.request(
        "GET", "/v2/app/manifests/latest", headers={"Authorization": "Basic Y2xpZW50"}
    )
    assert response.code == 200
    assert {auth for _, auth in origin.authorizations} == {"Bearer pre-issued"}


def rate_limited(seconds: int) -> Callable[[Request], tuple[int, bytes]]:
    """A fault answering every request with 429 and a Retry-After."""

    def fault(request: Request) -> tuple[int, bytes]:
        request.setHeader("Retry-After", str(seconds))
        return 429, b"slow down"

    return fault


def test_429_backs_off_and_fails_over(tmp_path: Path, logged: list[LogEvent]) -> None:
    """A 429 with Retry-After sets that upstream aside until then; the next
    upstream serves meanwhile, and the limited one is asked again after."""
    limited, origin = FakeRegistry(), FakeRegistry()
    content = image(origin)
    image(limited)
    limited.fault = rate_limited(120)
    mirror = Harness(str(tmp_path), {"limited": limited, "origin": origin})
    for digest in (content["layer"], content["config"]):
        response = mirror.request("GET", f"/v2/app/blobs/{digest}")
        assert response.code == 200
        mirror.body(response)
    assert len(limited.requests) == 1
    assert any("rate limiting" in (e.get("log_format") or "") for e in logged)
    mirror.clock.advance(121)
    limited.fault = None
    manifest = content["manifest"]
    assert mirror.request("GET", f"/v2/app/manifests/{manifest}").code == 200
    assert len(limited.requests) == 2


def test_429_everywhere_is_too_many_requests_with_retry_after(tmp_path: Path) -> None:
    """When every upstream is rate limited the client gets 429 TOOMANYREQUESTS
    with a Retry-After."""
    origin = FakeRegistry()
    content = image(origin)
    origin.fault = rate_limited(30)
    mirror = Harness(str(tmp_path), {"origin": origin})
    response = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 429
    assert error_code(mirror, response) == "TOOMANYREQUESTS"
    assert response.headers.getRawHeaders("Retry-After") == ["30"]


def test_pull_quota_is_recorded_and_logged(
    mirror: Harness, origin: FakeRegistry, logged: list[LogEvent]
) -> None:
    """RateLimit-Limit/Remaining are recorded per upstream and logged."""
    image(origin)
    origin.quota = (100, 7)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert mirror.upstreams["origin"].rate_limit == (100, 7)
    quota = [e for e in logged if "pull quota" in (e.get("log_format") or "")]
    assert quota and quota[0]["remaining"] == 7


@pytest.mark.parametrize(
    ("host", "other", "same"),
    [
        ("registry-1.docker.io", "auth.docker.io", True),
        ("ghcr.io", "ghcr.io", True),
        ("quay.io", "evil.io", False),
        ("a.example.co.uk", "b.example.co.uk", True),
        ("example.co.uk", "other.co.uk", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("localhost", "evil.localhost", False),
    ],
)
def test_same_site(host: str, other: str, same: bool) -> None:
    """Registrable domains come from the Public Suffix List; addresses only
    match themselves."""
    assert same_site(host, other) is same


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_redirects_to_denied_hosts_are_refused(
    mirror: Harness, origin: FakeRegistry, target: str, logged: list[LogEvent]
) -> None:
    """A blob redirect to a cloud metadata address is refused (502), logged,
    and nothing is cached."""
    content = image(origin)
    origin.redirect = target.rsplit("/", 1)[0].rstrip("/") or target
    response = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 502
    assert any("denied host" in str(e.get("log_format")) for e in logged)
    assert mirror.cached_files() == []


def test_token_realm_on_a_denied_host_is_refused(tmp_path: Path) -> None:
    """A challenge may not send the mirror to a metadata service for a token."""
    origin = FakeRegistry()
    image(origin)
    origin.token = "t"
    origin.realm = "http://169.254.169.254/token"
    harness = secured(tmp_path, origin, **CREDENTIALS)
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code in (502, 503)
    assert origin.count("GET", "/token") == 0
