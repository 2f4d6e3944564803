"""
Several upstreams per namespace, in memory: failover, the circuit breaker,
resuming broken transfers, and the stale-mirror defence.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image, result
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from regmirror.reference import parse_digest
from regmirror.upstream import Breaker

OLD = "2020-01-01T00:00:00Z"
NEW = "2024-06-01T12:30:00.123456789Z"


def logged_formats(logged: list[LogEvent]) -> str:
    return "\n".join(str(e.get("log_format")) for e in logged)


def two(
    tmp_path: Path, **settings: dict[str, object]
) -> tuple[Harness, FakeRegistry, FakeRegistry]:
    """A mirror over a fake mirror registry first and an origin second."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"), {"mirror": mirror_up, "origin": origin}, settings
    )
    return harness, mirror_up, origin


def failing(request: object) -> tuple[int, bytes]:
    return 500, b"oops"


# -- the breaker ------------------------------------------------------------


def test_breaker_opens_backs_off_and_probes_once() -> None:
    """Three failed answers open the breaker; after the back-off one probe
    goes through; another failure doubles the back-off; success closes it."""
    clock = Clock()
    breaker = Breaker(clock, threshold=3, backoff=10.0)
    assert breaker.failed(transport=False) is None
    assert breaker.failed(transport=False) is None
    assert breaker.failed(transport=False) == 10.0
    assert not breaker.allow()
    clock.advance(10)
    assert breaker.allow()
    assert not breaker.allow()  # only one probe at a time
    assert breaker.failed(transport=False) == 20.0
    clock.advance(20)
    assert breaker.allow()
    assert breaker.succeeded()
    assert breaker.allow() and breaker.allow()


def test_transport_failure_opens_at_once() -> None:
    """No connection or a timeout marks the upstream down on the first try."""
    breaker = Breaker(Clock(), threshold=3, backoff=10.0)
    assert breaker.failed(transport=True) == 10.0
    assert not breaker.allow()


