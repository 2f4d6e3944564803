"""
Upstreams that want credentials: ``docker-registry`` with htpasswd (Basic)
and with token auth (a JWT issuer run by the tests), and a fake registry
that wants a pre-issued bearer token and sends blobs to a CDN.

The first tests are controls: the servers alone, with skopeo holding the
credentials.  If they pass and a mirror test fails, the fault is the
mirror's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    RegistryTls,
    Response,
    Skopeo,
    mirror_config_upstreams,
)
from .images import MANIFEST_ACCEPT, Catalog, assert_layout_matches, sha256_digest
from .servers import (
    CertificatePair,
    FakeUpstream,
    Pki,
    TokenIssuer,
    write_htpasswd,
    write_token_signing_pair,
)

pytestmark = pytest.mark.e2e

USERNAME = "mirror-bot"
#: distinctive, so that finding it in a log file cannot be a coincidence
PASSWORD = "pw-7f3c9e1a-correct-horse"
WRONG_PASSWORD = "pw-0b5d2e88-wrong-battery"
STATIC_TOKEN = "tok-4e6a1c9b2d7f-pre-issued"

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]
StartProgram = Callable[[TokenIssuer | FakeUpstream], TokenIssuer | FakeUpstream]


def secured_mirror(
    start_mirror: StartMirror,
    name: str,
    upstream_url: str,
    options: dict[str, str],
    **kwargs: object,
) -> MirrorProcess:
    """A mirror whose only upstream is *name* at *upstream_url*."""
    return start_mirror(
        lambda port: mirror_config_upstreams(
            port, {name: {"url": upstream_url, **options}}, origin=name
        ),
        **kwargs,
    )


def get_manifest(mirror: MirrorProcess, reference: str) -> Response:
    name, _, tag = reference.partition(":")
    return mirror.request(
        "GET", f"/v2/{name}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}
    )


def assert_refused_access(response: Response) -> None:
    """The upstream's refusal reaches the client as an OCI auth error: a
    401 upstream (the mirror's credentials refused) as 502 ``UNAUTHORIZED``,
    without a challenge no client could answer; a 403 as 403 ``DENIED``."""
    expected = {502: "UNAUTHORIZED", 403: "DENIED"}
    assert response.status in expected, (response.status, response.body)
    assert response.header("WWW-Authenticate") is None
    assert expected[response.status] in response.error_codes(), response.body


def assert_logged_about(mirror: MirrorProcess, upstream: str) -> None:
    """Some log line names *upstream* and says access was refused."""
    refused = re.compile(r"401|403|unauthori|denied|credential|authenticat", re.I)
    lines = [x for x in mirror.log_lines() if upstream in x and refused.search(x)]
    assert lines, mirror.log()


def assert_not_logged(mirror: MirrorProcess, *secrets: str) -> None:
    log = mirror.log()
    for secret in secrets:
        assert secret not in log, f"a secret is in the mirror's log: {secret!r}"


# -- htpasswd (Basic) ---------------------------------------------------------------


@pytest.fixture
def basic_registry(tmp_path: Path, start_registry: StartRegistry) -> RegistryProcess:
    """``docker-registry`` over the seeded images, behind bcrypt htpasswd."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", USERNAME, PASSWORD)
    return start_registry(auth={"htpasswd": {"realm": "test", "path": htpasswd}})


def test_control_htpasswd_registry_wants_the_password(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, basic_registry: RegistryProcess
) -> None:
    """skopeo with the credentials pulls from the htpasswd registry; with a
    wrong password it is refused."""
    image = catalog.small
    skopeo.pull(
        basic_registry.host,
        image.reference,
        tmp_path / "out",
        image.tag,
        extra=["--src-creds", f"{USERNAME}:{PASSWORD}"],
    )
    assert_layout_matches(tmp_path / "out", image, image.tag)
    with pytest.raises(AssertionError, match="unauthorized"):
        skopeo.pull(
            basic_registry.host,
            image.reference,
            tmp_path / "refused",
            image.tag,
            extra=["--src-creds", f"{USERNAME}:{WRONG_PASSWORD}"],
        )


