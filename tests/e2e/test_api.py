"""
The mirror's HTTP API seen by a plain HTTP client: headers, ranges, errors,
tag lists, referrers, and a TLS client knocking on the plain-HTTP port.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from urllib.parse import urlsplit

import pytest

from .harness import LOCALHOST, MirrorProcess, RegistryProcess, responds_ok
from .images import MANIFEST_ACCEPT, Blob, Catalog

pytestmark = pytest.mark.e2e

_MANIFEST_HEADERS = {"Accept": MANIFEST_ACCEPT}


def _assert_describes(headers_of: dict[str, str | None], blob: Blob) -> None:
    assert headers_of == {
        "Content-Length": str(blob.size),
        "Docker-Content-Digest": blob.digest,
        "Content-Type": blob.media_type,
    }


def test_api_version_check(mirror: MirrorProcess) -> None:
    """``GET /v2/`` answers 200 with the registry/2.0 API version header."""
    response = mirror.request("GET", "/v2/")
    assert response.status == 200
    assert response.header("Docker-Distribution-API-Version") == "registry/2.0"


def test_head_manifest_and_blob(catalog: Catalog, mirror: MirrorProcess) -> None:
    """
    HEAD on a manifest (by tag and by digest, single-arch and index) gives
    the pushed manifest's length, digest and media type and no body; HEAD
    on a blob gives its size and digest, both before and after a GET.
    """
    for image in (catalog.small, catalog.multi):
        for reference in (image.tag, image.root.digest):
            path = f"/v2/{image.repository}/manifests/{reference}"
            response = mirror.request("HEAD", path, _MANIFEST_HEADERS)
            assert response.status == 200, path
            assert response.body == b""
            headers = {
                name: response.header(name)
                for name in ("Content-Length", "Docker-Content-Digest", "Content-Type")
            }
            _assert_describes(headers, image.root)

    layer = catalog.small.layers[0]
    path = f"/v2/{catalog.small.repository}/blobs/{layer.digest}"
    for _ in ("cold", "after GET"):
        response = mirror.request("HEAD", path)
        assert response.status == 200
        assert response.body == b""
        assert response.header("Content-Length") == str(layer.size)
        assert response.header("Docker-Content-Digest") == layer.digest
        fetched = mirror.request("GET", path)
        assert fetched.status == 200
        assert fetched.body == layer.data


def test_blob_range_requests(catalog: Catalog, mirror: MirrorProcess) -> None:
    """
    ``Range: bytes=100-199`` on a blob gives 206 with the right
    ``Content-Range`` and bytes, whether or not the blob is cached yet; a
    range starting at the blob's size gives 416.
    """
    layer = catalog.big.layers[0]
    path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"

    def check_partial() -> None:
        response = mirror.request("GET", path, {"Range": "bytes=100-199"})
        assert response.status == 206
        assert response.header("Content-Range") == f"bytes 100-199/{layer.size}"
        assert response.header("Content-Length") == "100"
        assert response.body == layer.data[100:200]

    check_partial()
    full = mirror.request("GET", path)
    assert full.status == 200
    assert full.header("Docker-Content-Digest") == layer.digest
    assert full.body == layer.data
    check_partial()
    unsatisfiable = mirror.request("GET", path, {"Range": f"bytes={layer.size}-"})
    assert unsatisfiable.status == 416


def test_bad_requests_rejected_without_touching_cache_or_upstream(
    catalog: Catalog, upstream: RegistryProcess, mirror: MirrorProcess
) -> None:
    """
    Bad names give 400 NAME_INVALID, bad digests 400 DIGEST_INVALID, write
    methods 405 UNSUPPORTED, all without creating anything in the cache or
    reaching the upstream; an unknown tag gives 404 MANIFEST_UNKNOWN.
    """
    small = catalog.small
    before = mirror.cache_listing()
    requests = [
        ("GET", "/v2/Bad..Name/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2e%2e/b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/test/small/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        (
            "GET",
            "/v2/test/small/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("PUT", "/v2/test/small/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/test/small/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/test/small/blobs/uploads/some-id", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/test/small/manifests/{small.root.digest}", 405, "UNSUPPORTED"),
        (
            "DELETE",
            f"/v2/test/small/blobs/{small.layers[0].digest}",
            405,
            "UNSUPPORTED",
        ),
    ]
    failures = []
    for method, path, status, code in requests:
        response = mirror.request(method, path)
        try:
            got = (response.status, response.error_codes())
        except (ValueError, KeyError, TypeError):
            got = (response.status, [f"not an OCI error body: {response.body[:200]!r}"])
        if got != (status, [code]):
            failures.append(f"{method} {path}: expected {status} {code}, got {got}")
    assert not failures, "\n".join(failures)
    assert mirror.cache_listing() == before

    for line in upstream.access_log():
        assert not re.search(r'"(PUT|POST|PATCH|DELETE) ', line), line
        assert not re.search(r"Bad|%2e|\.\.|xyz|md5", line, re.IGNORECASE), line

    unknown = mirror.request(
        "GET", "/v2/test/small/manifests/no-such-tag", _MANIFEST_HEADERS
    )
    assert (unknown.status, unknown.error_codes()) == (404, ["MANIFEST_UNKNOWN"])


def test_tags_list_proxied(mirror: MirrorProcess) -> None:
    """``tags/list`` returns the upstream's tags for the repository."""
    response = mirror.request("GET", "/v2/test/shared/tags/list")
    assert response.status == 200
    document = response.json()
    assert document["name"] == "test/shared"
    assert sorted(document["tags"]) == ["one", "two"]


