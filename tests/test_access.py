"""Who may pull: anonymous networks, trusted proxies, htpasswd users and
the mirror's own tokens, in memory."""

from __future__ import annotations

import base64
import hashlib
import hmac
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
)
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from regmirror.access import Tokens, shared_key
from regmirror.config import EVERYONE, AccessConfig, parse_networks

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
