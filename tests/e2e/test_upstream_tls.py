"""
Upstreams over HTTPS: ``docker-registry`` serving TLS with a certificate
from a test CA (and, for mutual TLS, wanting a client certificate from it).

The mirror trusts the upstream through ``ca_file``, presents
``client_cert``/``client_key``, or with ``insecure = true`` verifies
nothing and says so.  The control test checks the registry with skopeo.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    RegistryTls,
    Skopeo,
    mirror_config_namespaces,
    mirror_config_upstreams,
)
from .images import MANIFEST_ACCEPT, Catalog, assert_layout_matches
from .servers import CertificatePair, Pki

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]

UPSTREAM = "tls-upstream"
WARNING_LEVELS = ("#warn]", "#error]", "#critical]")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def server_pair(pki: Pki) -> CertificatePair:
    return pki.issue("registry", server=True)


@pytest.fixture
def client_pair(pki: Pki) -> CertificatePair:
    return pki.issue("mirror-client", server=False)


@pytest.fixture
def tls_registry(
    start_registry: StartRegistry, server_pair: CertificatePair
) -> RegistryProcess:
    """``docker-registry`` on https://127.0.0.1:PORT, certificate by the CA."""
    return start_registry(tls=RegistryTls(server_pair.certificate, server_pair.key))


@pytest.fixture
def mtls_registry(
    start_registry: StartRegistry,
    pki: Pki,
    server_pair: CertificatePair,
    client_pair: CertificatePair,
) -> RegistryProcess:
    """As ``tls_registry``, and it wants a client certificate from the CA."""
    return start_registry(
        tls=RegistryTls(
            server_pair.certificate,
            server_pair.key,
            client_cas=(pki.ca_path,),
            probe_client=(client_pair.certificate, client_pair.key),
        )
    )


def tls_mirror(
    start_mirror: StartMirror,
    registry: RegistryProcess,
    options: dict[str, str],
    files: dict[str, str] | None = None,
) -> MirrorProcess:
    assert registry.url.startswith("https://")
    return start_mirror(
        lambda port: mirror_config_upstreams(
            port, {UPSTREAM: {"url": registry.url, **options}}, origin=UPSTREAM
        ),
        files=files,
    )


def assert_unavailable(mirror: MirrorProcess, reference: str) -> None:
    """A manifest GET gets 502/503 ``UNAVAILABLE``: the upstream is unusable."""
    name, _, tag = reference.partition(":")
    response = mirror.request(
        "GET", f"/v2/{name}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}
    )
    assert response.status in (502, 503), (response.status, response.body)
    assert response.error_codes() == ["UNAVAILABLE"], response.body


def test_control_tls_registries_verified_by_the_test_ca(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    pki: Pki,
    client_pair: CertificatePair,
    tls_registry: RegistryProcess,
    mtls_registry: RegistryProcess,
) -> None:
    """skopeo verifying against the CA reads from the TLS registry, and from
    the mutual-TLS one only with the client certificate."""
    image = catalog.small
    trust = pki.skopeo_cert_dir(tmp_path / "trust")
    with_client = pki.skopeo_cert_dir(tmp_path / "with-client", client_pair)

    def inspect(registry: RegistryProcess, cert_dir: Path) -> bytes:
        return skopeo.run(
            "inspect",
            "--raw",
            "--tls-verify=true",
            "--cert-dir",
            str(cert_dir),
            f"docker://{registry.host}/{image.reference}",
        )

    assert inspect(tls_registry, trust) == image.root.data
    assert inspect(mtls_registry, with_client) == image.root.data
    with pytest.raises(AssertionError, match="certificate"):
        inspect(mtls_registry, trust)