def test_tags_list_pagination(mirror: MirrorProcess) -> None:
    """
    ``tags/list?n=1`` returns at most one tag and a ``Link`` header to the
    next page of the same repository on the mirror, which returns the rest.
    """
    first = mirror.request("GET", "/v2/test/shared/tags/list?n=1")
    assert first.status == 200
    assert first.json() == {"name": "test/shared", "tags": ["one"]}
    link = first.header("Link")
    assert link is not None, dict(first.headers)
    match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link)
    assert match is not None, link
    target = urlsplit(match.group(1))
    assert target.path == "/v2/test/shared/tags/list"
    assert target.query
    second = mirror.request("GET", f"{target.path}?{target.query}")
    assert second.status == 200
    assert second.json() == {"name": "test/shared", "tags": ["two"]}


def test_referrers_without_upstream_api(
    catalog: Catalog, mirror: MirrorProcess
) -> None:
    """
    ``referrers`` answers an empty OCI index, as a registry with the API
    does, although the upstream has no referrers API nor referrers tag (see
    test_conformance for referrers that exist).
    """
    path = f"/v2/test/small/referrers/{catalog.small.root.digest}"
    response = mirror.request("GET", path)
    assert response.status == 200
    assert response.header("Content-Type") == "application/vnd.oci.image.index.v1+json"
    assert response.json()["manifests"] == []


def _client_hello() -> bytes:
    """The first flight of a real TLS handshake, as a client would send it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"
    return hello


def test_tls_handshake_on_plain_port_answered_at_once(mirror: MirrorProcess) -> None:
    """
    A TLS ClientHello sent to the plain-HTTP listener gets an HTTP 400 and a
    closed connection straight away, not a connection left hanging.
    """
    started = time.monotonic()
    with socket.create_connection((LOCALHOST, mirror.port), timeout=5.0) as sock:
        sock.sendall(_client_hello())
        reply = b""
        while chunk := sock.recv(65536):  # socket.timeout fails the test
            reply += chunk
            assert len(reply) < 1 << 20
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1."), reply[:200]
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"400", reply[:200]
    assert elapsed < 5.0
    assert responds_ok(mirror.port)
