"""
Who may pull, end to end: ``[access]`` of a real ``twistd regmirror`` in
front of a real ``docker-registry``, exercised with skopeo and with plain
HTTP requests.

- anonymous clients by address, narrowed per namespace, with the client's
  address taken from forwarding headers of trusted proxies only;
- htpasswd users (bcrypt, re-read when the file changes), with Basic auth
  and with the registry token flow (``skopeo login``);
- the mirror's tokens: scoped to repositories, expiring;
- an ``ssl:`` listener verified against a test CA, its challenge naming an
  https realm;
- failed logins throttled per address, passwords never logged;
- client credentials never forwarded upstream.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import bcrypt
import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Response,
    Skopeo,
    free_port,
    poll_until,
)
from .images import MANIFEST_ACCEPT, Catalog, assert_layout_matches
from .servers import FakeUpstream, Pki

pytestmark = pytest.mark.e2e

#: distinctive passwords, so that finding one in a log cannot be a coincidence
ALICE, ALICE_PASSWORD = "alice", "pw-alice-5d1e9b7c-staple"
BOB, BOB_PASSWORD = "bob", "pw-bob-2a6f0c4e-battery"
WRONG_PASSWORD = "pw-wrong-8e3b1d6a-horse"
MIRROR_USER, MIRROR_PASSWORD = "mirror-bot", "pw-upstream-7c9a2f1e-correct"
UPSTREAM_TOKEN = "tok-upstream-3f8d6b2a9e1c"

IPV6_LOCALHOST = "::1"


# -- helpers --------------------------------------------------------------------


def htpasswd_line(user: str, password: str) -> str:
    """One bcrypt htpasswd entry (cost 4: fast, still bcrypt)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}\n"


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def access_config(
    port: int,
    upstream: Mapping[str, str],
    access: Mapping[str, str],
    *,
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
    listen: Sequence[str] = (),
) -> str:
    """
    A mirror with one upstream ``origin`` (its keys, ``url`` included), the
    default namespace ``docker.io`` and any more *namespaces* served from
    the same upstream, the given ``[access]`` keys, and *listen* endpoints
    beside the plain one on 127.0.0.1:*port*.
    """
    endpoints = [f"tcp:{port}:interface={LOCALHOST}", *listen]
    upstream_keys = {
        "connect_timeout": "2s",
        "response_timeout": "10s",
        "idle_timeout": "10s",
        **upstream,
    }
    sections = [
        "[server]\nlisten = " + "\n    ".join(endpoints) + "\n",
        "[cache]\ndirectory = cache\ntag_ttl = 0s\n",
        "[upstream:origin]\n"
        + "".join(f"{k} = {v}\n" for k, v in upstream_keys.items()),
        "[namespace:docker.io]\nupstreams = origin\ndefault = true\n",
    ]
    for name, keys in (namespaces or {}).items():
        body = "".join(
            f"{k} = {v}\n" for k, v in {"upstreams": "origin", **keys}.items()
        )
        sections.append(f"[namespace:{name}]\n{body}")
    sections.append("[access]\n" + "".join(f"{k} = {v}\n" for k, v in access.items()))
    return "\n".join(sections)


