"""
The registry API resources against fake upstream registries, in memory:
``treq.testing.StubTreq`` on both sides, a ``Clock`` for time, no sockets.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry, digest_of
from memory import LAYER, Harness, error_code, image, index_manifest, result
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent
from twisted.web.server import Site

from regmirror.http.channel import PlainHTTPFactory
from regmirror.http.health import Root
from regmirror.http.site import MirrorSite
from regmirror.reference import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from regmirror.store import Store

# -- the API root and errors ------------------------------------------------


def test_base_answers_with_api_version(mirror: Harness) -> None:
    """``GET /v2/`` is 200 with the registry/2.0 version header."""
    response = mirror.request("GET", "/v2/")
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Distribution-API-Version") == [
        "registry/2.0"
    ]


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
def test_write_methods_are_unsupported(mirror: Harness, method: str) -> None:
    """Every write method gets 405 UNSUPPORTED and never reaches upstream."""
    response = mirror.request(method, "/v2/library/app/manifests/latest")
    assert response.code == 405
    assert response.headers.getRawHeaders("Allow") == ["GET, HEAD"]
    assert error_code(mirror, response) == "UNSUPPORTED"
    assert mirror.fakes["origin"].requests == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Bad/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/%2e%2e/b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/..%2f..%2fetc/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("/v2/" + "a" * 300 + "/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/library/app/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/app/manifests/-bad-tag", 400, "TAG_INVALID"),
        ("/v2/evil.example.com/x/manifests/latest", 404, "NAME_UNKNOWN"),
        ("/v2/library/app/other/x", 404, "NOT_FOUND"),
        ("/elsewhere", 404, "NOT_FOUND"),
    ],
)
def test_bad_input_gets_an_oci_error_and_touches_nothing(
    mirror: Harness, path: str, status: int, code: str
) -> None:
    """Bad names, digests, tags and paths: the right OCI error, no upstream
    request, no file in the cache."""
    response = mirror.request("GET", path)
    assert response.code == status
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert error_code(mirror, response) == code
    assert mirror.fakes["origin"].requests == []
    assert mirror.cached_files() == []


# -- manifests --------------------------------------------------------------


def test_manifest_by_tag(mirror: Harness, origin: FakeRegistry) -> None:
    """A tag is resolved with HEAD at the origin, the manifest is served with
    exact headers, and it is fetched and stored by digest."""
    content = image(origin)
    response = mirror.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert mirror.body(response).decode() == content["body"]
    headers = response.headers
    assert headers.getRawHeaders("Content-Type") == [OCI_MANIFEST]
    assert headers.getRawHeaders("Docker-Content-Digest") == [content["manifest"]]
    assert response.length == len(content["body"])
    assert headers.getRawHeaders("OCI-Namespace") == ["docker.io"]
    assert origin.requests == [
        ("HEAD", "/v2/library/app/manifests/latest"),
        ("GET", f"/v2/library/app/manifests/{content['manifest']}"),
    ]


def test_manifest_by_digest_is_served_from_cache(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """Once cached, a manifest by digest needs no upstream at all."""
    content = image(origin)
    path = f"/v2/library/app/manifests/{content['manifest']}"
    assert mirror.request("GET", path).code == 200
    origin.requests.clear()
    origin.fault = lambda request: (500, b"down")
    response = mirror.request("HEAD", path)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Length") == [
        str(len(content["body"]))
    ]
    assert origin.requests == []


def test_tag_answer_is_reused_within_ttl(mirror: Harness, origin: FakeRegistry) -> None:
    """A burst of pulls of one tag costs one origin check per tag_ttl."""
    image(origin)
    for _ in range(3):
        assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert origin.count("HEAD", "/manifests/latest") == 1
    mirror.clock.advance(31)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    assert origin.count("HEAD", "/manifests/latest") == 2


def test_processes_sharing_the_cache_share_tag_answers(
    tmp_path: Any, origin: FakeRegistry
) -> None:
    """
    Two mirrors on one cache folder (the processes of ``workers = 2``): the
    origin's answer one of them got is the other's too while younger than
    tag_ttl, so the origin is asked once per tag_ttl on the machine.
    """
    image(origin)
    clock = Clock()
    first, second = (
        Harness(str(tmp_path / "cache"), {"origin": origin}, clock=clock)
        for _ in range(2)
    )
    path = "/v2/app/manifests/latest"
    assert first.request("GET", path).code == 200
    clock.advance(10)
    answer = second.request("GET", path)
    assert answer.code == 200
    assert answer.headers.getRawHeaders("Regmirror-Tag-Source") == ["origin"]
    assert origin.count("HEAD", "/manifests/latest") == 1
    clock.advance(21)  # 31 s after the origin's answer: tag_ttl is 30 s
    assert second.request("GET", path).code == 200
    assert origin.count("HEAD", "/manifests/latest") == 2


def test_remembered_tag_answers_are_bounded(mirror: Harness) -> None:
    """Clients choose the tags: the answers kept in memory are bounded."""
    from regmirror.pool import TagAnswer
    from regmirror.reference import Digest
    from regmirror.tags import MAX_ANSWERS

    tags = mirror.fetcher.tags
    digest = Digest.of(b"x")
    for n in range(MAX_ANSWERS + 50):
        tags._remember(("docker.io", "app", f"t{n}"), TagAnswer(digest, "o"), 0.0)
    assert len(tags._answers) == MAX_ANSWERS
    assert ("docker.io", "app", f"t{MAX_ANSWERS + 49}") in tags._answers


def test_tag_falls_back_to_cache_when_origin_is_down(
    mirror: Harness, origin: FakeRegistry, logged: list[LogEvent]
) -> None:
    """With the origin unreachable, a tag is served from the last digest the
    cache saw for it, with a warning in the log."""
    content = image(origin)
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    mirror.clock.advance(60)
    origin.fault = lambda request: (503, b"maintenance")
    response = mirror.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        content["manifest"]
    ]
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["cache"]
    assert any("origin unreachable" in (e.get("log_format") or "") for e in logged)


def test_unknown_tag_is_manifest_unknown(mirror: Harness, origin: FakeRegistry) -> None:
    """The origin's 404 for a tag is a 404 MANIFEST_UNKNOWN."""
    response = mirror.request("GET", "/v2/app/manifests/nope")
    assert response.code == 404
    assert error_code(mirror, response) == "MANIFEST_UNKNOWN"


