"""
``credentials = passthrough`` against a real token-auth registry:
``docker-registry`` with ``auth: token`` and the tests' token issuer, which
grants per user per repository (alice may pull ``test/small``, bob may
not).  Alice pulls first, through the mirror, with her own credentials;
then bob, anonymous clients and a wrong password ask for the same manifest
by tag and by digest and for each blob by digest, through every routing
form: each is refused, the upstream sees bob's refused check, and no byte
of the cached blobs reaches them.  Then alice's access is revoked at the
issuer: once ``access_check_ttl`` has passed, she is refused too.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import MirrorProcess, RegistryProcess, Response, Skopeo, poll_until
from .images import MANIFEST_ACCEPT, Catalog, assert_layout_matches
from .servers import CertificatePair, TokenIssuer, write_token_signing_pair
from .test_upstream_auth import start_token_registry

pytestmark = pytest.mark.e2e

#: distinctive, so that finding one in a file cannot be a coincidence
ALICE = ("alice", "pw-alice-3b9e51d7-passthrough")
BOB = ("bob", "pw-bob-8c2f0a64-passthrough")
WRONG = ("alice", "pw-wrong-5e7d13c9-passthrough")
#: the issuer's own account (the harness needs one): used by no client here
ISSUER_ACCOUNT = ("issuer-admin", "pw-issuer-1f4a6b2e-unused")
NAMESPACE = "registry.test"
HOST = "private.mirror.test"

StartMirror = Callable[..., MirrorProcess]


def basic(pair: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(pair).encode()).decode()


def write_grants(path: Path, alice: list[str]) -> None:
    """Alice may pull *alice*; bob nothing."""
    grants = {
        ALICE[0]: {"password": ALICE[1], "repositories": alice},
        BOB[0]: {"password": BOB[1], "repositories": []},
    }
    path.write_text(json.dumps(grants))


def passthrough_config(port: int, url: str) -> str:
    return f"""\
[server]
listen = tcp:{port}:interface=127.0.0.1

[cache]
directory = cache
tag_ttl = 0s

[upstream:private]
url = {url}
connect_timeout = 2s
response_timeout = 10s
idle_timeout = 10s

