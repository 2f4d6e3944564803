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
- client credentials never forwarded upstream;
- one namespace decision for a token and a pull: a token names the
  namespace it was issued for, whichever routing form (path prefix,
  ``?ns=``, Host, alias, default) the token request and the pull use.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

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
    stopped,
    workers_of,
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
    the same upstream (none pulling ahead), the given ``[access]`` keys,
    and *listen* endpoints beside the plain one on 127.0.0.1:*port*.
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
        # Without pulling ahead, whose requests upstream would race the
        # tests' counts of what a refused request cost.
        "[namespace:docker.io]\nupstreams = origin\ndefault = true\nprefetch = 0\n",
    ]
    for name, keys in (namespaces or {}).items():
        body = "".join(
            f"{k} = {v}\n"
            for k, v in {"upstreams": "origin", "prefetch": "0", **keys}.items()
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


def challenge(scheme_host: str, name: str, error: str | None = None) -> str:
    """The Bearer challenge of a refused pull of *name* (not routed by ``ns``)."""
    text = (
        f'Bearer realm="{scheme_host}/token",service="regmirror",'
        f'scope="repository:{name}:pull"'
    )
    return text if error is None else f'{text},error="{error}"'


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
    (127.0.0.1) the address in ``X-Forwarded-For`` decides (``Forwarded``,
    which this proxy does not set, is ignored), and a refused client is
    challenged to the mirror's token realm (https when the proxy says so).
    When 127.0.0.1 is not a trusted proxy, the same headers are ignored and
    the peer's own address is refused."""
    networks = "10.0.0.0/8 2001:db8::/32"
    name = "test/small"

    trusting = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": networks, "trusted_proxies": "127.0.0.1"},
    )
    port = trusting.port
    assert get_manifest(port, name, {"X-Forwarded-For": "10.1.2.3"}).status == 200
    assert get_manifest(port, name, {"X-Forwarded-For": "2001:db8::7"}).status == 200
    ignored = get_manifest(port, name, {"Forwarded": "for=10.4.5.6"})
    assert_denied(ignored, 401, "UNAUTHORIZED")
    forwarded_v6 = {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'}
    assert_denied(get_manifest(port, name, forwarded_v6), 401, "UNAUTHORIZED")
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
    assert other.header("WWW-Authenticate") == challenge(
        f"http://{mirror.host}", multi, "insufficient_scope"
    )

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


# -- one namespace decision for a token and a pull ----------------------------------

#: what the closed namespace answers to besides its prefix and ``ns``
GHCR_HOST, GHCR_ALIAS = "ghcr.mirror.test", "ghcr.alias.test"
#: a client address outside ``127.0.0.0/8``, as a trusted proxy says it
OUTSIDE = {"X-Forwarded-For": "192.0.2.1"}


@dataclass(frozen=True)
class Form:
    """
    One way of naming ``test/small`` of a namespace: the name in the path,
    the query string, the ``Host`` header (``None``: the listener's own
    address), and whether over the TLS listener.
    """

    namespace: str
    name: str
    query: str = ""
    host: str | None = None
    tls: bool = False

    def path(self, endpoint: str) -> str:
        return f"/v2/{self.name}/{endpoint}" + (f"?{self.query}" if self.query else "")


#: every routing form of both namespaces, near variants included
FORMS = {
    "docker.io default": Form("docker.io", "test/small"),
    "docker.io prefix": Form("docker.io", "docker.io/test/small"),
    "docker.io ns": Form("docker.io", "test/small", "ns=docker.io"),
    "ghcr.io prefix": Form("ghcr.io", "ghcr.io/test/small"),
    "ghcr.io alias": Form("ghcr.io", f"{GHCR_ALIAS}/test/small"),
    "ghcr.io ns": Form("ghcr.io", "test/small", "ns=ghcr.io"),
    "ghcr.io ns upper case": Form("ghcr.io", "test/small", "ns=GHCR.IO"),
    "ghcr.io ns alias": Form("ghcr.io", "test/small", f"ns={GHCR_ALIAS}"),
    "ghcr.io ns percent-encoded": Form("ghcr.io", "test/small", "ns=ghcr%2Eio"),
    "ghcr.io host": Form("ghcr.io", "test/small", host=GHCR_HOST),
    "ghcr.io host port case": Form("ghcr.io", "test/small", host="GHCR.MIRROR.TEST:1"),
    "ghcr.io ns tls": Form("ghcr.io", "test/small", "ns=ghcr.io", tls=True),
    "ghcr.io host tls": Form("ghcr.io", "test/small", host=GHCR_HOST, tls=True),
    "ghcr.io prefix tls": Form("ghcr.io", "ghcr.io/test/small", tls=True),
}
GHCR_FORMS = [name for name, form in FORMS.items() if form.namespace == "ghcr.io"]
DOCKER_FORMS = [name for name, form in FORMS.items() if form.namespace == "docker.io"]


@dataclass(frozen=True)
class Namespaces:
    """
    A mirror with ``[access] anonymous = 127.0.0.0/8`` (127.0.0.1 a
    trusted proxy), alice in its htpasswd file, the default namespace
    docker.io and ghcr.io with ``anonymous = none``, its Host and an
    alias, both served from one upstream; a plain and a TLS listener.
    """

    mirror: MirrorProcess
    upstream: RegistryProcess
    secure: int
    context: ssl.SSLContext
    layer: str

    def ask(
        self,
        form: Form,
        endpoint: str = "manifests/latest",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """A request of *form* for *endpoint*."""
        sent = {"Accept": MANIFEST_ACCEPT, **(headers or {})}
        if form.host is not None:
            sent["Host"] = form.host
        if form.tls:
            return request(
                self.secure, "GET", form.path(endpoint), sent, context=self.context
            )
        return request(self.mirror.port, "GET", form.path(endpoint), sent)

    def endpoints(self) -> list[str]:
        return ["manifests/latest", "tags/list", f"blobs/{self.layer}"]

    def token_at(
        self, realm: str, scope: str, headers: Mapping[str, str] | None = None
    ) -> str:
        """
        What a client does with a challenge: ask *realm* (its query kept,
        its host as the ``Host`` header, over TLS for https) for *scope*.
        """
        parts = urlsplit(realm)
        query = "&".join(
            part
            for part in (
                parts.query,
                urlencode({"service": "regmirror", "scope": scope}),
            )
            if part
        )
        sent = {"Host": parts.netloc, **(headers or {})}
        path = f"{parts.path}?{query}"
        if parts.scheme == "https":
            answer = request(self.secure, "GET", path, sent, context=self.context)
        else:
            answer = request(self.mirror.port, "GET", path, sent)
        assert answer.status == 200, (answer.status, answer.body)
        return str(answer.json()["token"])

    def statuses(
        self, names: Sequence[str], headers: Mapping[str, str]
    ) -> dict[tuple[str, str], int]:
        """The status of every endpoint of every form named."""
        return {
            (name, endpoint): self.ask(FORMS[name], endpoint, headers).status
            for name in names
            for endpoint in self.endpoints()
        }


@pytest.fixture
def namespaces(
    start_mirror: StartMirror,
    upstream: RegistryProcess,
    catalog: Catalog,
    tmp_path: Path,
) -> Namespaces:
    pki = Pki(tmp_path / "pki")
    pair = pki.issue("mirror", server=True)
    secure = free_port()
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": "127.0.0.0/8", "trusted_proxies": "127.0.0.1"},
        namespaces={
            "ghcr.io": {
                "anonymous": "none",
                "hosts": GHCR_HOST,
                "aliases": GHCR_ALIAS,
            }
        },
        listen=[
            f"ssl:{secure}:privateKey=key.pem:certKey=cert.pem:interface={LOCALHOST}"
        ],
        files={
            "key.pem": pair.key.read_bytes(),
            "cert.pem": pair.certificate.read_bytes(),
        },
    )
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    return Namespaces(mirror, upstream, secure, context, catalog.small.layers[0].digest)


def test_an_anonymous_token_for_the_open_namespace_never_opens_the_closed_one(
    namespaces: Namespaces, catalog: Catalog
) -> None:
    """
    The black-box finding: an anonymous token from
    ``/token?scope=repository:test/small:pull`` (the open default
    namespace), and alice's token for the same scope, are refused (401,
    ``insufficient_scope``) for ``test/small`` of ghcr.io (``anonymous =
    none``) by every routing form over plain HTTP and TLS (``?ns=`` in any
    case or by alias, Host with a port, prefix, alias) and every endpoint
    (manifests, tags/list, blobs), and the upstream is asked nothing for
    them; ``ns`` given twice is 400.  Each token still pulls docker.io's
    ``test/small`` from outside 127.0.0.0/8.
    """
    n = namespaces
    port = n.mirror.port
    small = catalog.small
    anonymous = request(
        port, "GET", "/token?scope=repository:test/small:pull&service=regmirror"
    )
    assert anonymous.status == 200, anonymous.body
    tokens = {
        "anonymous": str(anonymous.json()["token"]),
        "alice": str(get_token(port, ALICE, ALICE_PASSWORD, "test/small")["token"]),
    }
    for who, token in tokens.items():
        outside = {**OUTSIDE, **bearer(token)}
        served = n.ask(FORMS["docker.io default"], headers=outside)
        assert served.status == 200 and served.body == small.root.data, who
        asked = len(n.upstream.access_log())
        refused = n.statuses(GHCR_FORMS, bearer(token))
        assert refused == dict.fromkeys(refused, 401), (who, refused)
        assert len(n.upstream.access_log()) == asked, who
        answer = n.ask(FORMS["ghcr.io ns"], headers=bearer(token))
        assert_denied(answer, 401, "UNAUTHORIZED")
        assert answer.header("WWW-Authenticate") == (
            f'Bearer realm="http://{n.mirror.host}/token?ns=ghcr.io",'
            'service="regmirror",scope="repository:test/small:pull",'
            'error="insufficient_scope"'
        )
    for query in ("ns=docker.io&ns=ghcr.io", "ns=ghcr.io&ns=docker.io"):
        twice = Form("ghcr.io", "test/small", query)
        answer = n.ask(twice, headers=bearer(tokens["anonymous"]))
        assert_denied(answer, 400, "UNSUPPORTED")


@pytest.mark.parametrize("name", GHCR_FORMS + DOCKER_FORMS)
def test_the_challenge_of_each_routing_form_leads_to_a_token_for_it(
    namespaces: Namespaces, catalog: Catalog, name: str
) -> None:
    """
    A client outside every anonymous network, pulling ``test/small`` by one
    routing form, is challenged; asking the challenge's realm for its scope
    as a client does (the realm's query kept, its host as Host) gets alice
    a token that pulls through that form and every other form of the same
    namespace, and is refused (401) by every form of the other namespace;
    anonymously, it gets a token that opens nothing.
    """
    n = namespaces
    form = FORMS[name]
    first = n.ask(form, headers=OUTSIDE)
    assert_denied(first, 401, "UNAUTHORIZED")
    parameters = dict(
        re.findall(r'(\w+)="([^"]*)"', first.header("WWW-Authenticate") or "")
    )
    realm, scope = parameters["realm"], parameters["scope"]
    assert scope == f"repository:{form.name}:pull"

    token = n.token_at(realm, scope, {**OUTSIDE, **basic(ALICE, ALICE_PASSWORD)})
    served = n.ask(form, headers={**OUTSIDE, **bearer(token)})
    assert served.status == 200 and served.body == catalog.small.root.data
    own = GHCR_FORMS if form.namespace == "ghcr.io" else DOCKER_FORMS
    other = DOCKER_FORMS if form.namespace == "ghcr.io" else GHCR_FORMS
    with_token = {**OUTSIDE, **bearer(token)}
    served_all = n.statuses(own, with_token)
    assert served_all == dict.fromkeys(served_all, 200)
    refused = n.statuses(other, with_token)
    assert refused == dict.fromkeys(refused, 401)

    anonymous = n.token_at(realm, scope, OUTSIDE)
    nothing = n.statuses([name], {**OUTSIDE, **bearer(anonymous)})
    assert nothing == dict.fromkeys(nothing, 401)


# -- the one forwarding header the proxies set -----------------------------------


def raw_get(
    port: int,
    path: str,
    lines: Sequence[tuple[str, str]] = (),
    *,
    host: str | None = "mirror.test",
) -> tuple[int, list[tuple[str, str]], bytes]:
    """
    GET *path* over a raw socket, the header *lines* sent byte for byte as
    given (names in any case, a name twice on two lines, any ``Host``):
    the status, the response's header lines and its body.
    """
    head = [f"GET {path} HTTP/1.1"]
    if host is not None:
        head.append(f"Host: {host}")
    head += [f"{name}: {value}" for name, value in lines]
    data = "\r\n".join([*head, "Connection: close", "", ""]).encode("latin-1")
    raw = b""
    deadline = time.monotonic() + 10
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(data)
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            raw += chunk
    answer, _, body = raw.partition(b"\r\n\r\n")
    status, *fields = answer.decode("latin-1").split("\r\n")
    pairs = [field.split(":", 1) for field in fields]
    return int(status.split()[1]), [(n.strip(), v.strip()) for n, v in pairs], body


def header_values(fields: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [value for field, value in fields if field.lower() == name.lower()]


#: each setting's header, its name in another case, and how it names an
#: address (IPv4, IPv6) and a hop that is not one
SETTINGS = {
    "x-forwarded-for": ("X-Forwarded-For", "x-FORWARDED-for", "{}", "{}"),
    "forwarded": ("Forwarded", "FORWARDED", "for={}", 'For="[{}]:4711"'),
    "x-real-ip": ("X-Real-IP", "x-real-IP", "{}", "{}"),
}
#: a value in every header of the others' kind, claiming 10.1.2.3
CLAIMS = [
    ("X-Forwarded-For", "10.1.2.3"),
    ("Forwarded", "for=10.1.2.3"),
    ("X-Real-IP", "10.1.2.3"),
    ("X-Client-IP", "10.1.2.3"),
    ("True-Client-IP", "10.1.2.3"),
]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_each_forwarding_header_setting_believes_its_header_alone(
    start_mirror: StartMirror, upstream: RegistryProcess, setting: str
) -> None:
    """
    ``forwarded_header = <setting>``, ``anonymous = 10.0.0.0/8
    2001:db8::/32 127.0.0.1`` (127.0.0.1 is also the trusted proxy), raw
    requests: the set header decides, whatever case its name is written
    in, its right-most hop on one line or over several, IPv4 and IPv6
    forms; every other header claiming 10.1.2.3 is ignored.  A hop that is
    not an address (``unknown``, ``_hidden``, garbage) is refused: it is
    not the proxy's 127.0.0.1, which is open.
    """
    name, other_case, v4, v6 = SETTINGS[setting]
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {
            "anonymous": "10.0.0.0/8 2001:db8::/32 127.0.0.1",
            "trusted_proxies": "127.0.0.1",
            "forwarded_header": setting,
        },
    )
    outside, inside = v4.format("192.0.2.1"), v4.format("10.1.2.3")
    cases: list[tuple[list[tuple[str, str]], int]] = [
        ([], 200),
        ([(name, inside)], 200),
        ([(other_case, inside)], 200),
        ([(name, v6.format("2001:db8::7"))], 200),
        ([(name, outside)], 401),
        ([(name, v6.format("2001:db9::7"))], 401),
        ([(name, outside), (name, inside)], 200),
        ([(name, inside), (name, outside)], 401),
        ([(name, f"{outside}, {inside}")], 200),
        ([(name, f"{inside}, {outside}")], 401),
        ([(name, outside), *[c for c in CLAIMS if c[0] != name]], 401),
    ]
    for hop in ("unknown", "_hidden", "10.1.2.3.4", "0x7f000001"):
        cases.append(([(name, v4.format(hop))], 401))
        cases.append(([(name, f"{inside}, {v4.format(hop)}")], 401))
    path = "/v2/test/small/manifests/latest"
    wrong = [
        (lines, expected, status)
        for lines, expected in cases
        if (status := raw_get(mirror.port, path, lines)[0]) != expected
    ]
    assert wrong == []


# -- the Host a challenge names --------------------------------------------------

#: Host values that are no ``host[:port]``, including the realm injection
BAD_HOSTS = [
    f'{LOCALHOST}",realm="http://evil.example',
    f'{LOCALHOST}"',
    "mirror test",
    "mirror.test/other",
    "mirror.test:port",
    "mirror.test:99999",
    "user@mirror.test",
    "[::1",
    "::1",
    "",
]
GOOD_HOSTS = ["mirror.test", "MIRROR.test:5000", "[::1]:5000", "127.0.0.1"]


def test_a_host_that_is_not_host_and_port_is_refused_and_never_echoed(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """
    Raw requests (HTTP libraries refuse to send such a Host): a ``Host``
    that is no ``host[:port]`` is 400 with an OCI body and no challenge at
    the API root, on a pull and at ``/token``, so that a ``"`` never adds
    parameters to ``WWW-Authenticate``; a valid one is named in the realm
    as sent.  Nothing reaches the upstream.
    """
    mirror = users_mirror(start_mirror, {"url": upstream.url})
    asked = len(upstream.access_log())
    paths = ["/v2/", "/v2/test/small/manifests/latest", "/token?scope=x"]
    for host in BAD_HOSTS:
        for path in paths:
            status, fields, body = raw_get(mirror.port, path, host=host)
            assert status == 400, (host, path, status)
            assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
            assert header_values(fields, "WWW-Authenticate") == [], (host, path)
    for host in GOOD_HOSTS:
        status, fields, _ = raw_get(
            mirror.port, "/v2/test/small/manifests/latest", host=host
        )
        assert status == 401
        assert header_values(fields, "WWW-Authenticate") == [
            challenge(f"http://{host}", "test/small")
        ]
    assert len(upstream.access_log()) == asked


# -- failed logins across worker processes ---------------------------------------


def test_failed_logins_are_throttled_across_workers(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """
    With ``workers = 2`` each process counted its own failed logins: ten
    wrong passwords got through in a minute.  Now three failures at the
    parent (the worker stopped) and two at the worker (the parent stopped)
    make the sixth attempt 429 at either process, with the right password
    too; and ten wrong passwords on new connections, whichever process
    takes each, are five 401s, then 429s.
    """
    mirror = start_mirror(
        lambda port: access_config(
            port,
            {"url": upstream.url},
            {
                "anonymous": "none",
                "htpasswd": "users.htpasswd",
                "trusted_proxies": "127.0.0.1",
            },
        ).replace("[server]\n", "[server]\nworkers = 2\n"),
        files={"users.htpasswd": htpasswd_line(ALICE, ALICE_PASSWORD)},
    )
    poll_until(
        lambda: len(workers_of(mirror)) == 1,
        timeout=15,
        describe=lambda: "no worker process",
    )
    (worker,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {worker} serving", timeout=15)
    assert mirror._process is not None
    parent = mirror._process.pid
    name = catalog.small.repository

    def attempt(password: str, address: str = "192.0.2.1") -> int:
        headers = {"X-Forwarded-For": address, **basic(ALICE, password)}
        return get_manifest(mirror.port, name, headers).status

    with stopped(worker):
        assert [attempt(f"{WRONG_PASSWORD}-{n}") for n in range(3)] == [401] * 3
    with stopped(parent):
        assert [attempt(f"{WRONG_PASSWORD}-{n}") for n in range(2)] == [401] * 2
        assert attempt(ALICE_PASSWORD) == 429
    with stopped(worker):
        assert attempt(ALICE_PASSWORD) == 429
        assert attempt(ALICE_PASSWORD, "192.0.2.2") == 200

    statuses = [attempt(f"{WRONG_PASSWORD}-{n}", "192.0.2.3") for n in range(10)]
    assert statuses == [401] * 5 + [429] * 5
    assert_not_logged(mirror, ALICE_PASSWORD, WRONG_PASSWORD)


# -- what a fresh-eyes review found ------------------------------------------------


def test_a_changed_password_is_refused_at_once_by_every_worker(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """
    With ``workers = 2``, alice logs in at each process; her password is
    then changed in the htpasswd file.  A login verified before the change
    was remembered for a minute: the old password kept working.  Now the
    old password is refused at once by each process, and the new one
    works at each.
    """
    mirror = start_mirror(
        lambda port: access_config(
            port,
            {"url": upstream.url},
            {"anonymous": "none", "htpasswd": "users.htpasswd"},
        ).replace("[server]\n", "[server]\nworkers = 2\n"),
        files={"users.htpasswd": htpasswd_line(ALICE, ALICE_PASSWORD)},
    )
    poll_until(
        lambda: len(workers_of(mirror)) == 1,
        timeout=15,
        describe=lambda: "no worker process",
    )
    (worker,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {worker} serving", timeout=15)
    assert mirror._process is not None
    parent = mirror._process.pid
    name = catalog.small.repository

    def pull(password: str) -> int:
        return get_manifest(mirror.port, name, basic(ALICE, password)).status

    for pid in (worker, parent):
        with stopped(pid):
            assert pull(ALICE_PASSWORD) == 200
    new_password = "pw-alice-new-0b7e4f29-lantern"
    (mirror.workdir / "users.htpasswd").write_text(htpasswd_line(ALICE, new_password))
    for pid in (worker, parent):
        with stopped(pid):
            assert pull(ALICE_PASSWORD) == 401
            assert pull(new_password) == 200
    assert_not_logged(mirror, ALICE_PASSWORD, new_password)


def test_a_request_without_host_or_without_credentials(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """
    An HTTP/1.1 request without ``Host`` was challenged with a
    ``localhost`` realm: it is 400 (RFC 9112 3.2), at the API root, on a
    pull and at ``/token``, with no challenge.  A pull of a closed
    namespace without credentials is 401 with a challenge saying
    "credentials required"; so is one with the anonymous token a client
    without credentials gets from the realm (it said "the token is not
    for this repository of this namespace").
    """
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": "any"},
        namespaces={"ghcr.io": {"anonymous": "none"}},
    )
    name = "ghcr.io/test/small"
    for path in (
        "/v2/",
        f"/v2/{name}/manifests/latest",
        f"/token?service=regmirror&scope=repository:{name}:pull",
    ):
        status, fields, body = raw_get(mirror.port, path, host=None)
        assert status == 400, (path, status, body)
        assert header_values(fields, "WWW-Authenticate") == [], path
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED", body

    refused = get_manifest(mirror.port, name)
    assert_denied(refused, 401, "UNAUTHORIZED")
    assert refused.json()["errors"][0]["message"] == "credentials required"
    assert refused.header("WWW-Authenticate") == challenge(
        f"http://{mirror.host}", name
    )
    anonymous = request(
        mirror.port, "GET", f"/token?service=regmirror&scope=repository:{name}:pull"
    )
    assert anonymous.status == 200, anonymous.body
    with_token = get_manifest(mirror.port, name, bearer(str(anonymous.json()["token"])))
    assert_denied(with_token, 401, "UNAUTHORIZED")
    assert with_token.json()["errors"][0]["message"] == "credentials required"


def test_what_the_htpasswd_file_and_basic_credentials_log(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """
    ``Authorization: Basic base64("NOCOLON-PASSWORD-SECRET")`` (no colon:
    a password pasted alone) was logged as the user name of a failed
    login: the line says the credentials were malformed, without them.
    A user given twice in the htpasswd file is warned about, naming the
    user and the lines, never a hash; the last line counts.
    """
    first = htpasswd_line(ALICE, "pw-first-4c2d8e1a-anchor")
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        files={
            "users.htpasswd": first + "# again\n" + htpasswd_line(ALICE, ALICE_PASSWORD)
        },
    )
    name = catalog.small.repository
    secret = "NOCOLON-PASSWORD-SECRET"
    pasted = {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}
    assert_denied(get_manifest(mirror.port, name, pasted), 401, "UNAUTHORIZED")
    assert get_manifest(mirror.port, name, basic(ALICE, ALICE_PASSWORD)).status == 200
    mirror.wait_for_log(r"failed login from 127\.0\.0\.1: malformed Basic")
    (warning,) = mirror.wait_for_log(r"user 'alice' given twice")
    assert "line 3" in warning and "line 1" in warning, warning
    assert_not_logged(mirror, secret, first.split(":", 1)[1].strip()[7:])


def test_a_host_with_a_trailing_dot_routes_to_its_namespace(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """``Host: priv.mirror.test.`` (the fully qualified form) fell to the
    default namespace although ``hosts = priv.mirror.test``: it routes to
    that namespace, closed, as the name without the dot does."""
    mirror = users_mirror(
        start_mirror,
        {"url": upstream.url},
        {"anonymous": "any"},
        namespaces={
            "ghcr.io": {"anonymous": "none", "hosts": "priv.mirror.test"},
        },
    )
    for host in (
        "priv.mirror.test",
        "priv.mirror.test.",
        f"PRIV.mirror.test.:{mirror.port}",
    ):
        status, fields, _ = raw_get(
            mirror.port, "/v2/test/small/manifests/latest", host=host
        )
        assert status == 401, host
        assert header_values(fields, "OCI-Namespace") == ["ghcr.io"], host
    status, fields, _ = raw_get(
        mirror.port, "/v2/test/small/manifests/latest", host="other.test."
    )
    assert header_values(fields, "OCI-Namespace") == ["docker.io"]
