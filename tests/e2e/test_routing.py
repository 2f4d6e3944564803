"""
Routing between namespaces, end to end: one mirror serves ``docker.io``
(the default) and ``ghcr.io``, each from its own ``docker-registry``, and a
request reaches the right one by ``?ns=`` (containerd), by ``Host`` header,
by path prefix, or by default; an unconfigured registry prefix is refused
without any upstream being asked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .harness import GHCR_HOST, MirrorProcess, Response, Skopeo, TwoNamespaces
from .images import MANIFEST_ACCEPT, Catalog, Image, assert_layout_matches, ghcr_app

pytestmark = pytest.mark.e2e

#: the image only the ghcr.io upstream holds
APP = ghcr_app()


def _get_manifest(
    mirror: MirrorProcess, path: str, headers: dict[str, str] | None = None
) -> Response:
    return mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT, **(headers or {})})


def _assert_served(response: Response, namespace: str, image: Image) -> None:
    assert response.status == 200, (response.status, response.body)
    assert response.header("OCI-Namespace") == namespace
    assert response.header("Docker-Content-Digest") == image.root.digest
    assert response.body == image.root.data


def _mentions(lines: list[str], fragment: str) -> list[str]:
    return [line for line in lines if fragment in line]


def test_ghcr_namespace_by_path_prefix_ns_parameter_and_host_header(
    tmp_path: Path, skopeo: Skopeo, two_namespaces: TwoNamespaces
) -> None:
    """
    ``org/app:v1``, which only the ghcr.io upstream holds, is served with
    ``OCI-Namespace: ghcr.io`` when asked as ``/v2/ghcr.io/org/app/...``
    (a full skopeo pull), as ``/v2/org/app/...?ns=ghcr.io`` (manifest and
    blob) and as ``/v2/org/app/...`` with ``Host: ghcr.mirror.test`` (with
    and without a port); the docker.io upstream is never asked for it.
    """
    two = two_namespaces
    mirror = two.mirror
    skopeo.pull(mirror.host, f"ghcr.io/{APP.reference}", tmp_path / "prefix", "v1")
    assert_layout_matches(tmp_path / "prefix", APP, "v1")
    _assert_served(
        _get_manifest(mirror, "/v2/ghcr.io/org/app/manifests/v1"), "ghcr.io", APP
    )

    _assert_served(
        _get_manifest(mirror, "/v2/org/app/manifests/v1?ns=ghcr.io"), "ghcr.io", APP
    )
    layer = APP.layers[0]
    blob = mirror.request("GET", f"/v2/org/app/blobs/{layer.digest}?ns=ghcr.io")
    assert blob.status == 200, blob.body
    assert blob.header("OCI-Namespace") == "ghcr.io"
    assert blob.body == layer.data

    for host in (GHCR_HOST, f"{GHCR_HOST}:{mirror.port}"):
        _assert_served(
            _get_manifest(mirror, "/v2/org/app/manifests/v1", {"Host": host}),
            "ghcr.io",
            APP,
        )

    ghcr_log = "\n".join(two.ghcr_log())
    assert two.ghcr.count_requests("HEAD", "/v2/org/app/manifests/v1") >= 4, ghcr_log
    assert two.ghcr.count_blob_gets(layer.digest) == 1, ghcr_log
    assert not _mentions(two.hub_log(), "org/app"), two.hub_log()


def test_docker_io_is_the_default_namespace_for_bare_names(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, two_namespaces: TwoNamespaces
) -> None:
    """
    Names without a namespace go to docker.io: ``test/small`` as is and the
    one-word ``busybox`` as ``library/busybox``, with ``OCI-Namespace:
    docker.io``; the ghcr.io upstream sees none of it.  Control: without
    ``ns`` or ``Host``, ``org/app`` is looked up at docker.io, which does
    not have it.
    """
    two = two_namespaces
    mirror = two.mirror
    small, busybox = catalog.small, catalog.busybox
    skopeo.pull(mirror.host, small.reference, tmp_path / "small", "latest")
    assert_layout_matches(tmp_path / "small", small, "latest")
    skopeo.pull(mirror.host, "busybox:latest", tmp_path / "busybox", "latest")
    assert_layout_matches(tmp_path / "busybox", busybox, "latest")

    _assert_served(
        _get_manifest(mirror, "/v2/busybox/manifests/latest"), "docker.io", busybox
    )
    _assert_served(
        _get_manifest(mirror, "/v2/docker.io/test/small/manifests/latest"),
        "docker.io",
        small,
    )
    hub_log = "\n".join(two.hub_log())
    assert (
        two.hub.count_requests("HEAD", "/v2/library/busybox/manifests/latest") >= 2
    ), hub_log
    assert two.hub.count_requests("HEAD", "/v2/busybox/manifests/latest") == 0
    assert two.hub.count_requests("HEAD", "/v2/test/small/manifests/latest") >= 2
    assert two.ghcr_log() == []

    missing = _get_manifest(mirror, "/v2/org/app/manifests/v1")
    assert missing.status == 404, missing.body
    assert missing.header("OCI-Namespace") == "docker.io"
    assert missing.error_codes() == ["MANIFEST_UNKNOWN"]
    assert two.ghcr_log() == []


def test_unconfigured_registry_prefix_is_refused_without_asking_upstream(
    two_namespaces: TwoNamespaces,
) -> None:
    """
    ``/v2/quay.io/x/y/manifests/latest`` names a registry this mirror does
    not serve: ``404 NAME_UNKNOWN``, and neither upstream registry sees any
    request for it (the mirror is no open proxy).  Control: the same name
    under ``ghcr.io/`` is asked upstream.
    """
    two = two_namespaces
    mirror = two.mirror
    for method in ("GET", "HEAD"):
        response = mirror.request(
            method, "/v2/quay.io/x/y/manifests/latest", {"Accept": MANIFEST_ACCEPT}
        )
        assert response.status == 404, (method, response.body)
    refused = mirror.request("GET", "/v2/quay.io/x/y/manifests/latest")
    assert refused.error_codes() == ["NAME_UNKNOWN"]
    blob = mirror.request("GET", f"/v2/quay.io/x/y/blobs/{APP.layers[0].digest}")
    assert blob.status == 404
    assert blob.error_codes() == ["NAME_UNKNOWN"]
    assert not _mentions(two.hub_log(), "x/y"), two.hub_log()
    assert not _mentions(two.ghcr_log(), "x/y"), two.ghcr_log()

    control = mirror.request("GET", "/v2/ghcr.io/x/y/manifests/latest")
    assert control.status == 404
    assert control.error_codes() == ["MANIFEST_UNKNOWN"]
    asked = [x for x in two.ghcr_log() if re.search(r"/v2/x/y/manifests/latest", x)]
    assert asked, two.ghcr_log()
    assert not _mentions(two.hub_log(), "x/y"), two.hub_log()