def request(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    host: str = LOCALHOST,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP (or, with *context*, HTTPS) request to *host*:*port*."""
    connection: http.client.HTTPConnection
    if context is None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
    else:
        connection = http.client.HTTPSConnection(
            host, port, timeout=10, context=context
        )
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def get_manifest(
    port: int,
    name: str,
    headers: Mapping[str, str] | None = None,
    *,
    host: str = LOCALHOST,
    context: ssl.SSLContext | None = None,
) -> Response:
    """``GET /v2/NAME/manifests/latest`` accepting every manifest type."""
    return request(
        port,
        "GET",
        f"/v2/{name}/manifests/latest",
        {"Accept": MANIFEST_ACCEPT, **(headers or {})},
        host=host,
        context=context,
    )


def challenge(scheme_host: str, name: str) -> str:
    return (
        f'Bearer realm="{scheme_host}/token",service="regmirror",'
        f'scope="repository:{name}:pull"'
    )


def assert_denied(response: Response, status: int, code: str) -> None:
    assert response.status == status, (response.status, response.body)
    assert code in response.error_codes(), response.body


def get_token(
    port: int,
    user: str,
    password: str,
    *repositories: str,
    context: ssl.SSLContext | None = None,
) -> dict[str, object]:
    """A token from the mirror's ``/token`` for pulling *repositories*."""
    scopes = "".join(f"&scope=repository:{name}:pull" for name in repositories)
    response = request(
        port,
        "GET",
        f"/token?service=regmirror{scopes}",
        basic(user, password),
        context=context,
    )
    assert response.status == 200, (response.status, response.body)
    document: dict[str, object] = response.json()
    return document


def assert_not_logged(mirror: MirrorProcess, *secrets: str) -> None:
    log = mirror.log()
    for secret in secrets:
        assert secret not in log, f"a password is in the mirror's log: {secret!r}"


StartMirror = Callable[..., MirrorProcess]


def users_mirror(
    start_mirror: StartMirror,
    upstream: Mapping[str, str],
    access: Mapping[str, str] | None = None,
    *,
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
    listen: Sequence[str] = (),
    files: Mapping[str, str | bytes] | None = None,
) -> MirrorProcess:
    """
    A mirror in front of *upstream* (its keys) whose ``users.htpasswd``
    holds alice: ``[access]`` is ``anonymous = none`` with that file unless
    *access* says otherwise.
    """
    return start_mirror(
        lambda port: access_config(
            port,
            upstream,
            {"anonymous": "none", "htpasswd": "users.htpasswd", **(access or {})},
            namespaces=namespaces,
            listen=listen,
        ),
        files={"users.htpasswd": htpasswd_line(ALICE, ALICE_PASSWORD), **(files or {})},
    )


# -- anonymous clients by address ---------------------------------------------------


def test_namespace_narrows_anonymous_access_for_skopeo(
    start_mirror: StartMirror,
    upstream: RegistryProcess,
    skopeo: Skopeo,
    catalog: Catalog,
) -> None:
    """With ``anonymous = any`` and a namespace of its own ``anonymous =
    none``, skopeo inspects a docker.io image anonymously, while the other
    namespace's image is refused without credentials and served with
    ``--creds``."""
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": "any"},
        namespaces={"ghcr.io": {"anonymous": "none"}},
    )
    image = catalog.small
    assert skopeo.inspect_raw(mirror.host, image.reference) == image.root.data

    private = f"ghcr.io/{image.reference}"
    name = f"ghcr.io/{image.repository}"
    refused = get_manifest(mirror.port, name)
    assert_denied(refused, 401, "UNAUTHORIZED")
    assert refused.header("WWW-Authenticate") == challenge(
        f"http://{mirror.host}", name
    )
    with_user = get_manifest(mirror.port, name, basic(ALICE, ALICE_PASSWORD))
    assert with_user.status == 200 and with_user.body == image.root.data

    with pytest.raises(AssertionError, match="(?i)unauthorized|authentication"):
        skopeo.inspect_raw(mirror.host, private)
    # skopeo (containers/image), like Docker, sends credentials only when
    # its ping of /v2/ was challenged: this is what a real client needs.
    raw = skopeo.run(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        f"{ALICE}:{ALICE_PASSWORD}",
        f"docker://{mirror.host}/{private}",
    )
    assert raw == image.root.data


