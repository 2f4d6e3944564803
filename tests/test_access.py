"""Who may pull: anonymous networks, trusted proxies, htpasswd users and
the mirror's own tokens, in memory."""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import bcrypt
import pytest
from attrs import frozen
from fakeregistry import FakeRegistry, digest_of
from memory import (
    DOCKER_ALIAS,
    DOCKER_HOST,
    GHCR_ALIAS,
    GHCR_HOST,
    LAYER,
    Harness,
    error_code,
    image,
    result,
)
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogPublisher, formatEvent

from regmirror.access.clients import client_address
from regmirror.access.gate import Gate
from regmirror.access.htpasswd import Htpasswd
from regmirror.access.tokens import Tokens, shared_key
from regmirror.config import EVERYONE, AccessConfig, ConfigError
from regmirror.errors import TooManyRequests
from regmirror.ini import load
from regmirror.ini_values import parse_networks

ALICE, PASSWORD = "alice", "correct horse"


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
    forwarded_header: str | None = None,
) -> tuple[Harness, FakeRegistry]:
    origin = FakeRegistry()
    image(origin)
    image(origin, name="org/app", tag="v1")
    header = {} if forwarded_header is None else {"forwarded_header": forwarded_header}
    access = AccessConfig(
        anonymous=parse_networks(anonymous),
        htpasswd=users_file(tmp_path) if htpasswd else None,
        trusted_proxies=parse_networks(trusted),
        token_ttl=300.0,
        **header,
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
    """With ``forwarded_header = forwarded``, ``Forwarded: for=...`` is
    understood, IPv6 brackets included."""
    harness, _ = guarded(
        tmp_path, anonymous="2001:db8::/32", forwarded_header="forwarded"
    )
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
    token, _ = one.issue("alice", [("docker.io", "library/app")])
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


# -- one namespace decision for the token and the request ------------------------


@frozen
class Form:
    """
    One way of asking for ``org/app`` (tag ``v1``): the repository name as
    written in the path, the query string, and the ``Host`` header.
    """

    namespace: str
    name: str
    query: str = ""
    host: str = "mirror.test"

    def path(self, endpoint: str) -> str:
        return f"/v2/{self.name}/{endpoint}" + (f"?{self.query}" if self.query else "")


#: every routing form of each namespace, near variants included
FORMS = {
    "docker.io default": Form("docker.io", "org/app"),
    "docker.io prefix": Form("docker.io", "docker.io/org/app"),
    "docker.io ns": Form("docker.io", "org/app", "ns=docker.io"),
    "docker.io ns alias": Form("docker.io", "org/app", f"ns={DOCKER_ALIAS}"),
    "docker.io host": Form("docker.io", "org/app", host=DOCKER_HOST),
    "docker.io alias": Form("docker.io", f"{DOCKER_ALIAS}/org/app"),
    "ghcr.io prefix": Form("ghcr.io", "ghcr.io/org/app"),
    "ghcr.io ns": Form("ghcr.io", "org/app", "ns=ghcr.io"),
    "ghcr.io ns upper case": Form("ghcr.io", "org/app", "ns=GHCR.IO"),
    "ghcr.io ns percent-encoded": Form("ghcr.io", "org/app", "ns=ghcr%2Eio"),
    "ghcr.io ns alias": Form("ghcr.io", "org/app", f"ns={GHCR_ALIAS}"),
    "ghcr.io host": Form("ghcr.io", "org/app", host=GHCR_HOST),
    "ghcr.io host port case": Form(
        "ghcr.io", "org/app", host=f"{GHCR_HOST.upper()}:5000"
    ),
    "ghcr.io alias": Form("ghcr.io", f"{GHCR_ALIAS}/org/app"),
}
#: where a client outside every narrowed network, and one inside, come from
OUTSIDE, INSIDE = "192.0.2.1", "10.1.2.3"


def two_namespaces(tmp_path: Path, anonymous: str, ghcr: str | None) -> Harness:
    """
    A mirror whose upstream has ``org/app:v1``, with ``[access] anonymous``
    and ghcr.io's own ``anonymous`` (``None``: not narrowed).
    """
    harness, _ = guarded(
        tmp_path,
        anonymous=anonymous,
        narrower=None if ghcr is None else {"ghcr.io": ghcr},
    )
    return harness


#: the endpoints of a pull of ``org/app:v1``, and its tag list
ENDPOINTS = ("manifests/v1", "tags/list", f"blobs/{digest_of(LAYER)}")


def ask(
    harness: Harness,
    form: Form,
    endpoint: str,
    address: str = OUTSIDE,
    authorization: str | None = None,
) -> Any:
    """A request of *form* for *endpoint* from *address*."""
    headers = {"Host": form.host, "X-Forwarded-For": address}
    if authorization is not None:
        headers["Authorization"] = authorization
    return harness.request("GET", form.path(endpoint), headers=headers)


def challenge_of(response: Any) -> dict[str, str]:
    """The parameters of a response's Bearer challenge."""
    (value,) = response.headers.getRawHeaders("WWW-Authenticate")
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer", value
    return dict(re.findall(r'(\w+)="([^"]*)"', rest))


def token_from_realm(
    harness: Harness,
    realm: str,
    scope: str,
    address: str = OUTSIDE,
    authorization: str | None = None,
) -> str:
    """
    What a client does with a challenge: ask the realm (keeping its query)
    for a token for *scope*, with Basic credentials or none.
    """
    parts = urlsplit(realm)
    query = "&".join(
        part
        for part in (parts.query, urlencode({"service": "regmirror", "scope": scope}))
        if part
    )
    headers = {"Host": parts.netloc, "X-Forwarded-For": address}
    if authorization is not None:
        headers["Authorization"] = authorization
    answer = harness.request("GET", f"{parts.path}?{query}", headers=headers)
    assert answer.code == 200, harness.body(answer)
    return str(json.loads(harness.body(answer))["token"])


def client_token(
    harness: Harness,
    form: Form,
    address: str = OUTSIDE,
    authorization: str | None = None,
) -> str:
    """
    The token a registry client gets for pulling *form*: from the realm
    and scope of the request's own challenge when it is challenged
    (containerd), else from the challenge of its ``/v2/`` ping with a scope
    of its own (Docker, skopeo: they ping first), as anonymous or with
    *authorization* (Basic).
    """
    first = ask(harness, form, "manifests/v1", address)
    ping = harness.request(
        "GET", "/v2/", headers={"Host": form.host, "X-Forwarded-For": address}
    )
    if first.code == 401:
        parameters = challenge_of(first)
        realm, scope = parameters["realm"], parameters["scope"]
    elif ping.code == 401:
        realm = challenge_of(ping)["realm"]
        scope = f"repository:{form.name}:pull"
    else:
        # Nothing is challenged for this address: no client would ask for
        # a token, but one may, from the realm it would be given.
        realm = f"http://{form.host}/token" + (f"?{form.query}" if form.query else "")
        scope = f"repository:{form.name}:pull"
    return token_from_realm(harness, realm, scope, address, authorization)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def outcomes(
    harness: Harness, forms: list[str], token: str, address: str = OUTSIDE
) -> dict[tuple[str, str], int]:
    """The status of every endpoint of every form named, with *token*."""
    return {
        (name, endpoint): ask(
            harness, FORMS[name], endpoint, address, bearer(token)
        ).code
        for name in forms
        for endpoint in ENDPOINTS
    }


DOCKER_FORMS = [name for name, form in FORMS.items() if form.namespace == "docker.io"]
GHCR_FORMS = [name for name, form in FORMS.items() if form.namespace == "ghcr.io"]


@pytest.mark.parametrize("ghcr", ["none", "10.0.0.0/8"])
@pytest.mark.parametrize("who", ["anonymous", "alice"])
def test_a_token_for_the_open_namespace_never_opens_a_closed_one(
    tmp_path: Path, ghcr: str, who: str
) -> None:
    """
    docker.io is open to everyone, ghcr.io closed (``anonymous = none``) or
    narrowed to a network the client is not in.  A token issued at
    ``/token`` for docker.io's ``org/app``, however the client routed its
    token request (default, prefix, ``ns``, alias, Host), anonymous or as a
    user who may pull ghcr.io, is refused (401, ``insufficient_scope``) for
    ``org/app`` of ghcr.io by every routing form and endpoint, and ghcr.io's
    upstream is not asked.
    """
    harness = two_namespaces(tmp_path, "any", ghcr)
    credentials = (
        None if who == "anonymous" else basic(ALICE, PASSWORD)["Authorization"]
    )
    origin = harness.fakes["origin"]
    for name in DOCKER_FORMS:
        form = FORMS[name]
        token = token_from_realm(
            harness,
            f"http://{form.host}/token" + (f"?{form.query}" if form.query else ""),
            f"repository:{form.name}:pull",
            authorization=credentials,
        )
        assert outcomes(harness, [name], token) == dict.fromkeys(
            [(name, e) for e in ENDPOINTS], 200
        )
        asked = len(origin.requests)
        refused = outcomes(harness, GHCR_FORMS, token)
        assert refused == dict.fromkeys(refused, 401), (name, refused)
        assert len(origin.requests) == asked
        answer = ask(
            harness, FORMS["ghcr.io ns"], "manifests/v1", OUTSIDE, bearer(token)
        )
        assert challenge_of(answer)["error"] == "insufficient_scope"


@pytest.mark.parametrize("issued_by", list(FORMS))
def test_a_token_pulls_its_own_namespace_by_every_form_and_no_other(
    tmp_path: Path, issued_by: str
) -> None:
    """
    With both namespaces closed to anonymous clients, alice's token got the
    way a client gets it for one routing form (the realm and scope of that
    request's challenge) pulls ``org/app`` of that namespace through every
    routing form, and is refused (401) for ``org/app`` of the other.
    """
    harness = two_namespaces(tmp_path, "none", None)
    form = FORMS[issued_by]
    token = client_token(
        harness, form, authorization=basic(ALICE, PASSWORD)["Authorization"]
    )
    own = DOCKER_FORMS if form.namespace == "docker.io" else GHCR_FORMS
    other = GHCR_FORMS if form.namespace == "docker.io" else DOCKER_FORMS
    served = outcomes(harness, own, token)
    assert served == dict.fromkeys(served, 200)
    refused = outcomes(harness, other, token)
    assert refused == dict.fromkeys(refused, 401)


@pytest.mark.parametrize("ghcr", ["none", "10.0.0.0/8"])
def test_every_routing_form_under_every_access_setting(
    tmp_path: Path, ghcr: str
) -> None:
    """
    docker.io open to everyone, ghcr.io closed or narrowed to 10.0.0.0/8;
    clients inside and outside that network, with no credentials, alice's
    Basic credentials, an anonymous token and alice's token, each token got
    as a client gets it for that routing form.  A client is served exactly
    when its address may pull the namespace anonymously or it is alice:
    an anonymous token adds nothing.
    """
    harness = two_namespaces(tmp_path, "any", ghcr)
    alice = basic(ALICE, PASSWORD)["Authorization"]
    wrong: list[tuple[str, str, str, str, int]] = []
    for name, form in FORMS.items():
        for address in (OUTSIDE, INSIDE):
            open_to_address = form.namespace == "docker.io" or (
                ghcr != "none" and address == INSIDE
            )
            credentials = {
                "nothing": None,
                "basic": alice,
                "anonymous token": bearer(client_token(harness, form, address)),
                "alice's token": bearer(client_token(harness, form, address, alice)),
            }
            for what, authorization in credentials.items():
                expected = (
                    200
                    if open_to_address or "alice" in what or what == "basic"
                    else 401
                )
                for endpoint in ENDPOINTS:
                    code = ask(harness, form, endpoint, address, authorization).code
                    if code != expected:
                        wrong.append((name, address, what, endpoint, code))
    assert wrong == []


@pytest.mark.parametrize(
    ("name", "realm_query"),
    [
        ("ghcr.io prefix", ""),
        ("ghcr.io ns", "?ns=ghcr.io"),
        ("ghcr.io ns upper case", "?ns=ghcr.io"),
        ("ghcr.io ns alias", "?ns=ghcr.io"),
        ("ghcr.io host", ""),
        ("ghcr.io alias", ""),
    ],
)
def test_the_challenge_names_what_token_routes_back_to_the_namespace(
    tmp_path: Path, name: str, realm_query: str
) -> None:
    """
    The challenge of a request routed by ``ns`` names the namespace in the
    realm's query (``?ns=ghcr.io``, its own name whatever the client
    wrote); a request routed by Host names that Host in the realm; the
    scope names the repository as the request wrote it.  A token that does
    not cover the request is ``error="insufficient_scope"``, one that is
    no good ``error="invalid_token"`` (containerd then asks the realm
    again).
    """
    harness = two_namespaces(tmp_path, "any", "none")
    form = FORMS[name]
    plain = challenge_of(ask(harness, form, "manifests/v1"))
    assert plain == {
        "realm": f"http://{form.host}/token{realm_query}",
        "service": "regmirror",
        "scope": f"repository:{form.name}:pull",
    }
    anonymous = client_token(harness, FORMS["docker.io default"])
    other = challenge_of(ask(harness, form, "manifests/v1", OUTSIDE, bearer(anonymous)))
    assert other == {**plain, "error": "insufficient_scope"}
    forged = challenge_of(ask(harness, form, "manifests/v1", OUTSIDE, "Bearer x.y"))
    assert forged == {**plain, "error": "invalid_token"}


def test_ns_is_read_once_and_by_its_exact_name(tmp_path: Path) -> None:
    """
    ``ns`` given twice is refused (400) at the API and at ``/token``, in
    either order, and nothing is asked upstream; ``NS`` is no routing
    parameter anywhere: ``/v2/org/app/...?NS=ghcr.io`` is docker.io's, and
    an anonymous token asked with ``?NS=ghcr.io`` is docker.io's too.
    """
    harness = two_namespaces(tmp_path, "any", "none")
    origin = harness.fakes["origin"]
    for query in (
        "ns=docker.io&ns=ghcr.io",
        "ns=ghcr.io&ns=docker.io",
        "ns=ghcr.io&ns=ghcr.io",
    ):
        for endpoint in ENDPOINTS:
            answer = ask(harness, Form("ghcr.io", "org/app", query), endpoint)
            assert answer.code == 400, (query, endpoint)
        issued = harness.request(
            "GET",
            f"/token?{query}&scope=repository:org/app:pull",
            headers=basic(ALICE, PASSWORD),
        )
        assert issued.code == 400
        assert "token" not in json.loads(harness.body(issued))
    assert origin.requests == []

    upper = Form("docker.io", "org/app", "NS=ghcr.io")
    served = ask(harness, upper, "manifests/v1")
    assert served.code == 200
    assert served.headers.getRawHeaders("OCI-Namespace") == ["docker.io"]
    token = token_from_realm(
        harness, "http://mirror.test/token?NS=ghcr.io", "repository:org/app:pull"
    )
    refused = outcomes(harness, GHCR_FORMS, token)
    assert refused == dict.fromkeys(refused, 401)


@pytest.mark.parametrize(
    ("scope", "grants"),
    [
        ("repository%3Aghcr.io%2Forg%2Fapp%3Apull", True),
        ("repository:ghcr.io%2Forg/app:pull", True),
        ("repository:ghcr.io%252Forg%252Fapp:pull", False),
        ("repository:ghcr.io/org/../org/app:pull", False),
        ("repository:GHCR.IO/org/app:pull", False),
    ],
)
def test_percent_encoded_scopes(tmp_path: Path, scope: str, grants: bool) -> None:
    """
    A scope is decoded once, as any query parameter, then routed like a
    request's path: ``ghcr.io%2Forg%2Fapp`` is ghcr.io's ``org/app`` (for
    alice; an anonymous client gets nothing for it), a double encoding or
    a name the grammar refuses grants nothing.
    """
    harness = two_namespaces(tmp_path, "any", "none")
    for authorization, expected in (
        (basic(ALICE, PASSWORD)["Authorization"], 200 if grants else 401),
        (None, 401),
    ):
        headers = {"X-Forwarded-For": OUTSIDE}
        if authorization is not None:
            headers["Authorization"] = authorization
        issued = harness.request(
            "GET", f"/token?service=regmirror&scope={scope}", headers=headers
        )
        assert issued.code == 200
        token = json.loads(harness.body(issued))["token"]
        answers = outcomes(harness, GHCR_FORMS, token)
        assert answers == dict.fromkeys(answers, expected), authorization


def test_a_token_in_the_former_format_is_refused(tmp_path: Path) -> None:
    """
    A token signed with the mirror's key in the former format (bare
    repository names, no namespace) opens nothing any more, not even the
    repository it names.
    """
    harness, _ = guarded(tmp_path)
    assert harness.gate is not None
    payload = (
        base64.urlsafe_b64encode(
            json.dumps(
                {"sub": "alice", "exp": 10**12, "repositories": ["org/app"]}
            ).encode()
        )
        .decode()
        .rstrip("=")
    )
    signature = (
        base64.urlsafe_b64encode(
            hmac.new(harness.gate.key, payload.encode(), hashlib.sha256).digest()
        )
        .decode()
        .rstrip("=")
    )
    token = f"{payload}.{signature}"
    assert harness.gate.tokens.verify(token) is not None  # well signed
    answers = outcomes(harness, list(FORMS), token)
    assert answers == dict.fromkeys(answers, 401)


# -- the one forwarding header its proxies set ------------------------------------

#: what a client outside every anonymous network, and one inside, send as
#: the value of each forwarding header
FORWARDING = {
    "x-forwarded-for": ("X-Forwarded-For", "10.1.2.3"),
    "forwarded": ("Forwarded", "for=10.1.2.3"),
    "x-real-ip": ("X-Real-IP", "10.1.2.3"),
}
#: headers some proxies set, none of which the mirror may believe
OTHER_HEADERS = (
    "X-Forwarded_For",
    "X-Forwarded",
    "Forwarded-For",
    "X-Client-IP",
    "Client-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Cluster-Client-IP",
    "X-Originating-IP",
    "Fastly-Client-IP",
)


@pytest.mark.parametrize("setting", [None, *FORWARDING])
def test_only_the_configured_forwarding_header_is_believed(
    tmp_path: Path, setting: str | None
) -> None:
    """
    The finding of issue 16: ``Forwarded: for=10.1.2.3`` from a client,
    passed on by a proxy that sets ``X-Forwarded-For``, made the client
    10.1.2.3.  The mirror believes the one header ``forwarded_header``
    names (``x-forwarded-for`` when not set), from a trusted proxy, and
    ignores the others and every look-alike.
    """
    harness, _ = guarded(
        tmp_path, anonymous="10.0.0.0/8 2001:db8::/32", forwarded_header=setting
    )
    believed = setting or "x-forwarded-for"
    path = "/v2/app/manifests/latest"
    outcomes = {
        header: harness.request("GET", path, headers={header: value}).code
        for header, value in FORWARDING.values()
    }
    expected = {
        header: 200 if key == believed else 401
        for key, (header, _) in FORWARDING.items()
    }
    assert outcomes == expected
    for header in OTHER_HEADERS:
        code = harness.request("GET", path, headers={header: "10.1.2.3"}).code
        assert code == 401, header


#: (setting, header lines, whether the client is inside the anonymous
#: networks): every near variant of each header.  127.0.0.1 and ::1, the
#: proxy's own addresses, are open too, so that a hop mistaken for the
#: proxy would show as a 200.
VARIANTS: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3")], True),
    ("x-forwarded-for", [("x-FORWARDED-for", "10.1.2.3")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "192.0.2.1")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3, 192.0.2.1")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "192.0.2.1,10.1.2.3")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "192.0.2.1, 10.1.2.3, 127.0.0.1")], True),
    (
        "x-forwarded-for",
        [("X-Forwarded-For", "10.1.2.3"), ("X-Forwarded-For", "192.0.2.1")],
        False,
    ),
    (
        "x-forwarded-for",
        [("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-For", "10.1.2.3")],
        True,
    ),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3,,")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3:4711")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "2001:db8::1")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "[2001:db8::1]:4711")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "::ffff:10.1.2.3")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "2001:DB8::1")], True),
    ("x-forwarded-for", [("X-Forwarded-For", "unknown")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "_hidden")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3, unknown")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3, garbage!")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "010.1.2.3")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3.4")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3:port")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "[2001:db8::1")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "167837955")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "0x0a010203")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10%2e1.2.3")], False),
    ("x-forwarded-for", [("X-Forwarded-For", "10.1.2.3%0a")], False),
    (
        "x-forwarded-for",
        [("X-Forwarded-For", "10.1.2.3"), ("Forwarded", "for=_x")],
        True,
    ),
    ("forwarded", [("Forwarded", "for=10.1.2.3")], True),
    ("forwarded", [("forwarded", "FOR=10.1.2.3")], True),
    ("forwarded", [("Forwarded", "for=192.0.2.1")], False),
    ("forwarded", [("Forwarded", 'for="[2001:db8::1]:4711"')], True),
    ("forwarded", [("Forwarded", 'for="[2001:db8::1]"')], True),
    ("forwarded", [("Forwarded", 'for="[::1]:1234"')], True),
    ("forwarded", [("Forwarded", 'for="10.1.2.3:4711"')], True),
    ("forwarded", [("Forwarded", 'for="10.1.2.3:_port"')], True),
    ("forwarded", [("Forwarded", "for=10.1.2.3;proto=https;by=127.0.0.1")], True),
    ("forwarded", [("Forwarded", "proto=http; For=10.1.2.3")], True),
    ("forwarded", [("Forwarded", "for=10.1.2.3, for=192.0.2.1")], False),
    ("forwarded", [("Forwarded", "for=192.0.2.1, for=10.1.2.3")], True),
    (
        "forwarded",
        [("Forwarded", "for=192.0.2.1"), ("Forwarded", "for=10.1.2.3")],
        True,
    ),
    (
        "forwarded",
        [("Forwarded", "for=10.1.2.3"), ("Forwarded", "for=192.0.2.1")],
        False,
    ),
    ("forwarded", [("Forwarded", "for=unknown")], False),
    ("forwarded", [("Forwarded", 'for="unknown"')], False),
    ("forwarded", [("Forwarded", "for=_hidden")], False),
    ("forwarded", [("Forwarded", 'for="_gazonk"')], False),
    ("forwarded", [("Forwarded", "for=10.1.2.3, for=unknown")], False),
    ("forwarded", [("Forwarded", "by=127.0.0.1")], False),
    ("forwarded", [("Forwarded", "for=10.1.2.3;for=10.1.2.4")], False),
    ("forwarded", [("Forwarded", 'for="192.0.2.1,for=10.1.2.3"')], False),
    ("forwarded", [("Forwarded", 'for="10.1.2.3')], False),
    ("forwarded", [("Forwarded", "for=10.1.2.3:99999999")], False),
    ("forwarded", [("Forwarded", "for")], False),
    ("forwarded", [("Forwarded", 'for="10%2e1%2e2%2e3"')], False),
    ("forwarded", [("Forwarded", 'for="[2001:db8::1%2525eth0]"')], True),
    ("forwarded", [("Forwarded", "for=10.1.2.3"), ("X-Forwarded-For", "_x")], True),
    ("x-real-ip", [("X-Real-IP", "10.1.2.3")], True),
    ("x-real-ip", [("x-real-ip", "2001:db8::1")], True),
    ("x-real-ip", [("X-Real-IP", "192.0.2.1")], False),
    ("x-real-ip", [("X-Real-IP", "unknown")], False),
    ("x-real-ip", [("X-Real-IP", "10.1.2.3"), ("X-Real-IP", "192.0.2.1")], False),
    ("x-real-ip", [("X-Real-IP", "10.1.2.3"), ("X-Forwarded-For", "_x")], True),
]


