"""Who may pull: anonymous networks, trusted proxies, htpasswd users and
the mirror's own tokens, in memory."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from fakeregistry import FakeRegistry
from memory import Harness, error_code, image
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from regmirror.access import Tokens, shared_key
from regmirror.config import EVERYONE, AccessConfig, parse_networks

PASSWORD = "correct horse"


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def users_file(tmp_path: Path) -> str:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "users.htpasswd"
    path.write_text(f"# users\nalice:{hashed}\nbob:{{SHA}}notbcrypt\n")
    return str(path)


def guarded(
    tmp_path: Path,
    anonymous: str = "none",
    htpasswd: bool = True,
    trusted: str = "127.0.0.1 ::1",
    narrower: dict[str, str] | None = None,
) -> tuple[Harness, FakeRegistry]:
    origin = FakeRegistry()
    image(origin)
    image(origin, name="org/app", tag="v1")
    access = AccessConfig(
        anonymous=parse_networks(anonymous),
        htpasswd=users_file(tmp_path) if htpasswd else None,
        trusted_proxies=parse_networks(trusted),
        token_ttl=300.0,
    )
    harness = Harness(
        str(tmp_path / "cache"),
        {"origin": origin},
        access=access,
        narrower={k: parse_networks(v) for k, v in (narrower or {}).items()},
    )
    return harness, origin


def from_address(address: str, **headers: str) -> dict[str, Any]:
    return {"headers": {"X-Forwarded-For": address, **headers}}


def test_anonymous_networks_through_a_trusted_proxy(tmp_path: Path) -> None:
    """Anonymous pulls are allowed from the listed networks, with the client
    address taken from X-Forwarded-For because the peer is a trusted proxy;
    others get a 401 with a Bearer challenge naming our token endpoint."""
    harness, _ = guarded(tmp_path, anonymous="10.0.0.0/8 2001:db8::/32")
    path = "/v2/app/manifests/latest"
    assert harness.request("GET", path, **from_address("10.1.2.3")).code == 200
    assert harness.request("GET", path, **from_address("2001:db8::7")).code == 200
    denied = harness.request(
        "GET", path, **from_address("192.0.2.1", Host="mirror.test")
    )
    assert denied.code == 401
    assert error_code(harness, denied) == "UNAUTHORIZED"
    assert denied.headers.getRawHeaders("WWW-Authenticate") == [
        'Bearer realm="http://mirror.test/token",service="regmirror",'
        'scope="repository:app:pull"'
    ]


def test_forwarded_header_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    """A client cannot claim an allowed address unless its peer is trusted."""
    harness, _ = guarded(tmp_path, anonymous="10.0.0.0/8", trusted="192.0.2.0/24")
    response = harness.request(
        "GET", "/v2/app/manifests/latest", **from_address("10.1.2.3")
    )
    assert response.code == 401


def test_forwarded_rfc7239_header(tmp_path: Path) -> None:
    """``Forwarded: for=...`` is understood too, IPv6 brackets included."""
    harness, _ = guarded(tmp_path, anonymous="2001:db8::/32")
    response = harness.request(
        "GET",
        "/v2/app/manifests/latest",
        headers={"Forwarded": 'for="[2001:db8::1]:4711";proto=https'},
    )
    assert response.code == 200


def test_without_htpasswd_a_denial_is_403(tmp_path: Path) -> None:
    """When no credentials could help, the answer is 403 DENIED."""
    harness, _ = guarded(tmp_path, anonymous="10.0.0.0/8", htpasswd=False)
    response = harness.request(
        "GET", "/v2/app/manifests/latest", **from_address("192.0.2.1")
    )
    assert response.code == 403
    assert error_code(harness, response) == "DENIED"


def test_basic_credentials(tmp_path: Path, logged: list[LogEvent]) -> None:
    """htpasswd users pull with Basic auth; a wrong password or an unknown
    user is a 401, logged without the password."""
    harness, origin = guarded(tmp_path)
    path = "/v2/app/manifests/latest"
    assert harness.request("GET", path, headers=basic("alice", PASSWORD)).code == 200
    assert harness.request("GET", path, headers=basic("alice", "wrong")).code == 401
    assert harness.request("GET", path, headers=basic("bob", "anything")).code == 401
    assert harness.request("GET", path).code == 401
    text = " ".join(repr(e) for e in logged)
    assert "wrong" not in text and PASSWORD not in text
    assert all(auth is None for _, auth in origin.authorizations)


def test_token_flow(tmp_path: Path) -> None:
    """The registry token flow: /v2/ challenges, /token issues a token after
    a Basic login for the scopes asked, and the token pulls exactly those
    repositories."""
    harness, _ = guarded(tmp_path)
    assert harness.request("GET", "/v2/").code == 401
    anonymous = harness.request(
        "GET", "/token?service=regmirror&scope=repository:app:pull"
    )
    assert anonymous.code == 200  # a token, but for nothing this address may pull
    nothing = json.loads(harness.body(anonymous))["token"]
    denied = harness.request(
        "GET",
        "/v2/app/manifests/latest",
        headers={"Authorization": f"Bearer {nothing}"},
    )
    assert denied.code == 401
    wrong = harness.request(
        "GET", "/token?scope=repository:app:pull", headers=basic("alice", "nope")
    )
    assert wrong.code == 401
    issued = harness.request(
        "GET",
        "/token?service=regmirror&scope=repository:ghcr.io/org/app:pull",
        headers=basic("alice", PASSWORD),
    )
    assert issued.code == 200
    document = json.loads(harness.body(issued))
    assert document["expires_in"] == 300
    bearer = {"Authorization": f"Bearer {document['token']}"}
    assert harness.request("GET", "/v2/", headers=bearer).code == 200
    ok = harness.request("GET", "/v2/ghcr.io/org/app/manifests/v1", headers=bearer)
    assert ok.code == 200
    other = harness.request("GET", "/v2/app/manifests/latest", headers=bearer)
    assert other.code == 401
    harness.clock.advance(301)
    expired = harness.request("GET", "/v2/ghcr.io/org/app/manifests/v1", headers=bearer)
    assert expired.code == 401


def test_forged_token_is_refused(tmp_path: Path) -> None:
    """A token not signed by this mirror is worth nothing."""
    harness, _ = guarded(tmp_path)
    claims = (
        base64.urlsafe_b64encode(
            json.dumps({"sub": "eve", "exp": 10**12, "repositories": ["app"]}).encode()
        )
        .decode()
        .rstrip("=")
    )
    forged = {"Authorization": f"Bearer {claims}.c2lnbmF0dXJl"}
    assert (
        harness.request("GET", "/v2/app/manifests/latest", headers=forged).code == 401
    )


def test_failed_logins_are_rate_limited(tmp_path: Path) -> None:
    """After five failed logins from an address, even a right password is
    refused with 429 until the window has passed."""
    harness, _ = guarded(tmp_path)
    path = "/v2/app/manifests/latest"
    for _ in range(5):
        assert harness.request("GET", path, headers=basic("alice", "nope")).code == 401
    limited = harness.request("GET", path, headers=basic("alice", PASSWORD))
    assert limited.code == 429
    assert error_code(harness, limited) == "TOOMANYREQUESTS"
    harness.clock.advance(61)
    assert harness.request("GET", path, headers=basic("alice", PASSWORD)).code == 200


def test_partly_open_mirror_challenges_the_ping_and_grants_anonymous_tokens(
    tmp_path: Path,
) -> None:
    """When one namespace needs credentials, the /v2/ ping is challenged (so
    that clients log in), and a client without credentials gets an anonymous
    token for the namespaces its address may pull, as from Docker Hub."""
    harness, _ = guarded(tmp_path, anonymous="any", narrower={"ghcr.io": "none"})
    ping = harness.request("GET", "/v2/")
    assert ping.code == 401
    assert ping.headers.getRawHeaders("WWW-Authenticate")[0].startswith("Bearer realm=")
    issued = harness.request(
        "GET", "/token?scope=repository:app:pull&scope=repository:ghcr.io/org/app:pull"
    )
    token = json.loads(harness.body(issued))["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert harness.request("GET", "/v2/", headers=bearer).code == 200
    assert (
        harness.request("GET", "/v2/app/manifests/latest", headers=bearer).code == 200
    )
    refused = harness.request("GET", "/v2/ghcr.io/org/app/manifests/v1", headers=bearer)
    assert refused.code == 401


def test_namespace_narrows_anonymous_access(tmp_path: Path) -> None:
    """A namespace's own ``anonymous = none`` keeps it for users only, while
    the rest stays open."""
    harness, _ = guarded(tmp_path, anonymous="any", narrower={"ghcr.io": "none"})
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    assert harness.request("GET", "/v2/ghcr.io/org/app/manifests/v1").code == 401
    with_user = harness.request(
        "GET", "/v2/ghcr.io/org/app/manifests/v1", headers=basic("alice", PASSWORD)
    )
    assert with_user.code == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [("any", EVERYONE), ("none", ()), ("10.0.0.1", parse_networks("10.0.0.1/32"))],
)
def test_parse_networks(text: str, expected: object) -> None:
    """``any``, ``none`` and address lists."""
    assert parse_networks(text) == expected


def test_token_key_is_shared_through_the_cache(tmp_path: Path) -> None:
    """Every process sharing a cache signs with one key, kept private in the
    cache folder: a token from one worker is good at another, and after a
    restart."""
    path = str(tmp_path / "cache" / "token.key")
    first, second = shared_key(path), shared_key(path)
    assert first == second and len(first) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    clock = Clock()
    one = Tokens(clock, 60.0, first)
    two = Tokens(clock, 60.0, second)
    token, _ = one.issue("alice", ["app"])
    assert two.verify(token) is not None


@pytest.mark.parametrize("where", ["/v2/", "/token?scope=repository:app:pull"])
def test_password_longer_than_bcrypt_takes_is_a_failed_login(
    tmp_path: Path, where: str
) -> None:
    """
    A password over bcrypt's 72 bytes (bcrypt 5 raises for it) is a wrong
    password like any other: 401 at the API and at /token, counted toward
    the login throttle.
    """
    harness, _ = guarded(tmp_path)
    long = basic("alice", PASSWORD + "x" * 80)
    for _ in range(5):
        answer = harness.request("GET", where, headers=long)
        assert answer.code == 401
        assert error_code(harness, answer) == "UNAUTHORIZED"
    limited = harness.request("GET", where, headers=basic("alice", PASSWORD))
    assert limited.code == 429


def test_malformed_bcrypt_entry_is_ignored(tmp_path: Path) -> None:
    """
    An htpasswd line that looks like bcrypt but is not a valid hash (bcrypt
    raises for it) is ignored like any other bad line: its user gets a 401
    at the API and at /token, never a 500 or no answer.
    """
    harness, _ = guarded(tmp_path)
    users = Path(users_file(tmp_path))
    users.write_text(
        users.read_text() + "carol:$2y$05$tooshort\ndave:$2b$99$" + "a" * 53 + "\n"
    )
    for user in ("carol", "dave"):
        for where in ("/v2/", "/token?scope=repository:app:pull"):
            answer = harness.request("GET", where, headers=basic(user, "x"))
            assert answer.code == 401
            assert error_code(harness, answer) == "UNAUTHORIZED"


def test_token_endpoint_answers_an_internal_error(
    tmp_path: Path, logged: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault inside /token is a logged 500 with an OCI body, not silence."""
    harness, _ = guarded(tmp_path)

    def broken(*args: object) -> tuple[str, float]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Tokens, "issue", broken)
    answer = harness.request(
        "GET", "/token?scope=repository:app:pull", headers=basic("alice", PASSWORD)
    )
    assert answer.code == 500
    assert error_code(harness, answer) == "UNKNOWN"
    assert any(e.get("log_failure") is not None for e in logged)