def test_anonymous_networks_through_trusted_and_untrusted_proxies(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """``anonymous = 10.0.0.0/8 2001:db8::/32``: behind a trusted proxy
    (127.0.0.1) the address in ``X-Forwarded-For`` / ``Forwarded`` decides,
    and a refused client is challenged to the mirror's token realm (https
    when the proxy says so).  When 127.0.0.1 is not a trusted proxy, the same
    headers are ignored and the peer's own address is refused."""
    networks = "10.0.0.0/8 2001:db8::/32"
    name = "test/small"

    trusting = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": networks, "trusted_proxies": "127.0.0.1"},
    )
    port = trusting.port
    assert get_manifest(port, name, {"X-Forwarded-For": "10.1.2.3"}).status == 200
    assert get_manifest(port, name, {"Forwarded": "for=10.4.5.6"}).status == 200
    forwarded_v6 = {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'}
    assert get_manifest(port, name, forwarded_v6).status == 200
    # The nearest hop that is not a trusted proxy is the client.
    chained = {"X-Forwarded-For": "10.1.2.3, 192.0.2.1"}
    assert_denied(get_manifest(port, name, chained), 401, "UNAUTHORIZED")

    outsider = get_manifest(port, name, {"X-Forwarded-For": "192.0.2.1"})
    assert_denied(outsider, 401, "UNAUTHORIZED")
    assert outsider.header("WWW-Authenticate") == challenge(
        f"http://{trusting.host}", name
    )
    assert_denied(get_manifest(port, name), 401, "UNAUTHORIZED")
    behind_tls = get_manifest(
        port,
        name,
        {
            "X-Forwarded-For": "192.0.2.1",
            "X-Forwarded-Proto": "https",
            "Host": "mirror.example",
        },
    )
    assert_denied(behind_tls, 401, "UNAUTHORIZED")
    assert behind_tls.header("WWW-Authenticate") == challenge(
        "https://mirror.example", name
    )

    distrusting = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": networks, "trusted_proxies": "192.0.2.0/24"},
    )
    port = distrusting.port
    spoofed = get_manifest(
        port, name, {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https"}
    )
    assert_denied(spoofed, 401, "UNAUTHORIZED")
    assert spoofed.header("WWW-Authenticate") == challenge(
        f"http://{distrusting.host}", name
    )
    assert_denied(
        get_manifest(port, name, {"Forwarded": "for=10.1.2.3"}), 401, "UNAUTHORIZED"
    )


def test_ipv6_client_addresses_and_denial_without_users(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """A mirror listening on 127.0.0.1 and ::1 with ``anonymous = ::1`` and
    no htpasswd serves a client connecting over ::1, and refuses one over
    127.0.0.1 with 403 DENIED and no challenge: credentials could not
    help."""
    v6_port = free_port()
    mirror = start_mirror(
        lambda port: access_config(
            port,
            {"url": upstream.url},
            {"anonymous": "::1"},
            listen=[f"tcp6:{v6_port}:interface=\\:\\:1"],
        )
    )
    name = "test/small"
    over_v6 = get_manifest(v6_port, name, host=IPV6_LOCALHOST)
    assert over_v6.status == 200, over_v6.body
    over_v4 = get_manifest(mirror.port, name)
    assert_denied(over_v4, 403, "DENIED")
    assert over_v4.header("WWW-Authenticate") is None


# -- htpasswd users -----------------------------------------------------------------


def test_htpasswd_users_with_skopeo_and_file_reloaded(
    start_mirror: StartMirror,
    upstream: RegistryProcess,
    skopeo: Skopeo,
    catalog: Catalog,
) -> None:
    """With ``anonymous = none``, skopeo with alice's credentials is served;
    with a wrong password or none it is refused.  Basic auth directly on an
    API request works too.  A user added to the htpasswd file while the
    mirror runs may pull without a restart."""
    mirror = users_mirror(start_mirror, {"url": upstream.url})
    image = catalog.small
    target = f"docker://{mirror.host}/{image.reference}"

    def inspect(*creds: str) -> bytes:
        return skopeo.run("inspect", "--raw", "--tls-verify=false", *creds, target)

    assert inspect("--creds", f"{ALICE}:{ALICE_PASSWORD}") == image.root.data
    with pytest.raises(AssertionError, match="(?i)unauthorized|authentication"):
        inspect("--creds", f"{ALICE}:{WRONG_PASSWORD}")
    with pytest.raises(AssertionError, match="(?i)unauthorized|authentication"):
        inspect()
    direct = get_manifest(mirror.port, image.repository, basic(ALICE, ALICE_PASSWORD))
    assert direct.status == 200 and direct.body == image.root.data
    assert_denied(
        get_manifest(mirror.port, image.repository, basic(BOB, BOB_PASSWORD)),
        401,
        "UNAUTHORIZED",
    )

    with (mirror.workdir / "users.htpasswd").open("a") as users:
        users.write(htpasswd_line(BOB, BOB_PASSWORD))
    assert inspect("--creds", f"{BOB}:{BOB_PASSWORD}") == image.root.data
    assert inspect("--creds", f"{ALICE}:{ALICE_PASSWORD}") == image.root.data
    assert_not_logged(mirror, ALICE_PASSWORD, BOB_PASSWORD, WRONG_PASSWORD)


# -- the token flow -------------------------------------------------------------------


def test_skopeo_login_then_pull_with_the_auth_file(
    start_mirror: StartMirror,
    upstream: RegistryProcess,
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """``skopeo login`` to the mirror (the registry token flow: /v2/
    challenges, /token issues) stores the credentials; a pull with that
    auth file copies the image bit for bit, while one without it is
    refused."""
    mirror = users_mirror(start_mirror, {"url": upstream.url})
    authfile = tmp_path / "auth.json"
    skopeo.run(
        "login",
        "--tls-verify=false",
        "--authfile",
        str(authfile),
        "--username",
        ALICE,
        "--password",
        ALICE_PASSWORD,
        mirror.host,
    )
    assert mirror.host in json.loads(authfile.read_text())["auths"]

    image = catalog.multi
    skopeo.pull(
        mirror.host,
        image.reference,
        tmp_path / "out",
        image.tag,
        all_platforms=True,
        extra=["--authfile", str(authfile)],
    )
    assert_layout_matches(tmp_path / "out", image, image.tag)
    raw = skopeo.run(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--authfile",
        str(authfile),
        f"docker://{mirror.host}/{catalog.small.reference}",
    )
    assert raw == catalog.small.root.data
    with pytest.raises(AssertionError, match="(?i)unauthorized|authentication"):
        skopeo.pull(mirror.host, image.reference, tmp_path / "refused", image.tag)
    assert_not_logged(mirror, ALICE_PASSWORD)


def test_tokens_are_scoped_and_expire(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """A token from ``/token`` (``token_ttl = 3s``) pulls the repository it
    was issued for, not another one, and no longer once it has expired;
    ``/token`` without valid credentials issues nothing."""
    mirror = users_mirror(start_mirror, {"url": upstream.url}, {"token_ttl": "3s"})
    small, multi = catalog.small.repository, catalog.multi.repository
    refused = request(
        mirror.port,
        "GET",
        f"/token?service=regmirror&scope=repository:{small}:pull",
        basic(ALICE, WRONG_PASSWORD),
    )
    assert_denied(refused, 401, "UNAUTHORIZED")

    document = get_token(mirror.port, ALICE, ALICE_PASSWORD, small)
    assert document["expires_in"] == 3
    assert document["access_token"] == document["token"]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(document["issued_at"])
    ), document
    token = str(document["token"])
    started = time.monotonic()
    fresh = get_manifest(mirror.port, small, bearer(token))
    assert fresh.status == 200 and fresh.body == catalog.small.root.data
    other = get_manifest(mirror.port, multi, bearer(token))
    assert_denied(other, 401, "UNAUTHORIZED")
    assert other.header("WWW-Authenticate") == challenge(f"http://{mirror.host}", multi)

    # Wall-clock expiry: poll (bounded) until the mirror stops honouring it.
    poll_until(
        lambda: get_manifest(mirror.port, small, bearer(token)).status == 401,
        timeout=10,
        interval=0.2,
        describe=lambda: "the token was still accepted 10s after it was issued",
    )
    assert time.monotonic() - started >= 1.0, "refused before it could expire"
    expired = get_manifest(mirror.port, small, bearer(token))
    assert_denied(expired, 401, "UNAUTHORIZED")
    renewed = get_token(mirror.port, ALICE, ALICE_PASSWORD, small)
    assert get_manifest(mirror.port, small, bearer(str(renewed["token"]))).status == 200


# -- TLS ------------------------------------------------------------------------------


def test_tls_listener_with_users(
    start_mirror: StartMirror,
    upstream: RegistryProcess,
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """Behind an ``ssl:`` listener with a certificate from a test CA, the
    challenge names an https realm, and skopeo verifying the certificate
    against the CA logs in through it and gets the image."""
    pki = Pki(tmp_path / "pki")
    pair = pki.issue("mirror", server=True)
    secure = free_port()
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        listen=[
            f"ssl:{secure}:privateKey=key.pem:certKey=cert.pem:interface={LOCALHOST}"
        ],
        files={
            "key.pem": pair.key.read_bytes(),
            "cert.pem": pair.certificate.read_bytes(),
        },
    )
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    image = catalog.small
    name = image.repository

    over_tls = get_manifest(secure, name, context=context)
    assert_denied(over_tls, 401, "UNAUTHORIZED")
    assert over_tls.header("WWW-Authenticate") == challenge(
        f"https://{LOCALHOST}:{secure}", name
    )
    plain = get_manifest(mirror.port, name)
    assert plain.header("WWW-Authenticate") == challenge(f"http://{mirror.host}", name)
    token = get_token(secure, ALICE, ALICE_PASSWORD, name, context=context)["token"]
    served = get_manifest(secure, name, bearer(str(token)), context=context)
    assert served.status == 200 and served.body == image.root.data

    certs = pki.skopeo_cert_dir(tmp_path / "certs")
    raw = skopeo.run(
        "inspect",
        "--raw",
        "--tls-verify=true",
        "--cert-dir",
        str(certs),
        "--creds",
        f"{ALICE}:{ALICE_PASSWORD}",
        f"docker://{LOCALHOST}:{secure}/{image.reference}",
    )
    assert raw == image.root.data


# -- failed logins ------------------------------------------------------------------


def test_failed_logins_are_throttled_per_address_and_never_logged(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """After five failed Basic logins from one address, the sixth attempt is
    429 TOOMANYREQUESTS even with the right password, on the API and on
    ``/token``; another address is not affected.  No password reaches the
    mirror's log."""
    mirror = users_mirror(
        start_mirror, {"url": upstream.url}, {"trusted_proxies": "127.0.0.1"}
    )
    name = catalog.small.repository
    wrong = [f"{WRONG_PASSWORD}-{n}" for n in range(5)]
    for password in wrong:
        response = get_manifest(mirror.port, name, basic(ALICE, password))
        assert_denied(response, 401, "UNAUTHORIZED")

    limited = get_manifest(mirror.port, name, basic(ALICE, ALICE_PASSWORD))
    assert_denied(limited, 429, "TOOMANYREQUESTS")
    assert limited.header("Retry-After") is not None
    token = request(
        mirror.port,
        "GET",
        f"/token?service=regmirror&scope=repository:{name}:pull",
        basic(ALICE, ALICE_PASSWORD),
    )
    assert_denied(token, 429, "TOOMANYREQUESTS")

    elsewhere = get_manifest(
        mirror.port,
        name,
        {"X-Forwarded-For": "198.51.100.7", **basic(ALICE, ALICE_PASSWORD)},
    )
    assert elsewhere.status == 200, elsewhere.body
    poll_until(
        lambda: any("failed login" in line for line in mirror.log_lines()),
        timeout=10,
        describe=lambda: f"no failed login logged:\n{mirror.log()}",
    )
    assert_not_logged(mirror, ALICE_PASSWORD, *wrong)


# -- nothing a client sends goes upstream ---------------------------------------------


def test_client_credentials_never_reach_an_htpasswd_upstream(
    start_mirror: StartMirror,
    start_registry: Callable[..., RegistryProcess],
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """The upstream ``docker-registry`` wants its own user (mirror-bot); a
    client pulling through the mirror as alice (token flow and Basic auth)
    gets the image, and the upstream only ever sees mirror-bot."""
    users = tmp_path / "upstream.htpasswd"
    users.write_text(htpasswd_line(MIRROR_USER, MIRROR_PASSWORD))
    registry = start_registry(auth={"htpasswd": {"realm": "test", "path": users}})
    mirror = users_mirror(
        start_mirror,
        {"url": registry.url, "username": MIRROR_USER, "password": MIRROR_PASSWORD},
    )
    image = catalog.small
    skopeo.pull(
        mirror.host,
        image.reference,
        tmp_path / "out",
        image.tag,
        extra=["--src-creds", f"{ALICE}:{ALICE_PASSWORD}"],
    )
    assert_layout_matches(tmp_path / "out", image, image.tag)
    other = catalog.multi
    direct = get_manifest(mirror.port, other.repository, basic(ALICE, ALICE_PASSWORD))
    assert direct.status == 200 and direct.body == other.root.data

    log = registry.log()
    assert "authorized request" in log, log
    assert ALICE not in log, log
    assert ALICE_PASSWORD not in log
    # What a wrong user or password gets logged as: never seen, only
    # the mirror's first, anonymous attempts are refused.
    assert "error authenticating user" not in log, log
    assert "authentication failure" not in log, log
    assert registry.count_requests("GET", r"/v2/test/small/manifests/\S+") >= 1
    assert_not_logged(mirror, ALICE_PASSWORD, MIRROR_PASSWORD)


def test_client_authorization_headers_are_not_forwarded(
    start_mirror: StartMirror,
    start_program: Callable[[FakeUpstream], FakeUpstream],
    small_layout: Path,
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """An upstream that records every ``Authorization`` header it receives
    sees only the mirror's own upstream token, never the client's Basic
    credentials nor the bearer token the mirror issued to the client."""
    fake = start_program(
        FakeUpstream(
            tmp_path / "fake",
            images=[(catalog.small.repository, small_layout)],
            token=UPSTREAM_TOKEN,
        )
    )
    mirror = users_mirror(start_mirror, {"url": fake.url, "token": UPSTREAM_TOKEN})
    image = catalog.small
    skopeo.pull(
        mirror.host,
        image.reference,
        tmp_path / "out",
        image.tag,
        extra=["--src-creds", f"{ALICE}:{ALICE_PASSWORD}"],
    )
    assert_layout_matches(tmp_path / "out", image, image.tag)
    direct = get_manifest(mirror.port, image.repository, basic(ALICE, ALICE_PASSWORD))
    assert direct.status == 200 and direct.body == image.root.data
    token = str(
        get_token(mirror.port, ALICE, ALICE_PASSWORD, image.repository)["token"]
    )
    # tag_ttl = 0s: every manifest by tag is asked of the upstream again.
    by_token = get_manifest(mirror.port, image.repository, bearer(token))
    assert by_token.status == 200 and by_token.body == image.root.data

    seen = {record["authorization"] for record in fake.records()}
    assert seen == {f"Bearer {UPSTREAM_TOKEN}"}, seen