@pytest.mark.parametrize(
    ("setting", "lines", "inside"),
    VARIANTS,
    ids=[f"{s}-{'+'.join(v for _, v in lines)}" for s, lines, _ in VARIANTS],
)
def test_forwarding_header_variants(
    tmp_path: Path, setting: str, lines: list[tuple[str, str]], inside: bool
) -> None:
    """
    Every spelling of the believed header: names in any case, repeated
    lines read as one comma-separated list, the nearest untrusted hop (the
    right-most) as the client, ports, IPv6 in brackets or bare,
    IPv4-mapped.  A hop that is not an address (``unknown``, an obfuscated
    ``_hidden``, garbage, a half-quoted value, an element without
    ``for``) matches no network: it is never taken for the proxy, whose
    own address is open here.
    """
    harness, _ = guarded(
        tmp_path,
        anonymous="10.0.0.0/8 2001:db8::/32 127.0.0.1 ::1",
        forwarded_header=setting,
    )
    headers: dict[str, list[str]] = {}
    for name, value in lines:
        headers.setdefault(name, []).append(value)
    answer = harness.request("GET", "/v2/app/manifests/latest", headers=headers)
    assert answer.code == (200 if inside else 401)


def test_a_rotating_client_chosen_header_does_not_defeat_the_login_throttle(
    tmp_path: Path,
) -> None:
    """
    Rotating ``Forwarded: for=`` (a header the proxy passes on from the
    client) made every failed login come from a new address.  Ignored, it
    changes nothing: the sixth attempt from the same proxy-named address
    is 429.
    """
    harness, _ = guarded(tmp_path)
    path = "/v2/app/manifests/latest"
    for n in range(5):
        headers = {
            "X-Forwarded-For": "192.0.2.1",
            "Forwarded": f"for=10.0.0.{n}",
            "X-Real-IP": f"10.0.1.{n}",
            **basic(ALICE, "nope"),
        }
        assert harness.request("GET", path, headers=headers).code == 401
    last = {
        "X-Forwarded-For": "192.0.2.1",
        "Forwarded": "for=10.0.0.99",
        **basic(ALICE, PASSWORD),
    }
    assert harness.request("GET", path, headers=last).code == 429


