"""
Upstreams reached through an outbound HTTP proxy (``proxy = http://...``):
a small proxy run by the tests that tunnels ``CONNECT 127.0.0.1:PORT`` and
forwards absolute-form requests, logging each one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    RegistryTls,
    Skopeo,
    mirror_config_upstreams,
)
from .images import MANIFEST_ACCEPT, Catalog, assert_layout_matches
from .servers import ConnectProxy, Pki

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]
StartProgram = Callable[[ConnectProxy], ConnectProxy]

CURL_BINARY = "/usr/bin/curl"


@pytest.fixture
def proxy(tmp_path: Path, start_program: StartProgram) -> ConnectProxy:
    return start_program(ConnectProxy(tmp_path / "proxy"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_registry(start_registry: StartRegistry, pki: Pki) -> RegistryProcess:
    pair = pki.issue("registry", server=True)
    return start_registry(tls=RegistryTls(pair.certificate, pair.key))


def proxied_mirror(
    start_mirror: StartMirror,
    registry: RegistryProcess,
    proxy: ConnectProxy,
    **options: str,
) -> MirrorProcess:
    upstream = {"url": registry.url, "proxy": proxy.url, **options}
    return start_mirror(
        lambda port: mirror_config_upstreams(
            port, {"proxied": upstream}, origin="proxied"
        )
    )


def curl(*args: str) -> str:
    result = subprocess.run(
        [CURL_BINARY, "--silent", "--show-error", "--noproxy", "", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_control_proxy_tunnels_and_forwards_to_loopback_only(
    catalog: Catalog,
    pki: Pki,
    proxy: ConnectProxy,
    upstream: RegistryProcess,
    tls_registry: RegistryProcess,
) -> None:
    """curl through the proxy reaches an https registry (CONNECT) and an
    http one (absolute form); a target other than 127.0.0.1 is refused."""
    image = catalog.small
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    accept = ["--header", f"Accept: {MANIFEST_ACCEPT}"]
    secure = curl(
        "--proxy",
        proxy.url,
        "--cacert",
        str(pki.ca_path),
        *accept,
        tls_registry.url + path,
    )
    assert secure.encode() == image.root.data
    plain = curl("--proxy", proxy.url, *accept, upstream.url + path)
    assert plain.encode() == image.root.data
    refused = curl(
        "--proxy",
        proxy.url,
        "--write-out",
        "%{http_code}",
        "--output",
        "/dev/null",
        f"http://localhost:{upstream.port}/v2/",
    )
    assert refused == "403"
    assert [(r["method"], r["target"], r["allowed"]) for r in proxy.records()] == [
        ("CONNECT", tls_registry.host, True),
        ("GET", upstream.url + path, True),
        ("GET", f"http://localhost:{upstream.port}/v2/", False),
    ]


def test_https_upstream_reached_through_a_connect_tunnel(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    pki: Pki,
    proxy: ConnectProxy,
    tls_registry: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """An https upstream with ``proxy`` is reached through ``CONNECT
    127.0.0.1:PORT`` (TLS verified end to end with ``ca_file``)."""
    mirror = proxied_mirror(start_mirror, tls_registry, proxy, ca_file=str(pki.ca_path))
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    records = proxy.records()
    assert records, "nothing went through the proxy"
    assert all(
        (r["method"], r["target"], r["allowed"]) == ("CONNECT", tls_registry.host, True)
        for r in records
    ), records


def test_http_upstream_reached_with_absolute_form_requests(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    proxy: ConnectProxy,
    upstream: RegistryProcess,
    start_mirror: StartMirror,
) -> None:
    """
    An http upstream with ``proxy`` gets absolute-form requests through the
    proxy, one for each blob, and none directly: every request the registry
    logged for the image came through the proxy.
    """
    mirror = proxied_mirror(start_mirror, upstream, proxy)
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    records = proxy.records()
    prefix = f"{upstream.url}/v2/{image.repository}/"
    assert all(r["target"].startswith(prefix) and r["allowed"] for r in records), (
        records
    )
    proxied_blobs = {
        r["target"].removeprefix(prefix + "blobs/")
        for r in records
        if r["method"] == "GET" and "/blobs/" in r["target"]
    }
    assert proxied_blobs == {b.digest for b in image.blobs}, records
    reached = sum(
        upstream.count_requests(method, rf"/v2/{image.repository}/\S+")
        for method in ("GET", "HEAD")
    )
    assert reached == len(records), (upstream.access_log(), records)