@pytest.mark.parametrize("source", ["password", "password_file", "password_env"])
def test_basic_auth_upstream_pulled_with_credentials(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    basic_registry: RegistryProcess,
    start_mirror: StartMirror,
    source: str,
) -> None:
    """
    A ``Basic`` challenge is answered with ``username`` and the password,
    given inline, in a file named relative to the config (its trailing
    newline dropped) or in an environment variable; the pull yields the
    pushed digests and the password is not in the mirror's log.
    """
    options = {"username": USERNAME}
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    if source == "password":
        options["password"] = PASSWORD
    elif source == "password_file":
        options["password_file"] = "secrets/registry-password"
        files["secrets/registry-password"] = PASSWORD + "\n"
    else:
        options["password_env"] = "REGMIRROR_E2E_REGISTRY_PASSWORD"
        env["REGMIRROR_E2E_REGISTRY_PASSWORD"] = PASSWORD
    mirror = secured_mirror(
        start_mirror,
        "basic-upstream",
        basic_registry.url,
        options,
        env=env,
        files=files,
    )
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    for layer in image.layers:
        assert basic_registry.count_blob_gets(layer.digest) == 1
    assert_not_logged(mirror, PASSWORD)


def test_basic_auth_wrong_password_is_unauthorized(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    basic_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    With a wrong password the pull fails, a manifest GET through the mirror
    answers 502 ``UNAUTHORIZED`` (or 403 ``DENIED``) as OCI JSON, the log
    names the upstream, and the wrong password is in neither the log nor
    the answer.
    """
    options = {"username": USERNAME, "password": WRONG_PASSWORD}
    mirror = secured_mirror(start_mirror, "basic-upstream", basic_registry.url, options)
    image = catalog.small
    with pytest.raises(AssertionError):
        skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    response = get_manifest(mirror, image.reference)
    assert_refused_access(response)
    assert WRONG_PASSWORD.encode() not in response.body
    assert_logged_about(mirror, "basic-upstream")
    assert_not_logged(mirror, WRONG_PASSWORD)


# -- token auth ---------------------------------------------------------------------


@pytest.fixture
def token_signing(tmp_path: Path) -> CertificatePair:
    return write_token_signing_pair(tmp_path / "token-signing")


@pytest.fixture
def token_issuer(
    tmp_path: Path, token_signing: CertificatePair, start_program: StartProgram
) -> TokenIssuer:
    """The JWT issuer, accepting ``USERNAME`` / ``PASSWORD`` only."""
    issuer = TokenIssuer(tmp_path / "issuer", token_signing, USERNAME, PASSWORD)
    start_program(issuer)
    return issuer


def start_token_registry(
    start_registry: StartRegistry,
    issuer: TokenIssuer,
    signing: CertificatePair,
    realm_host: str = "127.0.0.1",
) -> RegistryProcess:
    """``docker-registry`` with token auth whose realm names *realm_host*."""
    return start_registry(
        auth={
            "token": {
                "realm": issuer.realm(realm_host),
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": signing.certificate,
            }
        }
    )


@pytest.fixture
def token_registry(
    start_registry: StartRegistry,
    token_issuer: TokenIssuer,
    token_signing: CertificatePair,
) -> RegistryProcess:
    """Token auth with the realm on the upstream's own host, 127.0.0.1."""
    return start_token_registry(start_registry, token_issuer, token_signing)


def scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def token_tails(issuer: TokenIssuer) -> list[str]:
    return [r["token_tail"] for r in issuer.token_requests() if "token_tail" in r]


def test_control_token_registry_accepts_issued_tokens(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    token_issuer: TokenIssuer,
    token_registry: RegistryProcess,
) -> None:
    """skopeo with the credentials gets a JWT the registry accepts; the
    issuer saw the credentials."""
    image = catalog.small
    skopeo.pull(
        token_registry.host,
        image.reference,
        tmp_path / "out",
        image.tag,
        extra=["--src-creds", f"{USERNAME}:{PASSWORD}"],
    )
    assert_layout_matches(tmp_path / "out", image, image.tag)
    requests = token_issuer.token_requests(scope(image.repository))
    assert requests and all(r["credentials_ok"] for r in requests), requests


def test_token_auth_pull_asks_the_realm_once_per_repository(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    token_issuer: TokenIssuer,
    token_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    A Bearer challenge is answered with a token fetched from the realm with
    the credentials (``service`` and ``repository:NAME:pull`` scope); the
    token is cached per repository: pulling two multi-blob images asks the
    realm exactly once for each.  Neither the password nor a token reaches
    the log.
    """
    options = {"username": USERNAME, "password": PASSWORD}
    mirror = secured_mirror(start_mirror, "token-upstream", token_registry.url, options)
    for image in (catalog.small, catalog.shared_one):
        destination = tmp_path / image.repository.replace("/", "_")
        skopeo.pull(mirror.host, image.reference, destination, image.tag)
        assert_layout_matches(destination, image, image.tag)
    requests = token_issuer.token_requests()
    assert requests, "the realm was never asked for a token"
    for request in requests:
        assert request["service"] == TokenIssuer.service, request
        assert request["user"] == USERNAME and request["credentials_ok"], request
    for image in (catalog.small, catalog.shared_one):
        asked = token_issuer.token_requests(scope(image.repository))
        assert len(asked) == 1, requests
    assert_not_logged(mirror, PASSWORD, *token_tails(token_issuer))


def test_token_fetched_once_for_concurrent_requests(
    catalog: Catalog,
    token_issuer: TokenIssuer,
    token_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    A burst of concurrent requests for one repository on a cold mirror
    (every manifest and blob of two tags, by digest) shares one token
    request, however the upstream's 401s interleave with it.
    """
    options = {"username": USERNAME, "password": PASSWORD}
    mirror = secured_mirror(start_mirror, "token-upstream", token_registry.url, options)
    repository = catalog.shared_one.repository
    wanted: dict[str, str] = {}
    for image in (catalog.shared_one, catalog.shared_two):
        wanted[image.root.digest] = f"/v2/{repository}/manifests/{image.root.digest}"
        for blob in image.blobs:
            wanted[blob.digest] = f"/v2/{repository}/blobs/{blob.digest}"

    def fetch(path: str) -> Response:
        return mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})

    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        responses = dict(zip(wanted, pool.map(fetch, wanted.values()), strict=True))
    for digest, response in responses.items():
        assert response.status == 200, response.body
        assert sha256_digest(response.body) == digest
    assert len(token_issuer.token_requests(scope(repository))) == 1, (
        token_issuer.records()
    )