def test_dead_mirror_is_skipped_after_the_breaker_opens(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A mirror that keeps failing costs three requests, then none until its
    back-off has passed, then one probe."""
    harness, mirror_up, origin = two(
        tmp_path, mirror={"breaker_failures": 3, "breaker_backoff": 30.0}
    )
    mirror_up.fault = failing
    blobs = [origin.add_blob(bytes([n]) * 100) for n in range(6)]
    for digest in blobs[:5]:
        assert harness.request("GET", f"/v2/app/blobs/{digest}").code == 200
    assert len(mirror_up.requests) == 3
    assert "marked down" in logged_formats(logged)
    harness.clock.advance(31)
    assert harness.request("GET", f"/v2/app/blobs/{blobs[5]}").code == 200
    assert len(mirror_up.requests) == 4


def test_html_page_instead_of_a_blob_fails_over(tmp_path: Path) -> None:
    """A 200 carrying an HTML page (a captive portal, an error page) is no
    blob: the next upstream serves it."""
    harness, mirror_up, origin = two(tmp_path)
    content = image(origin)
    image(mirror_up)
    mirror_up.blob_type = "text/html; charset=utf-8"
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert harness.body(response) == LAYER
    assert origin.count("GET", "/blobs/") == 1


def test_all_upstreams_failing_is_a_clear_error(tmp_path: Path) -> None:
    """Every upstream failing gives an OCI error naming the namespace."""
    harness, mirror_up, origin = two(tmp_path)
    mirror_up.fault = origin.fault = failing
    response = harness.request("GET", "/v2/app/blobs/sha256:" + "a" * 64)
    assert response.code == 502
    assert error_code(harness, response) == "UNAVAILABLE"


# -- resuming ---------------------------------------------------------------


@pytest.mark.parametrize("same_upstream_recovers", [True, False])
@pytest.mark.parametrize("client_streaming", [True, False])
def test_broken_transfer_is_resumed_with_a_range_request(
    tmp_path: Path, same_upstream_recovers: bool, client_streaming: bool
) -> None:
    """A blob whose upstream drops mid-transfer is resumed where it stopped
    (the same upstream first, else the next); the client, whether it was
    already streaming or not, sees one uninterrupted, correct stream, and
    the cache gets the verified blob."""
    harness, mirror_up, origin = two(tmp_path)
    content = image(origin)
    image(mirror_up)
    if client_streaming:
        mirror_up.hold[content["layer"]] = 3000
    else:
        mirror_up.drop[content["layer"]] = 3000
    if not same_upstream_recovers:
        mirror_up.fault = lambda request: (
            (503, b"gone") if request.getHeader("Range") else None
        )
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.settle()
    mirror_up.cut()
    harness.settle()
    result(done)
    assert b"".join(received) == LAYER
    resumed_by = mirror_up if same_upstream_recovers else origin
    assert resumed_by.ranges[-1] == "bytes=3000-"
    path = harness.store.blob_path(parse_digest(content["layer"]))
    with open(path, "rb") as f:
        assert f.read() == LAYER


def test_transfer_that_cannot_be_resumed_breaks_the_client(tmp_path: Path) -> None:
    """When no upstream can carry on, the client's stream breaks and nothing
    is cached."""
    harness, mirror_up, origin = two(tmp_path)
    content = image(mirror_up)
    mirror_up.hold[content["layer"]] = 3000
    mirror_up.fault = lambda request: (
        (503, b"gone") if request.getHeader("Range") else None
    )
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    received: list[bytes] = []
    d = treq.collect(response, received.append)
    harness.settle()
    mirror_up.cut()
    harness.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection)
        result(d)
    assert len(b"".join(received)) < len(LAYER)
    assert not any("/blobs/" in f for f in harness.cached_files())


# -- the stale-mirror defence -------------------------------------------------


def test_stale_mirror_is_detected_and_its_tag_never_wins(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """The origin decides the tag; a mirror answering an older digest is
    recorded as stale with both digests logged, while content by digest
    still comes from the mirror, which has it."""
    harness, mirror_up, origin = two(tmp_path)
    image(mirror_up, created=OLD)
    fresh = image(origin, created=NEW)
    mirror_up.add_blob(LAYER)
    mirror_up.manifests[fresh["manifest"]] = origin.manifests[fresh["manifest"]]
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        fresh["manifest"]
    ]
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["origin"]
    pool = harness.router_pool("docker.io")
    assert ("mirror", "library/app") in pool.stale
    assert pool.stale_counts == {"mirror": 1}
    stale_lines = [e for e in logged if "stale mirror" in str(e.get("log_format"))]
    assert stale_lines and stale_lines[0]["ours"] == fresh["manifest"]
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{fresh['layer']}"))
    assert mirror_up.count("GET", f"/blobs/{fresh['layer']}") == 1
    assert origin.count("GET", "/blobs/") == 0


def test_origin_down_freshest_answer_wins(tmp_path: Path) -> None:
    """With the origin unreachable, the default policy takes the newest image
    among the cached answer and the mirrors, and says where it came from."""
    harness, mirror_up, origin = two(tmp_path)
    cached = image(origin, created=OLD)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    newer = image(mirror_up, created=NEW)
    harness.clock.advance(60)
    origin.fault = failing
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        newer["manifest"]
    ]
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["mirror"]
    assert cached["manifest"] != newer["manifest"]


def test_origin_down_cache_policy_and_max_stale(tmp_path: Path) -> None:
    """``origin_unreachable = cache`` ignores the mirrors; a cached answer older
    than ``max_stale`` is not used, so the request fails."""
    harness, mirror_up, origin = two(tmp_path)
    pool = harness.router_pool("docker.io")
    pool.origin_unreachable = "cache"
    pool.max_stale = 3600.0
    cached = image(origin, created=OLD)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    image(mirror_up, created=NEW)
    origin.fault = failing
    harness.clock.advance(60)
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        cached["manifest"]
    ]
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["cache"]
    harness.clock.advance(3600)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 502


def test_origin_down_fail_policy(tmp_path: Path) -> None:
    """``origin_unreachable = fail`` answers nothing without the origin."""
    harness, mirror_up, origin = two(tmp_path)
    harness.router_pool("docker.io").origin_unreachable = "fail"
    image(origin)
    image(mirror_up)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    origin.fault = failing
    harness.clock.advance(60)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 502


def test_tag_record_survives_on_disk(tmp_path: Path) -> None:
    """The origin's answer is recorded on disk with the time it was given."""
    harness, _, origin = two(tmp_path)
    content = image(origin)
    harness.clock.advance(1000)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    record = harness.store.tag("docker.io", "library/app", "latest")
    assert record is not None
    assert str(record.digest) == content["manifest"]
    assert record.confirmed == 1000
    assert os.path.exists(
        os.path.join(
            harness.store.root, "tags", "docker.io", "library/app", "_tags", "latest"
        )
    )


def test_wrong_bytes_from_a_mirror_send_the_next_request_elsewhere(
    tmp_path: Path,
) -> None:
    """After a mirror served wrong bytes for a digest, the next request for it
    goes to the other upstreams: the client's retry gets the right blob."""
    harness, mirror_up, origin = two(tmp_path)
    content = image(origin)
    image(mirror_up)
    mirror_up.corrupt.add(content["layer"])
    first = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert first.code == 502
    retry = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert harness.body(retry) == LAYER
    assert origin.count("GET", "/blobs/") == 1