def test_manifest_with_wrong_digest_is_refused_and_not_stored(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """An upstream manifest whose bytes do not match the digest asked for is a
    502, and nothing is stored."""
    content = image(origin)
    origin.corrupt.add(content["manifest"])
    response = mirror.request("GET", f"/v2/app/manifests/{content['manifest']}")
    assert response.code == 502
    assert error_code(mirror, response) == "UNAVAILABLE"
    assert mirror.cached_files() == []


def test_index_negotiated_down_for_old_clients(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """A client that accepts no index gets the index's linux/amd64 image."""
    amd64 = image(origin, tag=None)
    arm64 = {"manifest": digest_of(b"arm"), "body": "arm"}
    index = index_manifest([(arm64, "arm64"), (amd64, "amd64")])
    index_digest, _ = origin.add_manifest("library/app", "multi", index, OCI_INDEX)
    accept_index = mirror.request("GET", "/v2/app/manifests/multi")
    assert accept_index.headers.getRawHeaders("Docker-Content-Digest") == [index_digest]
    old = mirror.request(
        "GET",
        "/v2/app/manifests/multi",
        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
    )
    assert old.code == 200
    assert old.headers.getRawHeaders("Docker-Content-Digest") == [amd64["manifest"]]
    assert mirror.body(old).decode() == amd64["body"]


# -- blobs --------------------------------------------------------------------


def test_blob_is_streamed_cached_and_then_served_locally(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """A blob is fetched once, verified and stored; the second pull needs no
    upstream."""
    content = image(origin)
    path = f"/v2/app/blobs/{content['layer']}"
    response = mirror.request("GET", path)
    assert response.code == 200
    assert response.length == len(LAYER)
    assert mirror.body(response) == LAYER
    assert os.path.exists(mirror.store.blob_path(_digest(content["layer"])))
    origin.requests.clear()
    again = mirror.request("GET", path)
    assert mirror.body(again) == LAYER
    assert origin.requests == []


def test_blob_head_does_not_download(mirror: Harness, origin: FakeRegistry) -> None:
    """HEAD on an uncached blob asks upstream for its size, downloads nothing."""
    content = image(origin)
    response = mirror.request("HEAD", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Length") == [str(len(LAYER))]
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["layer"]]
    assert origin.count("GET", "/blobs/") == 0
    assert mirror.cached_files() == []


def test_unknown_blob(mirror: Harness) -> None:
    """A blob no upstream has is 404 BLOB_UNKNOWN."""
    response = mirror.request("GET", "/v2/app/blobs/" + digest_of(b"nothing"))
    assert response.code == 404
    assert error_code(mirror, response) == "BLOB_UNKNOWN"


@pytest.mark.parametrize("cached", [False, True])
def test_blob_range(mirror: Harness, origin: FakeRegistry, cached: bool) -> None:
    """A single Range is a 206 with Content-Range, cold or cached."""
    content = image(origin)
    path = f"/v2/app/blobs/{content['layer']}"
    if cached:
        mirror.body(mirror.request("GET", path))
    response = mirror.request("GET", path, headers={"Range": "bytes=100-199"})
    assert response.code == 206
    assert response.headers.getRawHeaders("Content-Range") == [
        f"bytes 100-199/{len(LAYER)}"
    ]
    assert mirror.body(response) == LAYER[100:200]


def test_blob_unsatisfiable_range(mirror: Harness, origin: FakeRegistry) -> None:
    """A range past the end is a 416 with ``Content-Range: bytes */size``."""
    content = image(origin)
    response = mirror.request(
        "GET",
        f"/v2/app/blobs/{content['layer']}",
        headers={"Range": f"bytes={len(LAYER)}-"},
    )
    assert response.code == 416
    assert response.headers.getRawHeaders("Content-Range") == [f"bytes */{len(LAYER)}"]


def test_corrupt_blob_breaks_the_stream_and_is_not_stored(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """Bytes that do not match the digest: the client that was streaming them
    sees its body fail (never a "complete" blob), the next client gets a 502,
    and neither the blob nor its spool remains."""
    content = image(origin)
    origin.corrupt.add(content["layer"])
    origin.hold[content["layer"]] = 4096
    response = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    received: list[bytes] = []
    d = treq.collect(response, received.append)
    mirror.settle()
    assert len(b"".join(received)) == 4095
    origin.release()
    mirror.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection, whatever its class)
        result(d)
    assert len(b"".join(received)) < len(LAYER)
    assert mirror.cached_files() == []
    del origin.hold[content["layer"]]
    again = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert again.code == 502
    assert error_code(mirror, again) == "UNAVAILABLE"
    assert mirror.cached_files() == []


def test_range_of_a_download_under_way_waits_for_the_digest(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """
    A range of a blob still downloading streams what is there, but its
    last byte waits for the digest like a whole body's: a range of wrong
    bytes ends as a broken stream, never as a complete 206; a range of
    right bytes completes once the blob is verified.
    """
    content = image(origin)
    layer = content["layer"]
    origin.corrupt.add(layer)
    origin.hold[layer] = 4096
    response = mirror.request(
        "GET", f"/v2/app/blobs/{layer}", headers={"Range": "bytes=0-99"}
    )
    assert response.code == 206
    received: list[bytes] = []
    d = treq.collect(response, received.append)
    mirror.settle()
    assert len(b"".join(received)) == 99  # all of the range but its last byte
    assert not d.called
    origin.release()
    mirror.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection, whatever its class)
        result(d)
    assert mirror.cached_files() == []

    origin.corrupt.clear()
    response = mirror.request(
        "GET", f"/v2/app/blobs/{layer}", headers={"Range": "bytes=100-199"}
    )
    d = treq.collect(response, received.append)
    mirror.settle()
    assert not d.called
    origin.release()
    mirror.settle()
    assert result(d) is None
    assert b"".join(received)[99:] == LAYER[100:200]


def _answered(d: Any) -> bool:
    """Has *d* its result (not merely fired, waiting on another Deferred)?"""
    outcome: list[Any] = []

    def seen(value: Any) -> Any:
        outcome.append(value)
        return value

    d.addBoth(seen)
    return bool(outcome)


def test_a_download_without_length_answers_ranges_and_heads_once_it_ends(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """
    While a blob whose upstream states no size (a chunked body, a HEAD
    without length) downloads, a whole GET streams at once, but a Range
    and a HEAD wait for the size, the end of the download: then the
    ranges are answered as a cached blob's (206, or 416 past the end),
    never with the whole body, and the HEAD is 200 with the length (not a
    404 because the upstream's HEAD states none).
    """
    content = image(origin)
    layer = content["layer"]
    origin.unsized.add(layer)
    origin.hold[layer] = 4096
    url = f"http://mirror.test/v2/app/blobs/{layer}"
    whole = mirror.client.get(url, unbuffered=True)
    mirror.settle()
    streaming = result(whole)
    assert streaming.code == 200
    asked = {
        value: mirror.client.get(url, headers={"Range": value})
        for value in ("bytes=-100", "bytes=100-199", f"bytes={len(LAYER)}-")
    }
    head = mirror.client.head(url)
    mirror.settle()
    assert not _answered(head)
    assert not any(_answered(d) for d in asked.values())
    origin.release()
    mirror.settle()
    assert mirror.body(streaming) == LAYER
    answers = {value: result(d) for value, d in asked.items()}
    for value, first, last in (
        ("bytes=-100", 10140, 10240),
        ("bytes=100-199", 100, 200),
    ):
        response = answers[value]
        assert response.code == 206
        assert response.headers.getRawHeaders("Content-Range") == [
            f"bytes {first}-{last - 1}/{len(LAYER)}"
        ]
        assert mirror.body(response) == LAYER[first:last]
    beyond = answers[f"bytes={len(LAYER)}-"]
    assert beyond.code == 416
    assert beyond.headers.getRawHeaders("Content-Range") == [f"bytes */{len(LAYER)}"]
    sized = result(head)
    assert sized.code == 200
    assert sized.headers.getRawHeaders("Content-Length") == [str(len(LAYER))]
    assert origin.count("GET", layer) == 1


def test_a_range_waiting_for_a_download_without_length_that_fails_is_a_502(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """A Range waiting for the end of a download without a stated size is
    answered 502 when that download fails, not left waiting."""
    content = image(origin)
    layer = content["layer"]
    origin.unsized.add(layer)
    origin.hold[layer] = 4096
    url = f"http://mirror.test/v2/app/blobs/{layer}"
    ranged = mirror.client.get(url, headers={"Range": "bytes=0-99"})
    mirror.settle()
    assert not _answered(ranged)
    origin.cut()
    mirror.settle()
    assert result(ranged).code == 502
    assert mirror.cached_files() == []


def test_concurrent_pulls_share_one_download_and_stream_early(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """Two clients of one cold blob cause one upstream GET, and both receive
    bytes before the upstream has sent the last one."""
    content = image(origin)
    origin.hold[content["layer"]] = 4096
    path = f"http://mirror.test/v2/app/blobs/{content['layer']}"
    received: list[list[bytes]] = [[], []]
    finished: list[object] = []
    for sink in received:
        d = mirror.client.get(path, unbuffered=True)
        d.addCallback(treq.collect, sink.append).addBoth(finished.append)
    mirror.settle()
    assert origin.count("GET", "/blobs/") == 1
    assert all(len(b"".join(sink)) == 4095 for sink in received)
    assert finished == []
    origin.release()
    mirror.settle()
    assert finished == [None, None]
    assert all(b"".join(sink) == LAYER for sink in received)
    assert os.path.exists(mirror.store.blob_path(_digest(content["layer"])))


def test_failover_to_the_next_upstream(tmp_path: Any) -> None:
    """A blob missing from the first upstream (404) or failing there (500)
    comes from the next one."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    content = image(origin)
    mirror_up.fault = lambda request: (
        (500, b"oops") if b"blobs" in request.path else None
    )
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert harness.body(response) == LAYER
    assert mirror_up.count("GET", "/blobs/") == 1


def test_anonymous_token_flow_and_redirect_without_credentials(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """A Bearer challenge is answered with a token from the realm, fetched
    once and reused; a blob redirect is followed without the Authorization
    header."""
    content = image(origin)
    origin.token = "t0ken"
    origin.redirect = "https://cdn.test"
    assert mirror.request("GET", "/v2/app/manifests/latest").code == 200
    response = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert mirror.body(response) == LAYER
    assert origin.count("GET", "/token") == 1
    cdn = [auth for path, auth in origin.authorizations if path.startswith("/cdn/")]
    assert cdn == [None]
    assert ("/v2/library/app/manifests/latest", "Bearer t0ken") in origin.authorizations


def test_redirect_to_a_non_http_scheme_is_refused(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """A redirect may lead only to http(s) (https alone for https upstreams):
    anything else is an upstream fault, and nothing is cached."""
    content = image(origin)
    origin.redirect = "file://cdn.test"
    response = mirror.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 502
    assert mirror.cached_files() == []


def test_tags_list_relinks_to_the_mirror(mirror: Harness, origin: FakeRegistry) -> None:
    """tags/list passes n/last through and points Link back at the name the
    client used, namespace prefix included."""
    image(origin, name="org/app", tag="v1")
    image(origin, name="org/app", tag="v2")
    origin.link = '</v2/org/app/tags/list?last=v1&n=1>; rel="next"'
    response = mirror.request("GET", "/v2/ghcr.io/org/app/tags/list?n=1")
    assert response.code == 200
    assert json.loads(mirror.body(response))["tags"] == ["v1", "v2"]
    assert origin.requests[-1] == ("GET", "/v2/org/app/tags/list")
    assert response.headers.getRawHeaders("Link") == [
        '</v2/ghcr.io/org/app/tags/list?last=v1&n=1>; rel="next"'
    ]


def test_tags_list_paginated_when_upstream_ignores_n(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """An upstream that ignores n/last (distribution 2.8) still gives the
    client pages of n tags with a Link to the next one."""
    for tag in ("c", "a", "b"):
        image(origin, name="org/app", tag=tag)
    first = mirror.request("GET", "/v2/org/app/tags/list?n=2&ns=ghcr.io")
    assert json.loads(mirror.body(first))["tags"] == ["a", "b"]
    assert first.headers.getRawHeaders("Link") == [
        '</v2/org/app/tags/list?n=2&last=b&ns=ghcr.io>; rel="next"'
    ]
    second = mirror.request("GET", "/v2/org/app/tags/list?n=2&last=b&ns=ghcr.io")
    assert json.loads(mirror.body(second))["tags"] == ["c"]
    assert second.headers.getRawHeaders("Link") is None


def test_referrers_without_upstream_api_is_an_empty_index(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """Without a referrers API upstream nor a referrers tag, the answer is an
    empty index, as from a registry with the API (see test_referrers)."""
    content = image(origin)
    response = mirror.request("GET", f"/v2/app/referrers/{content['manifest']}")
    assert response.code == 200
    assert json.loads(mirror.body(response))["manifests"] == []


# -- start-up and listeners -------------------------------------------------


def test_store_open_discards_unfinished_downloads(tmp_path: Any) -> None:
    """A spool file left by a crash is never served: start-up removes it."""
    store = Store(str(tmp_path))
    store.open()
    leftover = tmp_path / "spool" / "abc-123"
    leftover.write_bytes(b"half a blob")
    Store(str(tmp_path)).open()
    assert not leftover.exists()


def test_tls_handshake_on_plain_port_is_answered_at_once() -> None:
    """A TLS ClientHello on a plain-HTTP listener gets an HTTP 400 and a
    closed connection straight away, so clients fall back without waiting."""
    factory = PlainHTTPFactory(Site(Root.__new__(Root)))
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert transport.disconnecting


def _digest(text: str) -> Any:
    from regmirror.reference import parse_digest

    return parse_digest(text)


def _channel() -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    site = MirrorSite(Root.__new__(Root), clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def test_dripped_request_line_is_cut() -> None:
    """A request line sent a byte at a time, never finished, is cut by the
    header timeout as well."""
    channel, transport, clock = _channel()
    for _ in range(31):
        channel.dataReceived(b"a")
        clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_slow_request_head_is_cut() -> None:
    """A client dripping its request head (slowloris) gets a 408 and is
    disconnected after the header timeout."""
    channel, transport, clock = _channel()
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    clock.advance(29)
    channel.dataReceived(b"X-Drip: 1\r\n")
    assert transport.value() == b""
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert b'"code": "UNSUPPORTED"' in transport.value()
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /v2/ HTTP/1.1\r\nContent-Length: 10737418240\r\n\r\n", b"413"),
        (
            b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"405",
        ),
        (
            b"GET /v2/ HTTP/1.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"400",
        ),
    ],
)
def test_request_bodies_are_refused_before_reading(head: bytes, status: bytes) -> None:
    """A request announcing a body gets 413 at once (405 for a write, 400
    for contradictory framing) and the connection closes: nothing of the
    body is buffered, no smuggled request follows."""
    channel, transport, _ = _channel()
    channel.dataReceived(head + b"GET /v2/ HTTP/1.1\r\n\r\n" + b"x" * 100_000)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert answer.count(b"HTTP/1.1") == 1
    assert transport.disconnecting


def test_malformed_request_gets_an_oci_error() -> None:
    """A request line that is not HTTP gets a 400 with an OCI error body."""
    channel, transport, _ = _channel()
    channel.dataReceived(b"GARBAGE\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.value().endswith(b'"message": "malformed HTTP request"}]}')