def test_clients_without_an_address_share_a_throttle_that_is_not_the_proxys(
    tmp_path: Path,
) -> None:
    """
    Failed logins from hops that are not addresses (``unknown``, obfuscated
    identifiers, garbage) count together, however they are spelled, and
    never against the proxy's own address.
    """
    harness, _ = guarded(tmp_path)
    path = "/v2/app/manifests/latest"
    for hop in ("unknown", "_a", "_b", "garbage!", "10.1.2.3, unknown"):
        headers = {"X-Forwarded-For": hop, **basic(ALICE, "nope")}
        assert harness.request("GET", path, headers=headers).code == 401
    sixth = {"X-Forwarded-For": "_c", **basic(ALICE, PASSWORD)}
    assert harness.request("GET", path, headers=sixth).code == 429
    proxy = harness.request("GET", path, headers=basic(ALICE, PASSWORD))
    assert proxy.code == 200


@pytest.mark.parametrize(
    ("setting", "headers", "scheme"),
    [
        (None, {"X-Forwarded-Proto": "https"}, "https"),
        (None, {"X-Forwarded-Proto": "HTTPS"}, "https"),
        (None, {"X-Forwarded-Proto": "http, https"}, "https"),
        (None, {"X-Forwarded-Proto": "https, http"}, "http"),
        (None, {"X-Forwarded-Proto": ["http", "https"]}, "https"),
        (None, {"X-Forwarded-Proto": ["https", "http"]}, "http"),
        (None, {"X-Forwarded-Proto": "ftp"}, "http"),
        (None, {"Forwarded": "for=192.0.2.1;proto=https"}, "http"),
        ("forwarded", {"Forwarded": "for=192.0.2.1;proto=https"}, "https"),
        ("forwarded", {"Forwarded": "proto=http, for=192.0.2.1;proto=https"}, "https"),
        ("forwarded", {"Forwarded": "for=192.0.2.1;proto=https, proto=http"}, "http"),
        ("forwarded", {"X-Forwarded-Proto": "https"}, "http"),
        ("x-real-ip", {"X-Forwarded-Proto": "http, https"}, "https"),
    ],
)
def test_the_realm_scheme_comes_from_the_nearest_trusted_proxy(
    tmp_path: Path,
    setting: str | None,
    headers: dict[str, str | list[str]],
    scheme: str,
) -> None:
    """
    The realm is https when the trusted proxy in front says so: its
    ``X-Forwarded-Proto`` (the right-most value of a list or of repeated
    lines, the one it added), or with ``forwarded_header = forwarded`` the
    ``proto`` of its own (the last) ``Forwarded`` element; any other value
    is http.
    """
    harness, _ = guarded(tmp_path, forwarded_header=setting)
    answer = harness.request(
        "GET", "/v2/", headers={"Host": "mirror.example", **headers}
    )
    assert challenge_of(answer)["realm"] == f"{scheme}://mirror.example/token"