def test_https_upstream_verified_with_ca_file(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    pki: Pki,
    tls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """``ca_file`` (relative to the config's folder) verifies the upstream's
    certificate: the pull yields the pushed digests."""
    mirror = tls_mirror(
        start_mirror,
        tls_registry,
        {"ca_file": "trust/ca.pem"},
        files={"trust/ca.pem": pki.ca_path.read_text()},
    )
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    assert tls_registry.count_blob_gets(image.layers[0].digest) == 1


def test_https_upstream_with_unknown_ca_is_unavailable(
    catalog: Catalog, tls_registry: RegistryProcess, start_mirror: StartMirror
) -> None:
    """
    Without ``ca_file`` the test CA is unknown: the certificate is refused,
    the client gets 502/503 ``UNAVAILABLE``, the log names the upstream and
    the certificate problem, and no HTTP request reached the registry.
    """
    mirror = tls_mirror(start_mirror, tls_registry, {})
    assert_unavailable(mirror, catalog.small.reference)
    about = [
        x
        for x in mirror.log_lines()
        if UPSTREAM in x and re.search("certificate", x, re.I)
    ]
    assert about, mirror.log()
    assert tls_registry.count_requests("GET", r"/v2/\S+") == 0


def test_insecure_upstream_pulled_without_verification_and_warned(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    tls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """``insecure = true`` accepts the unknown CA, and the log warns about
    it with the word "insecure"."""
    mirror = tls_mirror(start_mirror, tls_registry, {"insecure": "true"})
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    warnings = [
        x
        for x in mirror.log_lines()
        if "insecure" in x.lower() and any(level in x for level in WARNING_LEVELS)
    ]
    assert warnings, mirror.log()


def test_client_certificate_presented_for_mutual_tls(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    pki: Pki,
    client_pair: CertificatePair,
    mtls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """``client_cert`` and ``client_key`` are presented to an upstream that
    wants a client certificate: the pull succeeds."""
    mirror = tls_mirror(
        start_mirror,
        mtls_registry,
        {
            "ca_file": str(pki.ca_path),
            "client_cert": str(client_pair.certificate),
            "client_key": str(client_pair.key),
        },
    )
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)


def test_mutual_tls_upstream_without_client_certificate_is_unavailable(
    catalog: Catalog,
    pki: Pki,
    mtls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """Trusting the upstream is not enough when it wants a client
    certificate: without one the client gets 502/503 ``UNAVAILABLE``."""
    mirror = tls_mirror(start_mirror, mtls_registry, {"ca_file": str(pki.ca_path)})
    assert_unavailable(mirror, catalog.small.reference)


# -- one registry, two ways of reaching it (issue 16, item 9) -------------------


def two_ways(
    start_mirror: StartMirror,
    registry: RegistryProcess,
    first: dict[str, str],
    second: dict[str, str],
) -> MirrorProcess:
    """
    A mirror whose docker.io namespace reaches *registry* through upstream
    ``first`` and whose ghcr.io namespace reaches the same host and port
    through upstream ``second``, with other TLS settings; ghcr.io never
    answers from what docker.io fetched (``origin_unreachable = fail``).
    """
    return start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {
                "first": {"url": registry.url, **first},
                "second": {"url": registry.url, **second},
            },
            {
                "docker.io": {
                    "upstreams": "first",
                    "origin": "first",
                    "default": "true",
                },
                "ghcr.io": {
                    "upstreams": "second",
                    "origin": "second",
                    "origin_unreachable": "fail",
                },
            },
        )
    )


def manifest(mirror: MirrorProcess, prefix: str, reference: str) -> Any:
    name, _, tag = reference.partition(":")
    return mirror.request(
        "GET", f"/v2/{prefix}{name}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}
    )


def test_a_connection_opened_insecurely_is_not_used_by_a_verifying_upstream(
    catalog: Catalog, tls_registry: RegistryProcess, start_mirror: StartMirror
) -> None:
    """
    Upstream ``first`` (``insecure = true``) pulls from the TLS registry and
    leaves a persistent connection; upstream ``second``, same host and port,
    verifying against the system store (which does not know the test CA),
    must not send its request over that connection: 502/503, the
    certificate refused, and the registry never sees ``second``'s request.
    """
    mirror = two_ways(start_mirror, tls_registry, {"insecure": "true"}, {})
    assert manifest(mirror, "", catalog.small.reference).status == 200
    before = tls_registry.count_requests("GET", r"/v2/\S+/manifests/\S+")
    response = manifest(mirror, "ghcr.io/", catalog.multi.reference)
    assert response.status in (502, 503), (response.status, response.body)
    assert response.error_codes() == ["UNAVAILABLE"], response.body
    after = tls_registry.count_requests("GET", r"/v2/\S+/manifests/\S+")
    assert after == before, "the verifying upstream used the insecure connection"


def test_a_connection_with_a_client_certificate_is_not_used_without_one(
    catalog: Catalog,
    pki: Pki,
    client_pair: CertificatePair,
    mtls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    Upstream ``first`` presents a client certificate to the mutual-TLS
    registry; upstream ``second``, same host and port and CA, has none: it
    must not ride on ``first``'s authenticated connection, so it is refused
    (502/503) as it is when it is alone.
    """
    mirror = two_ways(
        start_mirror,
        mtls_registry,
        {
            "ca_file": str(pki.ca_path),
            "client_cert": str(client_pair.certificate),
            "client_key": str(client_pair.key),
        },
        {"ca_file": str(pki.ca_path)},
    )
    assert manifest(mirror, "", catalog.small.reference).status == 200
    response = manifest(mirror, "ghcr.io/", catalog.multi.reference)
    assert response.status in (502, 503), (response.status, response.body)
    assert response.error_codes() == ["UNAVAILABLE"], response.body


def _established_to(port: int) -> set[int]:
    """
    The local ports of this machine's ESTABLISHED IPv4 connections to
    127.0.0.1:*port* (the client sides: only the mirror connects there).
    """
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and remote == f"0100007F:{port:04X}":
            found.add(int(local.rsplit(":", 1)[1], 16))
    return found


def test_the_warm_path_keeps_its_connection(
    catalog: Catalog, pki: Pki, tls_registry: RegistryProcess, start_mirror: StartMirror
) -> None:
    """
    Pools per way of connecting keep connections persistent: ten tag
    look-ups in a row (``tag_ttl = 0s``: each asks the registry) over TLS
    travel on one connection, the same from the first to the last.
    """
    # Without pulling ahead: the layers a manifest names would come on
    # connections of their own.
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {UPSTREAM: {"url": tls_registry.url, "ca_file": str(pki.ca_path)}},
            origin=UPSTREAM,
        ).replace("default = true\n", "default = true\nprefetch = 0\n")
    )
    port = int(tls_registry.url.rsplit(":", 1)[1])
    seen = []
    for _ in range(10):
        assert manifest(mirror, "", catalog.small.reference).status == 200
        seen.append(_established_to(port))
    asked = sum(
        tls_registry.count_requests(method, r"/v2/\S+/manifests/\S+")
        for method in ("GET", "HEAD")
    )
    assert asked >= 10, asked
    assert len(seen[0]) == 1 and all(ports == seen[0] for ports in seen), seen
