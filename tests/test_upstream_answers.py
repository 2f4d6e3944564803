"""
What an upstream's 2xx must be to count, in memory.

A ``HEAD`` that makes a namespace vouch for content another namespace
cached must be a registry's answer for that digest (200, the size the
mirror knows, no page, the digest when it names one): a captive portal
or an SPA fallback answering ``200`` to everything must not open a
closed namespace's content to an open one.  And an upstream answering
garbage with a 2xx is counted as failing, so that its breaker opens as it
would for 5xx answers.

The harness's docker.io asks every upstream, ghcr.io the last one only
(``origin``): content cached through docker.io is asked of ``origin``
when ghcr.io wants it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry, digest_of
from memory import LAYER, Harness, error_code, image, result
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import Request

from regmirror.config import UpstreamConfig
from regmirror.reference import OCI_MANIFEST, parse_digest
from regmirror.upstream import Upstream

Fault = Callable[[Request], "tuple[int, bytes] | None"]


def answer(
    status: int, headers: dict[str, str], *, under: str = "/v2/org/", method: str = ""
) -> Fault:
    """A fault answering requests under *under* (of *method*, if given)
    with *status* and exactly *headers* (no default Content-Type)."""

    def fault(request: Request) -> tuple[int, bytes] | None:
        if not request.path.startswith(under.encode()):
            return None
        if method and request.method != method.encode():
            return None
        request.defaultContentType = None
        for name, value in headers.items():
            request.setHeader(name, value)
        return status, b""

    return fault


def two(tmp_path: Path) -> tuple[Harness, FakeRegistry, FakeRegistry]:
    """A mirror over ``hub`` and ``origin``, whose breaker stays closed
    however many answers it refuses (each is asked, so each is checked)."""
    hub, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"hub": hub, "origin": origin},
        {"origin": {"breaker_failures": 1000}},
    )
    return harness, hub, origin


SIZE = str(len(LAYER))
OTHER = "sha256:" + "e" * 64

#: HEAD answers that are no registry's answer for the layer
NOT_A_BLOB = [
    pytest.param(200, {"Content-Type": "text/html", "Content-Length": SIZE}, id="html"),
    pytest.param(
        200,
        {
            "Content-Type": "application/xhtml+xml; charset=utf-8",
            "Content-Length": SIZE,
        },
        id="xhtml",
    ),
    pytest.param(200, {}, id="no-headers"),
    pytest.param(
        200,
        {"Content-Type": "application/octet-stream", "Content-Length": "0"},
        id="length-0",
    ),
    pytest.param(
        200,
        {"Content-Type": "application/octet-stream", "Content-Length": "1"},
        id="other-length",
    ),
    pytest.param(
        200,
        {"Content-Type": "application/octet-stream", "Docker-Content-Digest": OTHER},
        id="no-length",
    ),
    pytest.param(
        200,
        {
            "Content-Type": "application/octet-stream",
            "Content-Length": SIZE,
            "Docker-Content-Digest": OTHER,
        },
        id="other-digest",
    ),
    pytest.param(204, {"Content-Length": SIZE}, id="204"),
    pytest.param(
        206,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": "bytes 0-0/1",
            "Content-Length": "1",
        },
        id="206",
    ),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("status", "headers"), NOT_A_BLOB)
def test_a_head_that_is_no_registry_answer_for_the_blob_does_not_vouch(
    tmp_path: Path, status: int, headers: dict[str, str], method: str
) -> None:
    """
    A layer cached through docker.io; ghcr.io's upstream answers the
    confirming ``HEAD`` with a 2xx that is not a registry's answer for it
    (a page, no headers, a length that is not the layer's, another
    digest, 204, 206): ghcr.io does not vouch, its client gets 404
    ``BLOB_UNKNOWN`` (GET and HEAD), nothing is recorded, and it stays so.
    """
    harness, _, origin = two(tmp_path)
    layer = origin.add_blob(LAYER)
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{layer}")) == LAYER
    origin.fault = answer(status, headers)
    path = f"/v2/ghcr.io/org/app/blobs/{layer}"
    for _ in range(2):
        refused = harness.request(method, path)
        assert refused.code == 404
        if method == "GET":
            assert error_code(harness, refused) == "BLOB_UNKNOWN"
    assert origin.count("GET", "/v2/org/") == 0
    assert "ghcr.io" not in harness.store.vouchers(parse_digest(layer))


def test_a_registry_answer_without_a_digest_header_vouches(tmp_path: Path) -> None:
    """The answer of a CDN (200, its own Content-Type, the right length, no
    ``Docker-Content-Digest``) vouches, and the size goes to the client."""
    harness, _, origin = two(tmp_path)
    layer = origin.add_blob(LAYER)
    harness.body(harness.request("GET", f"/v2/app/blobs/{layer}"))
    origin.fault = answer(
        200, {"Content-Type": "binary/octet-stream", "Content-Length": SIZE}
    )
    served = harness.request("HEAD", f"/v2/ghcr.io/org/app/blobs/{layer}")
    assert served.code == 200
    assert served.headers.getRawHeaders("Content-Length") == [SIZE]
    assert "ghcr.io" in harness.store.vouchers(parse_digest(layer))


class PortalCDN(FakeRegistry):
    """Redirects blobs to ``/cdn/``, where a portal answers every request
    with its page."""

    def render(self, request: Request) -> Any:
        if request.path.startswith(b"/cdn/"):
            self.requests.append((request.method.decode(), request.path.decode()))
            request.setHeader("Content-Type", "text/html; charset=utf-8")
            request.setHeader("Content-Length", SIZE)
            return b""
        return super().render(request)


def test_a_head_redirected_to_a_page_does_not_vouch(tmp_path: Path) -> None:
    """The confirming ``HEAD`` is redirected (as registries send blobs to a
    CDN) and the final answer is a page: it is checked like any, and
    ghcr.io does not vouch."""
    hub, origin = FakeRegistry(), PortalCDN()
    harness = Harness(str(tmp_path / "cache"), {"hub": hub, "origin": origin})
    layer = hub.add_blob(LAYER)
    origin.blobs[layer] = LAYER
    harness.body(harness.request("GET", f"/v2/app/blobs/{layer}"))
    origin.redirect = "http://origin.test"
    refused = harness.request("GET", f"/v2/ghcr.io/org/app/blobs/{layer}")
    assert refused.code == 404
    assert origin.count("HEAD", f"/cdn/{layer}") == 1
    assert "ghcr.io" not in harness.store.vouchers(parse_digest(layer))


def test_a_head_for_a_blob_no_namespace_cached_still_needs_a_length(
    tmp_path: Path,
) -> None:
    """A HEAD through ghcr.io for a digest the mirror does not have: its
    upstream's 200 without a length, or a page, is no answer (404), not a
    size of nothing."""
    harness, _, origin = two(tmp_path)
    layer = digest_of(LAYER)
    origin.fault = answer(200, {"Content-Type": "application/octet-stream"})
    assert harness.request("HEAD", f"/v2/ghcr.io/org/app/blobs/{layer}").code == 404
    origin.fault = answer(200, {"Content-Type": "text/html", "Content-Length": "5"})
    assert harness.request("HEAD", f"/v2/ghcr.io/org/app/blobs/{layer}").code == 404


def not_a_manifest(length: int) -> list[Any]:
    right = {"Content-Type": OCI_MANIFEST, "Content-Length": str(length)}
    return [
        {"Content-Type": "text/html", "Content-Length": str(length)},
        {},
        {"Content-Type": "application/json", "Content-Length": str(length)},
        {**right, "Content-Length": "0"},
        {**right, "Content-Length": str(length + 1)},
        {**right, "Docker-Content-Digest": OTHER},
        (204, right),
        (206, {**right, "Content-Range": "bytes 0-0/1"}),
    ]


def test_a_head_that_is_no_registry_answer_for_the_manifest_does_not_vouch(
    tmp_path: Path,
) -> None:
    """
    An image pulled through docker.io; ghcr.io asks for its manifest by
    digest, and its upstream answers the ``HEAD`` with a 2xx that is no
    registry's answer for it (a page, no headers, JSON that is no manifest
    type, a length not the manifest's, another digest, 204, 206): 404
    ``MANIFEST_UNKNOWN``, and neither the manifest nor its layer (which
    the manifest would have vouched for) is served through ghcr.io.
    """
    harness, _, origin = two(tmp_path)
    content = image(origin, "library/app", "v1")
    assert harness.request("GET", "/v2/app/manifests/v1").code == 200
    harness.body(harness.request("GET", f"/v2/app/blobs/{content['layer']}"))
    manifest = parse_digest(content["manifest"])
    for case in not_a_manifest(len(content["body"])):
        status, headers = case if isinstance(case, tuple) else (200, case)
        origin.fault = answer(status, headers)
        for method in ("GET", "HEAD"):
            path = f"/v2/ghcr.io/org/app/manifests/{manifest}"
            refused = harness.request(method, path)
            assert refused.code == 404, (case, method)
        assert error_code(harness, harness.request("GET", path)) == "MANIFEST_UNKNOWN"
        layer = harness.request("GET", f"/v2/ghcr.io/org/app/blobs/{content['layer']}")
        assert layer.code == 404, case
    assert "ghcr.io" not in harness.store.vouchers(manifest)
    assert "ghcr.io" not in harness.store.vouchers(parse_digest(content["layer"]))
    assert origin.count("GET", "/v2/org/") == 0


def test_a_registry_answer_for_the_manifest_vouches(tmp_path: Path) -> None:
    """The right media type (with a parameter) and length, no digest
    header: ghcr.io vouches for the manifest and serves it."""
    harness, _, origin = two(tmp_path)
    content = image(origin, "library/app", "v1")
    harness.request("GET", "/v2/app/manifests/v1")
    origin.fault = answer(
        200,
        {
            "Content-Type": f"{OCI_MANIFEST}; charset=utf-8",
            "Content-Length": str(len(content["body"])),
        },
    )
    served = harness.request(
        "GET", f"/v2/ghcr.io/org/app/manifests/{content['manifest']}"
    )
    assert served.code == 200
    assert harness.body(served).decode() == content["body"]


# -- garbage with a 2xx counts against an upstream's health -------------------------


PAGE = b"<html><body>Welcome to the hotel network</body></html>"


def portal(request: Request) -> tuple[int, bytes]:
    """Every request answered ``200 text/html`` with a page."""
    request.setHeader("Content-Type", "text/html; charset=utf-8")
    return 200, PAGE


ENDPOINTS = {
    "blob": lambda i: f"/v2/app/blobs/sha256:{i:064x}",
    "manifest-digest": lambda i: f"/v2/app/manifests/sha256:{i:064x}",
    "manifest-tag": lambda i: f"/v2/app/manifests/v{i}",
    "tags-list": lambda i: f"/v2/app{i}/tags/list",
    "referrers": lambda i: f"/v2/app/referrers/sha256:{i:064x}",
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_an_upstream_answering_every_request_with_a_page_is_marked_down(
    tmp_path: Path, endpoint: str
) -> None:
    """
    An upstream that answers everything ``200 text/html`` (a captive
    portal): after ``breaker_failures`` (3) such answers its breaker opens
    as for 5xx answers, and of 12 requests only the first few reach it.
    """
    origin = FakeRegistry()
    origin.fault = portal
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    for i in range(12):
        got = harness.request("GET", ENDPOINTS[endpoint](i + 1))
        assert got.code >= 400
        harness.body(got)
    assert harness.upstreams["origin"].breaker.opened > 0
    assert len([p for _, p in origin.requests if p.startswith("/v2/app")]) <= 4


def test_a_page_at_v2_does_not_bring_an_upstream_marked_down_back() -> None:
    """The look at ``/v2/`` of an upstream marked down: a page (``200
    text/html``) keeps it down; a registry's answer brings it back."""
    clock, fake = Clock(), FakeRegistry()
    agent = RequestTraversalAgent(fake)
    upstream = Upstream(
        UpstreamConfig("one", "http://one.test", breaker_backoff=30.0), agent, clock
    )

    def look() -> None:
        d = Deferred.fromCoroutine(upstream.recover())
        agent.flush()
        result(d)

    upstream.breaker.failed(transport=True)
    fake.fault = portal
    clock.advance(30)
    look()
    assert fake.requests == [("GET", "/v2/")]
    assert upstream.breaker.opened == 1
    fake.fault = None
    clock.advance(30)
    look()
    assert upstream.breaker.opened == 0