def test_forwarded_proto_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    """``X-Forwarded-Proto`` is only believed from trusted proxies."""
    harness, _ = guarded(tmp_path, trusted="192.0.2.0/24")
    answer = harness.request(
        "GET", "/v2/", headers={"Host": "mirror.example", "X-Forwarded-Proto": "https"}
    )
    assert challenge_of(answer)["realm"] == "http://mirror.example/token"


# -- failed logins: one count for every process, bounded ---------------------------


def access_for(tmp_path: Path) -> AccessConfig:
    return AccessConfig(
        anonymous=(),
        htpasswd=users_file(tmp_path),
        trusted_proxies=parse_networks("127.0.0.1"),
    )


def log_in(gate: Gate, address: str, user: str, password: str) -> Deferred[Any]:
    """:meth:`Gate.login` with Basic credentials, from *address*."""
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return Deferred.fromCoroutine(gate.login(ipaddress.ip_address(address), pair))


def logged_in(gate: Gate, address: str, user: str, password: str) -> str | None:
    outcome: str | None = result(log_in(gate, address, user, password))
    return outcome


def test_failed_logins_are_counted_for_every_process_sharing_the_cache(
    tmp_path: Path,
) -> None:
    """
    With ``workers = 2`` ten wrong passwords got through in a minute: each
    process counted its own.  Two gates over one cache folder (two
    processes) count together: three failures at one and two at the other
    make the sixth attempt 429 at both, until the minute has passed.
    """
    clock = Clock()
    config = access_for(tmp_path)
    logins = str(tmp_path / "cache" / "logins")
    one = Gate(config, clock, maybeDeferred, logins=logins)
    two = Gate(config, clock, maybeDeferred, logins=logins)
    for gate in (one, two, one, two, one):
        assert logged_in(gate, "192.0.2.1", ALICE, "nope") is None
        clock.advance(1)
    for gate in (one, two):
        with pytest.raises(TooManyRequests):
            logged_in(gate, "192.0.2.1", ALICE, PASSWORD)
    assert logged_in(two, "192.0.2.2", ALICE, PASSWORD) == ALICE
    clock.advance(56)
    assert logged_in(two, "192.0.2.1", ALICE, PASSWORD) == ALICE
    third = Gate(config, clock, maybeDeferred, logins=logins)
    assert logged_in(third, "192.0.2.1", ALICE, PASSWORD) == ALICE


