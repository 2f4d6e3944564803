"""
Upstreams reached through an outbound HTTP proxy (``proxy = http://...``):
a small proxy run by the tests that tunnels ``CONNECT 127.0.0.1:PORT`` and
forwards absolute-form requests, logging each one.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .harness import (
    LOCALHOST,
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


def through_proxy(
    proxy: ConnectProxy, url: str, *, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """GET *url* through *proxy*: a CONNECT tunnel for https (verified with
    *context*), an absolute-form request for http."""
    target = urlsplit(url)
    assert target.hostname is not None and target.port is not None
    headers = {"Accept": MANIFEST_ACCEPT}
    if target.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            LOCALHOST, proxy.port, timeout=10, context=context
        )
        connection.set_tunnel(target.hostname, target.port)
        path = target.path
    else:
        connection = http.client.HTTPConnection(LOCALHOST, proxy.port, timeout=10)
        path = url
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_control_proxy_tunnels_and_forwards_to_loopback_only(
    catalog: Catalog,
    pki: Pki,
    proxy: ConnectProxy,
    upstream: RegistryProcess,
    tls_registry: RegistryProcess,
) -> None:
    """A client through the proxy reaches an https registry (CONNECT) and an
    http one (absolute form); a target other than 127.0.0.1 is refused."""
    image = catalog.small
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    secure = through_proxy(proxy, tls_registry.url + path, context=context)
    assert secure == (200, image.root.data)
    assert through_proxy(proxy, upstream.url + path) == (200, image.root.data)
    refused = f"http://localhost:{upstream.port}/v2/"
    assert through_proxy(proxy, refused)[0] == 403
    assert [(r["method"], r["target"], r["allowed"]) for r in proxy.records()] == [
        ("CONNECT", tls_registry.host, True),
        ("GET", upstream.url + path, True),
        ("GET", refused, False),
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