def test_a_tag_head_without_a_digest_probing_an_upstream_lets_its_get_through(
    tmp_path: Path,
) -> None:
    """
    An upstream marked down whose back-off has passed: the next tag's
    ``HEAD`` is the probe, and its answer (a registry's, without
    ``Docker-Content-Digest``) lets the ``GET`` of the manifest that
    follows through, which closes the breaker; a page as that ``HEAD``
    answer counts as failing, and no ``GET`` follows it.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image(origin, "library/app", "v1")
    breaker = harness.upstreams["origin"].breaker
    breaker.failed(transport=True)
    harness.clock.advance(breaker.open_until - harness.clock.seconds())

    def no_digest(request: Request) -> tuple[int, bytes] | None:
        if request.method == b"HEAD":
            request.setHeader("Content-Type", OCI_MANIFEST)
            return 200, b""
        return None

    origin.fault = no_digest
    served = harness.request("GET", "/v2/app/manifests/v1")
    assert served.code == 200
    assert breaker.opened == 0

    origin.fault = answer(
        200, {"Content-Type": "text/html"}, under="/v2/", method="HEAD"
    )
    origin.requests.clear()
    assert harness.request("GET", "/v2/app/manifests/v2").code >= 500
    assert [m for m, _ in origin.requests] == ["HEAD"]
    assert breaker.health().failures == 1


def test_another_workers_download_is_confirmed_against_its_announced_size(
    tmp_path: Path,
) -> None:
    """
    Two worker processes on one cache folder: the first downloads a layer
    through docker.io (held halfway, its size announced); the second is
    asked for it through ghcr.io, whose upstream answers the ``HEAD`` with
    a plausible length that is not the layer's: 404, not the first's
    bytes.  With the layer's length, the second follows the download.
    """
    hub, origin = FakeRegistry(), FakeRegistry()
    layer = hub.add_blob(LAYER)
    hub.hold[layer] = 4096
    clock = Clock()
    settings = {"origin": {"breaker_failures": 1000}}
    first, second = (
        Harness(
            str(tmp_path / "cache"),
            {"hub": hub, "origin": origin},
            settings,
            clock=clock,
        )
        for _ in range(2)
    )
    downloading = first.client.get(
        f"http://mirror.test/v2/app/blobs/{layer}", unbuffered=True
    )
    first.settle()
    origin.fault = answer(
        200, {"Content-Type": "application/octet-stream", "Content-Length": "4096"}
    )
    refused = second.request("GET", f"/v2/ghcr.io/org/app/blobs/{layer}")
    assert refused.code == 404
    assert origin.count("HEAD", layer) == 1
    assert origin.count("GET", layer) == 0

    origin.fault = answer(
        200, {"Content-Type": "application/octet-stream", "Content-Length": SIZE}
    )
    following = second.client.get(
        f"http://mirror.test/v2/ghcr.io/org/app/blobs/{layer}"
    )
    second.settle()
    hub.release()
    for _ in range(10):
        first.settle()
        second.settle()
        clock.advance(1)
    assert second.body(result(following)) == LAYER
    assert first.body(result(downloading)) == LAYER