def test_attempts_in_flight_count_before_bcrypt_answers(tmp_path: Path) -> None:
    """
    Logins are counted when they start, not when bcrypt answers: ten
    wrong passwords sent at once from one address start five bcrypt
    checks; the other five are 429 at once.  A right password then gives
    its attempt back.
    """
    pending: list[Deferred[Any]] = []

    def in_thread(work: Any) -> Deferred[Any]:
        pending.append(Deferred())
        pending[-1].addCallback(lambda _: work())
        return pending[-1]

    gate = Gate(access_for(tmp_path), Clock(), in_thread)
    attempts = [log_in(gate, "192.0.2.1", ALICE, f"nope{n}") for n in range(10)]
    assert len(pending) == 5
    refused = [d for d in attempts if d.called]
    assert len(refused) == 5
    for d in refused:
        failure: list[Any] = []
        d.addErrback(failure.append)
        assert failure[0].check(TooManyRequests)
    for d in pending:
        d.callback(None)
    assert [result(d) for d in attempts if d not in refused] == [None] * 5

    fresh = Gate(access_for(tmp_path), Clock(), maybeDeferred)
    for _ in range(4):
        assert logged_in(fresh, "192.0.2.1", ALICE, PASSWORD) == ALICE
        fresh._verified.clear()  # noqa: SLF001 (every one through bcrypt)
    assert logged_in(fresh, "192.0.2.1", ALICE, "nope") is None
    assert logged_in(fresh, "192.0.2.1", ALICE, PASSWORD) == ALICE