def test_token_auth_wrong_password_is_unauthorized(
    tmp_path: Path,
    catalog: Catalog,
    token_issuer: TokenIssuer,
    token_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    When the realm refuses the credentials, a manifest GET through the
    mirror answers 502 ``UNAUTHORIZED`` (or 403 ``DENIED``); the log names
    the upstream and holds no password.
    """
    options = {"username": USERNAME, "password": WRONG_PASSWORD}
    mirror = secured_mirror(start_mirror, "token-upstream", token_registry.url, options)
    response = get_manifest(mirror, catalog.small.reference)
    assert_refused_access(response)
    requests = token_issuer.token_requests()
    assert requests and not any(r["credentials_ok"] for r in requests), requests
    assert all(r["user"] == USERNAME for r in requests), requests
    assert_logged_about(mirror, "token-upstream")
    assert_not_logged(mirror, WRONG_PASSWORD)


def test_credentials_withheld_from_a_realm_on_another_host(
    catalog: Catalog,
    token_issuer: TokenIssuer,
    token_signing: CertificatePair,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    The upstream is ``127.0.0.1`` and its challenge names a realm on
    ``localhost``: another host, so the token request is anonymous (no
    ``Authorization`` header at all), and the anonymous token is refused.
    """
    registry = start_token_registry(
        start_registry, token_issuer, token_signing, realm_host="localhost"
    )
    options = {"username": USERNAME, "password": PASSWORD}
    mirror = secured_mirror(start_mirror, "token-upstream", registry.url, options)
    response = get_manifest(mirror, catalog.small.reference)
    requests = token_issuer.token_requests()
    assert requests, "the realm was never asked for a token"
    assert not any(r["authorization"] for r in requests), requests
    assert_refused_access(response)
    assert_not_logged(mirror, PASSWORD)


def test_token_realms_lets_credentials_go_to_a_listed_host(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    token_issuer: TokenIssuer,
    token_signing: CertificatePair,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """With ``token_realms = localhost`` the realm on ``localhost`` gets
    the credentials, and the pull succeeds."""
    registry = start_token_registry(
        start_registry, token_issuer, token_signing, realm_host="localhost"
    )
    options = {
        "username": USERNAME,
        "password": PASSWORD,
        "token_realms": "localhost",
    }
    mirror = secured_mirror(start_mirror, "token-upstream", registry.url, options)
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    requests = token_issuer.token_requests()
    assert requests and all(r["credentials_ok"] for r in requests), requests
    assert_not_logged(mirror, PASSWORD, *token_tails(token_issuer))


# -- pre-issued token, blobs on a CDN -------------------------------------------------


@pytest.mark.parametrize("source", ["token", "token_file", "token_env"])
def test_static_token_sent_to_upstream_never_to_the_cdn(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    start_program: StartProgram,
    start_mirror: StartMirror,
    source: str,
) -> None:
    """
    A pre-issued ``token`` (inline, from a file, from the environment) goes
    to the upstream as ``Authorization: Bearer``; its blobs answer 307 to a
    CDN on another port, which the mirror follows without any
    ``Authorization`` header.  The token is not in the log.
    """
    image = catalog.small
    upstream = FakeUpstream(
        tmp_path / "fake",
        images=[(image.repository, small_layout)],
        token=STATIC_TOKEN,
        cdn=True,
    )
    start_program(upstream)
    options: dict[str, str] = {}
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    if source == "token":
        options["token"] = STATIC_TOKEN
    elif source == "token_file":
        options["token_file"] = "secrets/token"
        files["secrets/token"] = STATIC_TOKEN + "\n"
    else:
        options["token_env"] = "REGMIRROR_E2E_TOKEN"
        env["REGMIRROR_E2E_TOKEN"] = STATIC_TOKEN
    mirror = secured_mirror(
        start_mirror, "cdn-upstream", upstream.url, options, env=env, files=files
    )
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)

    registry_side = upstream.requests_to("registry")
    assert any(r["authorization"] == f"Bearer {STATIC_TOKEN}" for r in registry_side), (
        registry_side
    )
    cdn_side = upstream.requests_to("cdn")
    fetched = {r["path"].removeprefix("/cdn/") for r in cdn_side}
    assert fetched == {b.digest for b in image.blobs}, cdn_side
    assert all(r["authorization"] is None for r in cdn_side), cdn_side
    assert_not_logged(mirror, STATIC_TOKEN)


def test_plain_http_realm_of_an_https_upstream_is_refused(
    tmp_path: Path,
    catalog: Catalog,
    token_issuer: TokenIssuer,
    token_signing: CertificatePair,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    An https upstream (``docker-registry`` with TLS, trusted by
    ``ca_file``) whose challenge names a plain ``http://`` realm (issue 16,
    item 8): the mirror asks no token there, so neither the credentials
    nor a token travel in clear; the client gets 502/503 ``UNAVAILABLE``,
    the log names the upstream and the plain-http realm, never the
    password.
    """
    pki = Pki(tmp_path / "pki")
    server = pki.issue("registry", server=True)
    registry = start_registry(
        auth={
            "token": {
                "realm": token_issuer.realm(),
                "service": token_issuer.service,
                "issuer": token_issuer.issuer,
                "rootcertbundle": token_signing.certificate,
            }
        },
        tls=RegistryTls(server.certificate, server.key),
    )
    assert registry.url.startswith("https://")
    assert token_issuer.realm().startswith("http://")
    options = {"username": USERNAME, "password": PASSWORD, "ca_file": str(pki.ca_path)}
    mirror = secured_mirror(start_mirror, "tls-upstream", registry.url, options)
    response = get_manifest(mirror, catalog.small.reference)
    assert response.status in (502, 503), (response.status, response.body)
    assert response.error_codes() == ["UNAVAILABLE"], response.body
    assert token_issuer.token_requests() == [], "the plain http realm was asked"
    refusals = [
        line
        for line in mirror.log_lines()
        if "tls-upstream" in line and "plain http" in line
    ]
    assert refusals, mirror.log()
    assert_not_logged(mirror, PASSWORD)