[namespace:{NAMESPACE}]
upstreams = private
default = true
hosts = {HOST}
credentials = passthrough
access_check_ttl = 2s
prefetch = 0
"""


def routing_forms(repository: str, rest: str) -> list[tuple[str, dict[str, str]]]:
    """The path and headers of one request in each routing form."""
    return [
        (f"/v2/{repository}/{rest}", {}),
        (f"/v2/{NAMESPACE}/{repository}/{rest}", {}),
        (f"/v2/{repository}/{rest}?ns={NAMESPACE}", {}),
        (f"/v2/{repository}/{rest}", {"Host": HOST}),
    ]


def assert_refused(response: Response, *secret_bodies: bytes) -> None:
    assert response.status in (401, 403), (response.status, response.body[:200])
    for body in secret_bodies:
        assert body not in response.body


def test_private_images_with_the_clients_own_credentials(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_program: Callable[[TokenIssuer], TokenIssuer],
    start_registry: Callable[..., RegistryProcess],
    start_mirror: StartMirror,
) -> None:
    """
    Alice pulls cold with skopeo ``--creds``; bob (skopeo through the
    mirror's ``/token``, and raw requests with his Basic credentials in
    each routing form), anonymous clients and a wrong password get 401/403
    for the manifest by tag and digest and for every blob, never its
    bytes; the issuer saw bob's checks and granted him nothing.  Passwords
    reach no log and no file of the cache.  Revoked at the issuer, alice
    is refused once ``access_check_ttl`` has passed.
    """
    image = catalog.small
    grants = tmp_path / "grants.json"
    write_grants(grants, [image.repository])
    signing: CertificatePair = write_token_signing_pair(tmp_path / "signing")
    issuer = start_program(
        TokenIssuer(tmp_path / "issuer", signing, *ISSUER_ACCOUNT, grants)
    )
    registry = start_token_registry(start_registry, issuer, signing)
    mirror = start_mirror(lambda port: passthrough_config(port, registry.url))

    # Alice, cold, through the mirror's token flow.
    skopeo.pull(
        mirror.host,
        image.reference,
        tmp_path / "alice",
        image.tag,
        extra=["--src-creds", ":".join(ALICE)],
    )
    assert_layout_matches(tmp_path / "alice", image, image.tag)
    cached = mirror.cached_blobs()
    for blob in image.blobs:
        assert blob.digest in cached, "alice's pull did not cache the image"
    secrets = [blob.data for blob in image.blobs if len(blob.data) >= 16]

    # Bob, anonymous, a wrong password: skopeo is refused.
    for who, extra in [
        ("bob", ["--src-creds", ":".join(BOB)]),
        ("anonymous", []),
        ("wrong password", ["--src-creds", ":".join(WRONG)]),
    ]:
        with pytest.raises(AssertionError, match="(?i)unauthori|denied|authenticat"):
            skopeo.pull(
                mirror.host,
                image.reference,
                tmp_path / "refused",
                image.tag,
                extra=extra,
            )
        assert not (tmp_path / "refused" / "index.json").exists(), who

    # Bob's token from the mirror's /token carries his credentials, sealed.
    answer = mirror.request(
        "GET",
        f"/token?service=regmirror&scope=repository:{image.repository}:pull",
        {"Authorization": basic(BOB)},
    )
    assert answer.status == 200, answer.body
    bob_token = "Bearer " + answer.json()["token"]

    references = ["manifests/" + image.tag, "manifests/" + image.root.digest]
    references += ["blobs/" + blob.digest for blob in image.blobs]
    for authorization in (basic(BOB), bob_token, None):
        for rest in references:
            for path, headers in routing_forms(image.repository, rest):
                headers = {**headers, "Accept": MANIFEST_ACCEPT}
                if authorization is not None:
                    headers["Authorization"] = authorization
                for method in ("GET", "HEAD"):
                    response = mirror.request(method, path, headers)
                    assert_refused(response, *secrets)
                    if authorization is None:
                        assert response.status == 401
                        assert "Bearer" in (response.header("WWW-Authenticate") or "")

    # The upstream saw bob's checks: his credentials good, nothing granted.
    bobs = [r for r in issuer.token_requests() if r["user"] == BOB[0]]
    assert bobs and all(r["credentials_ok"] and r["granted"] == [] for r in bobs), bobs
    assert registry.count_requests("HEAD", r"/v2/test/small/(manifests|blobs)/\S+") > 0
    wrong = [
        r
        for r in issuer.token_requests()
        if r["user"] == ALICE[0] and not r["credentials_ok"]
    ]
    assert wrong, "the wrong password never reached the issuer"

    # No password in the log or the cache folder.
    log = mirror.log()
    for _, password in (ALICE, BOB, WRONG):
        assert password not in log
        for path in mirror.cache_dir.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path

    # Alice with her Basic credentials in every routing form, then revoked.
    alice = {"Authorization": basic(ALICE), "Accept": MANIFEST_ACCEPT}
    for path, headers in routing_forms(
        image.repository, "blobs/" + image.layers[0].digest
    ):
        response = mirror.request("GET", path, {**headers, **alice})
        assert response.status == 200 and response.body == image.layers[0].data
    write_grants(grants, [])
    revoked = time.monotonic()
    path = f"/v2/{image.repository}/manifests/{image.root.digest}"
    poll_until(
        lambda: mirror.request("GET", path, alice).status in (401, 403),
        timeout=15,
        describe=lambda: "alice still served after her access was revoked",
    )
    assert time.monotonic() - revoked < 2 + 10

    # A wrong password is a failed login: refused by the upstream's realm
    # five times, then the client's address waits (429), as for the
    # mirror's own users.
    statuses = []
    for rest in references:
        for path, headers in routing_forms(image.repository, rest):
            headers = {**headers, "Authorization": basic(WRONG)}
            response = mirror.request("GET", path, headers)
            assert response.status in (401, 429), response.status
            assert not any(secret in response.body for secret in secrets)
            statuses.append(response.status)
    assert 401 in statuses and statuses[-1] == 429, statuses