def test_an_ipv6_client_is_counted_by_its_64_network(tmp_path: Path) -> None:
    """
    Any host holds a whole /64: failed logins from IPv6 addresses count
    per /64 network, not per address, so that rotating addresses within
    it gains nothing.  Another /64 is not affected.
    """
    gate = Gate(access_for(tmp_path), Clock(), maybeDeferred)
    for n in range(5):
        assert logged_in(gate, f"2001:db8::{n + 1:x}", ALICE, "nope") is None
    with pytest.raises(TooManyRequests):
        logged_in(gate, "2001:db8::ffff:1", ALICE, PASSWORD)
    assert logged_in(gate, "2001:db8:0:1::1", ALICE, PASSWORD) == ALICE


@pytest.mark.parametrize("shared", [False, True])
def test_failed_logins_from_20000_addresses_use_bounded_memory(
    tmp_path: Path, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Failed-login records were kept per address, dropped only when that
    address came back: 20,000 addresses (one IPv6 host has far more) left
    20,000 records.  The records are a table of fixed size (4,096 clients),
    in memory or in the shared file: after 20,000 addresses the process
    holds no more objects than after 2,000, and the file has not grown.
    The latest addresses are still counted.
    """
    # Not 100,000 warnings kept by a log buffer: what is measured is the gate.
    monkeypatch.setattr(Gate, "log", Logger(observer=LogPublisher()))
    clock = Clock()
    logins = str(tmp_path / "logins") if shared else None
    gate = Gate(access_for(tmp_path), clock, lambda work: succeed(False), logins=logins)
    wrong = base64.b64encode(b"alice:nope").decode()

    def fail(address: ipaddress.IPv4Address) -> Deferred[Any]:
        return Deferred.fromCoroutine(gate.login(address, wrong))

    def fail_from(first: int, last: int) -> None:
        for n in range(first, last):
            assert result(fail(ipaddress.IPv4Address(0x0A000000 + n))) is None
            if n % 1000 == 0:
                clock.advance(0.1)

    fail_from(0, 2_000)
    gc.collect()
    before = len(gc.get_objects())
    size = os.path.getsize(logins) if logins else 0
    fail_from(2_000, 20_000)
    gc.collect()
    assert len(gc.get_objects()) - before < 1_000
    if logins:
        assert os.path.getsize(logins) == size
    latest = ipaddress.IPv4Address(0x0A000000 + 19_999)
    for _ in range(4):
        assert result(fail(latest)) is None
    with pytest.raises(TooManyRequests):
        result(fail(latest))


# -- no user names by timing -------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (ALICE, "wrong"),
        (ALICE, PASSWORD),
        ("mallory", "wrong"),
        ("bob", "anything"),  # an entry that is not bcrypt: ignored
        ("", "wrong"),
        (ALICE, PASSWORD + "x" * 80),
        ("mallory", "x" * 200),
        ("é" * 40, "wrong"),
    ],
)
def test_every_login_costs_one_bcrypt_check_of_the_users_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, password: str
) -> None:
    """
    bcrypt ran only for users that exist (2.45 ms against 0.83 ms at cost
    4; 50-250 ms at real costs), so a stopwatch told which user names
    exist.  An unknown user, an ignored entry, an empty name and an
    over-long password each cost one bcrypt check in the thread pool, as
    a known user does, against a hash of the same cost as the users'.
    """
    checked: list[bytes] = []
    real = bcrypt.checkpw

    def checkpw(secret: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return bool(real(secret, hashed))

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    in_thread: list[Any] = []

    def run_in_thread(work: Any) -> Deferred[Any]:
        in_thread.append(work)
        return maybeDeferred(work)

    gate = Gate(access_for(tmp_path), Clock(), run_in_thread)
    outcome = logged_in(gate, "192.0.2.1", user, password)
    assert outcome == (ALICE if (user, password) == (ALICE, PASSWORD) else None)
    assert len(in_thread) == 1 and len(checked) == 1
    (hashed,) = checked
    assert hashed[3:7] == b"$04$"  # the cost of alice's hash


def test_the_stand_in_hash_takes_the_cost_most_users_have(tmp_path: Path) -> None:
    """With users at cost 5 and one at cost 4, an unknown user is checked
    against a cost 5 hash: the cost the most users have."""
    path = tmp_path / "users.htpasswd"
    lines = [
        f"u{n}:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=5)).decode()}"
        for n in range(2)
    ]
    lines.append(f"v:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}")
    path.write_text("\n".join(lines) + "\n")
    htpasswd = Htpasswd(str(path))
    assert htpasswd.hash_for("nobody") is None
    stand_in = htpasswd.stand_in()
    assert stand_in[:7] == b"$2b$05$"
    assert bcrypt.checkpw(b"pw", stand_in) is False


# -- the Host a challenge names ---------------------------------------------------

#: Host values that are no ``host[:port]`` (RFC 3986 reg-name, IPv4 or
#: [IPv6], then an optional port)
BAD_HOSTS = [
    'mirror.test",realm="http://evil.example',
    'mirror.test"',
    "mirror.test\\",
    "mirror test",
    "mirror.test/path",
    "mirror.test/token?x=",
    "mirror.test?x",
    "mirror.test#x",
    "user@mirror.test",
    "mirror.test:",
    "mirror.test:http",
    "mirror.test:123456",
    "mirror.test:65536",
    "mirror.test:80:80",
    ":80",
    "",
    "2001:db8::1",
    "[2001:db8::1",
    "[2001:db8::zz]",
    "[mirror.test]",
    "[2001:db8::1]x",
    "<script>",
    "a" * 300,
]
GOOD_HOSTS = [
    "mirror.test",
    "MIRROR.Test:5000",
    "127.0.0.1",
    "127.0.0.1:80",
    "[::1]",
    "[2001:db8::1]:5000",
    "under_score.test",
    "xn--bcher-kva.example",
    "localhost:65535",
]


@pytest.mark.parametrize("host", BAD_HOSTS)
@pytest.mark.parametrize("anonymous", ["none", "any"])
def test_a_host_that_is_not_host_and_port_is_refused_first(
    tmp_path: Path, host: str, anonymous: str
) -> None:
    """
    The ``Host`` header went into the challenge's realm as sent: a ``"``
    added parameters to ``WWW-Authenticate``, spaces and paths were echoed.
    A Host that is no ``host[:port]`` is 400 before anything else, at the
    API root, on a pull (open or closed) and at ``/token``, with no
    challenge; nothing is asked upstream.
    """
    harness, origin = guarded(tmp_path, anonymous=anonymous)
    for path in (
        "/v2/",
        "/v2/app/manifests/latest",
        "/token?service=regmirror&scope=repository:app:pull",
    ):
        answer = harness.request(
            "GET", path, headers={"Host": host, **basic(ALICE, PASSWORD)}
        )
        assert answer.code == 400, (path, answer.code)
        assert error_code(harness, answer) == "UNSUPPORTED"
        assert answer.headers.getRawHeaders("WWW-Authenticate") is None
    assert origin.requests == []


def test_a_bad_host_is_refused_without_access_rules(mirror: Harness) -> None:
    """Without ``[access]`` the API refuses such a Host all the same."""
    answer = mirror.request("GET", "/v2/", headers={"Host": 'a"b'})
    assert answer.code == 400


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_the_realm_names_a_valid_host_as_sent(tmp_path: Path, host: str) -> None:
    """A valid Host (a name, IPv4, [IPv6], with or without a port) is named
    in the realm as the client sent it."""
    harness, _ = guarded(tmp_path)
    answer = harness.request("GET", "/v2/app/manifests/latest", headers={"Host": host})
    assert answer.code == 401
    assert challenge_of(answer)["realm"] == f"http://{host}/token"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "x-forwarded-for"),
        ("x-forwarded-for", "x-forwarded-for"),
        ("Forwarded", "forwarded"),
        ("X-Real-IP", "x-real-ip"),
    ],
)
def test_forwarded_header_setting(
    tmp_path: Path, value: str | None, expected: str
) -> None:
    """``[access] forwarded_header`` names one of three headers, in any
    case; ``x-forwarded-for`` (what the shipped nginx site sets) unless
    set."""
    line = "" if value is None else f"forwarded_header = {value}\n"
    loaded = load(_ini(tmp_path, line))
    assert loaded.access is not None
    assert loaded.access.forwarded_header == expected


@pytest.mark.parametrize(
    "value", ["x-forwarded-for forwarded", "true-client-ip", "X-Forwarded-Proto"]
)
def test_forwarded_header_setting_refuses_anything_else(
    tmp_path: Path, value: str
) -> None:
    """One header, of the three: anything else is an error naming the key."""
    with pytest.raises(ConfigError, match=r"\[access\] forwarded_header"):
        load(_ini(tmp_path, f"forwarded_header = {value}\n"))


def _ini(tmp_path: Path, access: str) -> str:
    path = tmp_path / "mirror.ini"
    path.write_text(
        "[server]\nlisten = tcp:0\n[cache]\ndirectory = data\n"
        "[upstream:hub]\nurl = https://registry-1.docker.io\n"
        "[namespace:docker.io]\nupstreams = hub\ndefault = true\n"
        f"[access]\nanonymous = none\n{access}"
    )
    return str(path)


# -- what the fresh-eyes review found ------------------------------------------


def _rewrite_users(path: Path, text: str, stamp: int) -> None:
    """Write the htpasswd file anew, with a modification time of its own
    (two writes within one clock tick of the file system look alike)."""
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))


def test_a_changed_password_forgets_every_remembered_login(tmp_path: Path) -> None:
    """
    A login verified before the htpasswd file changed was remembered for a
    minute: the old password kept working for ~60 s after alice's hash was
    replaced.  A reload forgets it, at every process (each gate reads the
    file on its own, as each worker does): the old password fails at once,
    the new one works, and bob, whose hash did not change, still logs in.
    """
    clock = Clock()
    config = access_for(tmp_path)
    assert config.htpasswd is not None
    path = Path(config.htpasswd)
    bob = bcrypt.hashpw(b"bob's", bcrypt.gensalt(rounds=4)).decode()
    alice = path.read_text().splitlines()[1]
    _rewrite_users(path, f"{alice}\nbob:{bob}\n", 10**18)
    gates = [Gate(config, clock, maybeDeferred) for _ in range(2)]
    for gate in gates:
        assert logged_in(gate, "192.0.2.1", ALICE, PASSWORD) == ALICE
        assert logged_in(gate, "192.0.2.1", "bob", "bob's") == "bob"
    new = bcrypt.hashpw(b"new one", bcrypt.gensalt(rounds=4)).decode()
    _rewrite_users(path, f"alice:{new}\nbob:{bob}\n", 10**18 + 10**9)
    clock.advance(1)
    for gate in gates:
        assert logged_in(gate, "192.0.2.1", ALICE, PASSWORD) is None
        assert logged_in(gate, "192.0.2.1", ALICE, "new one") == ALICE
        assert logged_in(gate, "192.0.2.1", "bob", "bob's") == "bob"


def test_a_removed_user_is_refused_at_once(tmp_path: Path) -> None:
    """A user removed from the file no longer logs in, remembered or not."""
    clock = Clock()
    config = access_for(tmp_path)
    assert config.htpasswd is not None
    path = Path(config.htpasswd)
    gate = Gate(config, clock, maybeDeferred)
    assert logged_in(gate, "192.0.2.1", ALICE, PASSWORD) == ALICE
    _rewrite_users(path, "# nobody\n", 10**18)
    assert logged_in(gate, "192.0.2.1", ALICE, PASSWORD) is None


def test_a_user_given_twice_is_warned_about_without_the_hash(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A user on two lines of the htpasswd file: the last line counts, as
    before, and a warning names the user and both line numbers, never the
    hash."""
    first = bcrypt.hashpw(b"one", bcrypt.gensalt(rounds=4)).decode()
    second = bcrypt.hashpw(b"two", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "users.htpasswd"
    path.write_text(f"alice:{first}\n# again\nalice:{second}\n")
    users = Htpasswd(str(path))
    assert users.hash_for("alice") == second.encode()
    warnings = [formatEvent(e) for e in logged if "given twice" in formatEvent(e)]
    assert len(warnings) == 1, [formatEvent(e) for e in logged]
    (warning,) = warnings
    assert "'alice'" in warning and "line 3" in warning and "line 1" in warning
    text = " ".join(repr(e) for e in logged)
    assert first not in text and second not in text
    assert first[7:] not in text and second[7:] not in text


@pytest.mark.parametrize(
    "credentials",
    [
        b"NOCOLON-PASSWORD-SECRET",
        b"\xff\xfeNOCOLON-PASSWORD-SECRET",
    ],
)
def test_malformed_basic_credentials_are_logged_without_their_value(
    tmp_path: Path, logged: list[LogEvent], credentials: bytes
) -> None:
    """
    ``Authorization: Basic base64("NOCOLON-PASSWORD-SECRET")``, a value
    without a colon (likely a password pasted alone), was logged verbatim
    as the user name of a failed login.  It is a failed login whose log
    line says the credentials were malformed, without their value; and
    so is one that is not UTF-8.
    """
    harness, _ = guarded(tmp_path)
    encoded = base64.b64encode(credentials).decode()
    answer = harness.request(
        "GET",
        "/v2/app/manifests/latest",
        headers={"Authorization": f"Basic {encoded}"},
    )
    assert answer.code == 401
    text = " ".join(repr(e) for e in logged) + " ".join(formatEvent(e) for e in logged)
    assert "NOCOLON" not in text and encoded not in text
    assert any("malformed" in formatEvent(e) for e in logged)


@pytest.mark.parametrize(
    ("peer", "logged_as"),
    [("::ffff:127.0.0.7", "127.0.0.7"), ("::ffff:10.1.2.3", "10.1.2.3")],
)
def test_an_ipv4_mapped_peer_is_its_ipv4_address(peer: str, logged_as: str) -> None:
    """
    A client over IPv4 on a listener bound to ``::`` is seen as
    ``::ffff:7f00:7``: it is logged, counted by the login throttle (which
    takes IPv6 clients by /64, all of IPv4 in one) and matched by access
    rules as the IPv4 address it is, as a peer and as a forwarded hop.
    """
    from twisted.internet.address import IPv6Address
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.client = IPv6Address("TCP", peer, 40000)
    found = client_address(request, ())
    assert found == ipaddress.IPv4Address(logged_as)
    proxied = DummyRequest([b""])
    proxied.client = IPv6Address("TCP", "::1", 40000)
    proxied.requestHeaders.setRawHeaders(b"x-forwarded-for", [peer.encode()])
    assert client_address(proxied, parse_networks("::1")) == found


@pytest.mark.parametrize(
    "value",
    [
        "any",
        "0.0.0.0/0",
        "::/0",
        "127.0.0.1 0.0.0.0/0",
        "::/0 10.0.0.1",
        "0.0.0.0/1 128.0.0.0/1",
        "::/1 8000::/1",
        "128.0.0.0/1 10.0.0.1 0.0.0.0/2 64.0.0.0/2",
        "0.0.0.0/1 128.0.0.0/2 192.0.0.0/2",
        "::1 ::/2 4000::/2 8000::/1",
    ],
)
def test_trusting_every_peer_is_a_configuration_error(
    tmp_path: Path, value: str
) -> None:
    """``trusted_proxies = any`` (or networks that together hold every
    IPv4 or every IPv6 address, ``0.0.0.0/1 128.0.0.0/1``) let any client
    choose its address with a forwarding header: refused, naming the
    key."""
    with pytest.raises(
        ConfigError, match=r"\[access\] trusted_proxies: .*any client"
    ) as raised:
        load(_ini(tmp_path, f"trusted_proxies = {value}\n"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("host", ["ghcr.mirror.test.", "GHCR.mirror.test.:5000"])
def test_a_host_with_a_trailing_dot_routes_as_without(
    tmp_path: Path, host: str
) -> None:
    """``Host: ghcr.mirror.test.`` names the same host as ``hosts =
    ghcr.mirror.test`` (a fully qualified name): it routes to that
    namespace, not to the default one, for a pull and for a token."""
    harness = two_namespaces(tmp_path, "any", "none")
    answer = harness.request("GET", "/v2/org/app/manifests/v1", headers={"Host": host})
    assert answer.code == 401
    assert answer.headers.getRawHeaders("OCI-Namespace") == ["ghcr.io"]
    assert challenge_of(answer)["realm"] == f"http://{host}/token"


def test_an_unknown_user_name_is_not_logged(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A user name the htpasswd file does not have may be a password typed
    in the wrong field: the failed login is logged without it; a known
    user's failed login names the user."""
    gate = Gate(access_for(tmp_path), Clock(), maybeDeferred)
    assert logged_in(gate, "192.0.2.1", "PASTED-PASSWORD-SECRET", "x") is None
    assert logged_in(gate, "192.0.2.1", ALICE, "wrong") is None
    lines = [formatEvent(e) for e in logged if "failed login" in formatEvent(e)]
    assert len(lines) == 2, lines
    assert "PASTED" not in " ".join(lines + [repr(e) for e in logged])
    assert "not in the htpasswd file" in lines[0]
    assert "'alice'" in lines[1]


@pytest.mark.parametrize(
    "value", ["0.0.0.0/1 128.0.0.0/2", "::/1 8000::/2", "0.0.0.0/1 8000::/1"]
)
def test_trusting_less_than_every_address_of_a_family_is_taken(
    tmp_path: Path, value: str
) -> None:
    """Networks that leave some addresses of each family out are a (wide)
    list of proxies, not every peer: taken as written."""
    config = load(_ini(tmp_path, f"trusted_proxies = {value}\n"))
    assert config.access is not None
    assert len(config.access.trusted_proxies) == len(value.split())
