"""
Several upstreams per namespace, in memory: failover, the circuit breaker,
resuming broken transfers, and the stale-mirror defence.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image, result
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from regmirror import tags
from regmirror._attempts import MAX_FRUITLESS, max_attempts
from regmirror.breaker import Breaker
from regmirror.pool import TagAnswer
from regmirror.reference import Digest, parse_digest
from regmirror.stale import MAX_STALE

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


def test_refusals_of_repositories_never_mark_the_upstream_down(
    tmp_path: Path,
) -> None:
    """
    An upstream answering 401 or 403 for repositories the mirror may not
    read (private, or missing: Docker Hub answers 401 for both) is healthy:
    any number of such pulls, from any client, leave it up for the others
    (five marked it down for everyone; found by the fresh-eyes review).
    """
    harness, mirror_up, origin = two(
        tmp_path, mirror={"breaker_failures": 3, "breaker_backoff": 30.0}
    )
    content = image(mirror_up)

    def refused(request: object) -> tuple[int, bytes]:
        path = getattr(request, "path", b"")
        return (401 if b"/nosuch" in path else 403, b"denied")

    mirror_up.fault = refused
    for n in range(10):
        name = "nosuch" if n % 2 else "private"
        harness.request("GET", f"/v2/{name}{n}/manifests/latest")
    assert (
        mirror_up.count("GET", "/manifests/") + mirror_up.count("HEAD", "/manifests/")
        >= 10
    )
    mirror_up.fault = None
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert harness.body(response) == LAYER
    assert origin.count("GET", "/blobs/") == 0


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


@pytest.mark.parametrize("next_upstream_has_it", [True, False])
@pytest.mark.parametrize("client_streaming", [True, False])
def test_broken_transfer_is_resumed_with_a_range_request(
    tmp_path: Path, next_upstream_has_it: bool, client_streaming: bool
) -> None:
    """A blob whose upstream drops mid-transfer is resumed where it stopped,
    from the next upstream in order (the one that broke only when no other
    has it); the client, whether it was already streaming or not, sees one
    uninterrupted, correct stream, and the cache gets the verified blob."""
    harness, mirror_up, origin = two(tmp_path)
    content = image(mirror_up)
    if next_upstream_has_it:
        image(origin)
    if client_streaming:
        mirror_up.hold[content["layer"]] = 3000
    else:
        mirror_up.drop[content["layer"]] = 3000
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.settle()
    mirror_up.cut()
    harness.settle()
    result(done)
    assert b"".join(received) == LAYER
    resumed_by, other = (
        (origin, mirror_up) if next_upstream_has_it else (mirror_up, origin)
    )
    assert resumed_by.ranges == ["bytes=3000-"]
    assert other.ranges == []
    # Without the blob, the origin was asked first all the same (404).
    assert origin.count("GET", "/blobs/") == 1
    path = harness.store.blob_path(parse_digest(content["layer"]))
    with open(path, "rb") as f:
        assert f.read() == LAYER


def test_a_silent_transfer_is_given_up_after_idle_timeout_and_resumed(
    tmp_path: Path,
) -> None:
    """An upstream that stops sending mid-blob without closing is given up
    after ``idle_timeout`` seconds of silence, not before, and the blob is
    resumed from the next upstream; the client sees one correct stream."""
    harness, mirror_up, origin = two(tmp_path, mirror={"idle_timeout": 20.0})
    content = image(mirror_up)
    image(origin)
    mirror_up.hold[content["layer"]] = 3000
    response = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.settle()
    harness.clock.advance(19.9)
    harness.settle()
    assert origin.ranges == []
    harness.clock.advance(0.1)
    harness.settle()
    result(done)
    assert b"".join(received) == LAYER
    assert origin.ranges == ["bytes=3000-"]


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


# -- flaky upstreams: every transfer breaks ----------------------------------

#: where a flaky fake upstream cuts each transfer (of the 10 KiB LAYER)
CUT = 1000


def flaky_upstreams(
    tmp_path: Path, names: list[str], **settings: dict[str, object]
) -> tuple[Harness, dict[str, FakeRegistry], str]:
    """A mirror over fake upstreams *names*, in that order (the last is the
    origin), each holding the same image; and the image's layer."""
    fakes = {name: FakeRegistry() for name in names}
    harness = Harness(str(tmp_path / "cache"), dict(fakes), settings)
    layers = {image(fake)["layer"] for fake in fakes.values()}
    (layer,) = layers
    return harness, fakes, layer


def blob_gets(fake: FakeRegistry, layer: str) -> int:
    return fake.count("GET", f"/blobs/{layer}")


def breaks(harness: Harness, upstream: str) -> float:
    """How many broken transfers the upstream's health was told of."""
    value = harness.metrics.registry.get_sample_value(
        "regmirror_upstream_errors_total", {"upstream": upstream, "kind": "broken"}
    )
    return value or 0.0


def cached(harness: Harness, layer: str) -> bytes | None:
    path = harness.store.blob_path(parse_digest(layer))
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def refused(harness: Harness, layer: str) -> bool:
    """Does a GET of *layer* fail for the client: a 502, or (when the
    download fails after the answer began) a 200 whose stream breaks?"""
    response = harness.request("GET", f"/v2/app/blobs/{layer}")
    if response.code != 200:
        return bool(response.code == 502)
    try:
        harness.body(response)
    except Exception:
        return True
    return False


def get_layer(harness: Harness, layer: str) -> bytes:
    response = harness.request("GET", f"/v2/app/blobs/{layer}")
    assert response.code == 200
    body: bytes = harness.body(response)
    return body


def test_a_mirror_that_breaks_every_transfer_hands_the_rest_to_the_next_upstream(
    tmp_path: Path,
) -> None:
    """
    Upstreams ``faulty quay``; ``faulty`` cuts every transfer, ranged ones
    too, after ``CUT`` bytes.  The resume goes to ``quay`` for the rest
    (one ranged GET), not back to ``faulty``; the client gets the whole
    blob in one stream, the cache the verified blob, ``faulty``'s health
    hears of the break, and the next GET is served from the cache.
    """
    harness, fakes, layer = flaky_upstreams(tmp_path, ["faulty", "quay"])
    fakes["faulty"].flaky[layer] = CUT

    assert get_layer(harness, layer) == LAYER
    assert blob_gets(fakes["faulty"], layer) == 1
    assert fakes["quay"].ranges == [f"bytes={CUT}-"]
    assert breaks(harness, "faulty") == 1
    assert cached(harness, layer) == LAYER

    assert get_layer(harness, layer) == LAYER
    assert blob_gets(fakes["faulty"], layer) + blob_gets(fakes["quay"], layer) == 2


def test_a_mirror_that_breaks_every_transfer_is_marked_down(
    tmp_path: Path,
) -> None:
    """
    The breaker learns from breaks: ``breaker_failures`` blob transfers in
    a row that break off mark the mirror down, although each of its
    answers began well; the next blobs then come from ``quay`` alone,
    without first paying for a broken transfer.  A whole transfer between
    breaks starts the count again.
    """
    harness, fakes, _ = flaky_upstreams(tmp_path, ["faulty", "quay"])
    blobs = [bytes([n]) * 5000 for n in range(6)]
    digests = [fake.add_blob(blob) for blob in blobs for fake in fakes.values()][::2]
    breaker = harness.upstreams["faulty"].breaker
    fakes["faulty"].flaky.update({digest: CUT for digest in digests})

    del fakes["faulty"].flaky[digests[1]]  # one whole transfer between
    for digest, blob in zip(digests[:4], blobs[:4], strict=True):
        assert get_layer(harness, digest) == blob
    assert breaker.opened == 0  # broke, whole, broke, broke
    assert get_layer(harness, digests[4]) == blobs[4]
    assert breaker.opened == 1  # three in a row
    assert get_layer(harness, digests[5]) == blobs[5]
    assert blob_gets(fakes["faulty"], digests[5]) == 0
    assert fakes["quay"].count("GET", f"/blobs/{digests[5]}") == 1


def test_two_flaky_mirrors_then_a_healthy_origin_each_give_their_part(
    tmp_path: Path,
) -> None:
    """Upstreams ``one two origin``, the first two flaky: each is asked once,
    each resume going to the next upstream from where the last stopped."""
    harness, fakes, layer = flaky_upstreams(tmp_path, ["one", "two", "origin"])
    fakes["one"].flaky[layer] = CUT
    fakes["two"].flaky[layer] = CUT

    assert get_layer(harness, layer) == LAYER
    assert [blob_gets(fake, layer) for fake in fakes.values()] == [1, 1, 1]
    assert fakes["two"].ranges == [f"bytes={CUT}-"]
    assert fakes["origin"].ranges == [f"bytes={2 * CUT}-"]
    assert cached(harness, layer) == LAYER


def test_with_every_upstream_flaky_the_download_completes_while_it_progresses(
    tmp_path: Path,
) -> None:
    """
    Both upstreams cut every transfer after ``CUT`` bytes: they take
    turns, each attempt bringing ``CUT`` more bytes, far more attempts than
    any fixed number of resumes, until the blob is whole and verified.
    Each break is counted against the upstream that broke.
    """
    harness, fakes, layer = flaky_upstreams(tmp_path, ["mirror", "origin"])
    for fake in fakes.values():
        fake.flaky[layer] = CUT

    assert get_layer(harness, layer) == LAYER
    attempts = -(-len(LAYER) // CUT)
    offsets = range(CUT, attempts * CUT, CUT)
    # Each resume starts where the last cut left off, from either of them
    # (their breakers open as the breaks add up, which changes the turns).
    asked = fakes["origin"].ranges + fakes["mirror"].ranges
    assert sorted(asked, key=lambda r: int(r[6:-1])) == [f"bytes={n}-" for n in offsets]
    assert fakes["origin"].ranges and fakes["mirror"].ranges
    assert (
        blob_gets(fakes["mirror"], layer) + blob_gets(fakes["origin"], layer)
        == attempts
    )
    assert breaks(harness, "mirror") + breaks(harness, "origin") == attempts - 1
    assert cached(harness, layer) == LAYER


def test_breakers_opened_by_the_breaks_do_not_end_a_download_that_progresses(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    Every upstream flaky, and each break opens its breaker
    (``breaker_failures = 1``): when every upstream is marked down, the
    resume still asks them, as a last resort, rather than failing a
    download that progresses; it completes.
    """
    settings = {"breaker_failures": 1, "breaker_backoff": 30.0}
    harness, fakes, layer = flaky_upstreams(
        tmp_path, ["mirror", "origin"], mirror=settings, origin=settings
    )
    for fake in fakes.values():
        fake.flaky[layer] = CUT

    assert get_layer(harness, layer) == LAYER
    formats = logged_formats(logged)
    assert "marked down for" in formats
    assert "asking upstream {upstream}, marked down, for the rest" in formats
    assert blob_gets(fakes["mirror"], layer) + blob_gets(fakes["origin"], layer) == -(
        -len(LAYER) // CUT
    )
    assert cached(harness, layer) == LAYER


def test_breakers_open_on_all_but_one_upstream_the_healthy_one_finishes(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """Upstreams ``one two origin``: the first two flaky, each marked down
    by its break; the origin, whose breaker is closed, finishes the
    download without the others being asked again."""
    settings = {"breaker_failures": 1, "breaker_backoff": 30.0}
    harness, fakes, layer = flaky_upstreams(
        tmp_path, ["one", "two", "origin"], one=settings, two=settings
    )
    fakes["one"].flaky[layer] = CUT
    fakes["two"].flaky[layer] = CUT

    assert get_layer(harness, layer) == LAYER
    assert [blob_gets(fake, layer) for fake in fakes.values()] == [1, 1, 1]
    assert logged_formats(logged).count("marked down") == 2
    assert fakes["origin"].ranges == [f"bytes={2 * CUT}-"]


def test_an_upstream_that_brings_nothing_is_dropped_the_other_finishes(
    tmp_path: Path,
) -> None:
    """
    ``mirror`` brings ``CUT`` bytes per transfer, ``origin`` answers and
    breaks before sending any: after ``MAX_FRUITLESS`` such attempts the
    origin is not asked again, and the mirror, attempt after attempt,
    brings the whole blob.
    """
    harness, fakes, layer = flaky_upstreams(tmp_path, ["mirror", "origin"])
    fakes["mirror"].flaky[layer] = CUT
    fakes["origin"].flaky[layer] = 0

    assert get_layer(harness, layer) == LAYER
    assert blob_gets(fakes["origin"], layer) == MAX_FRUITLESS
    assert blob_gets(fakes["mirror"], layer) == -(-len(LAYER) // CUT)
    assert cached(harness, layer) == LAYER


def test_when_no_upstream_brings_anything_the_download_fails_naming_each(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    Both upstreams answer and break before sending a byte, every time:
    each is asked ``MAX_FRUITLESS`` times, then the client gets an error,
    nothing is cached, and the error names every source and what it gave.
    """
    harness, fakes, layer = flaky_upstreams(tmp_path, ["mirror", "origin"])
    for fake in fakes.values():
        fake.flaky[layer] = 0

    assert refused(harness, layer)
    assert [blob_gets(fake, layer) for fake in fakes.values()] == [MAX_FRUITLESS] * 2
    assert cached(harness, layer) is None
    (failed,) = [e for e in logged if "failed" in str(e.get("log_format"))]
    text = formatEvent(failed)
    assert f"mirror: 0 bytes in {MAX_FRUITLESS} attempts" in text, text
    assert f"origin: 0 bytes in {MAX_FRUITLESS} attempts" in text, text


def test_an_upstream_that_brings_a_byte_at_a_time_meets_the_sanity_cap(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """One upstream that brings one byte per transfer progresses, but for
    ever: the download gives up after ``max_attempts(size)`` attempts."""
    harness, fakes, layer = flaky_upstreams(tmp_path, ["origin"])
    fakes["origin"].flaky[layer] = 1

    assert refused(harness, layer)
    cap = max_attempts(len(LAYER))
    assert blob_gets(fakes["origin"], layer) == cap
    (failed,) = [e for e in logged if "failed" in str(e.get("log_format"))]
    assert f"origin: {cap} bytes in {cap} attempts" in formatEvent(failed)


def test_clients_joining_a_download_that_keeps_breaking_get_every_byte(
    tmp_path: Path,
) -> None:
    """
    A client streams the blob from ``mirror``, which holds then drops the
    transfer; a second client joins mid-way; ``origin`` is flaky too.  The
    transfer moves from one to the other until it is whole: both clients
    get the whole blob from one download, a third from the cache.
    """
    harness, fakes, layer = flaky_upstreams(tmp_path, ["mirror", "origin"])
    fakes["mirror"].hold[layer] = 3000
    fakes["origin"].flaky[layer] = CUT
    path = f"/v2/app/blobs/{layer}"
    first = harness.request("GET", path)
    first_body: list[bytes] = []
    first_done = treq.collect(first, first_body.append)
    harness.settle()
    assert 0 < len(b"".join(first_body)) < len(LAYER)
    second = harness.request("GET", path)
    second_done = treq.content(second)

    fakes["mirror"].cut()
    harness.settle()
    result(first_done)
    assert b"".join(first_body) == LAYER
    assert result(second_done) == LAYER
    assert fakes["origin"].ranges == ["bytes=3000-"]
    assert fakes["mirror"].ranges == [f"bytes={3000 + CUT}-"]
    assert get_layer(harness, layer) == LAYER
    assert blob_gets(fakes["mirror"], layer) + blob_gets(fakes["origin"], layer) == 3


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


def test_stale_answers_remembered_are_bounded(tmp_path: Path) -> None:
    """Clients choose the repositories asked about: 100,000 repositories a
    mirror answers differently leave :data:`MAX_STALE` records, the newest."""
    harness, _, _ = two(tmp_path)
    pool = harness.router_pool("docker.io")
    theirs, ours = Digest.of(b"old"), Digest.of(b"new")
    for n in range(100_000):
        pool._compare(
            TagAnswer(theirs, "mirror"), f"r{n}", "latest", TagAnswer(ours, "origin")
        )
    assert len(pool.stale) == MAX_STALE
    assert ("mirror", "r99999") in pool.stale and ("mirror", "r0") not in pool.stale
    assert pool.stale_counts == {"mirror": 100_000}


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


def test_a_candidate_whose_config_the_cache_refuses_loses_its_body_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dating the mirrors' answers while the cache cannot be written: the
    newer image's config comes as a relay, which dating cannot read; that
    candidate loses (the cached answer wins) and the relayed body is
    dropped, its connection closed, not left open unread."""
    dropped: list[object] = []
    monkeypatch.setattr(tags, "discard", dropped.append)
    harness, mirror_up, origin = two(tmp_path)
    cached = image(origin, created=OLD)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    image(mirror_up, created=NEW)
    harness.clock.advance(60)
    origin.fault = failing
    harness.store.degrade(OSError(errno.ENOSPC, "No space left on device"))
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        cached["manifest"]
    ]
    assert len(dropped) == 1


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


def test_origin_down_a_tag_never_seen_is_asked_of_the_mirrors(tmp_path: Path) -> None:
    """
    With the origin unreachable and nothing cached for a tag, the default
    policy (``freshest``) takes a mirror's answer; a tag every mirror says
    does not exist is ``404 MANIFEST_UNKNOWN``; a mirror failing too leaves
    the upstreams' error (502), never a 500.
    """
    harness, mirror_up, origin = two(tmp_path)
    origin.fault = failing
    there = image(mirror_up, tag="v1", created=NEW)
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert response.code == 200, harness.body(response)
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["mirror"]
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        there["manifest"]
    ]
    response = harness.request("GET", "/v2/neverseen/manifests/v1")
    assert response.code == 404
    assert error_code(harness, response) == "MANIFEST_UNKNOWN"
    mirror_up.fault = failing
    response = harness.request("GET", "/v2/neverseen/manifests/v2")
    assert response.code == 502
    assert error_code(harness, response) == "UNAVAILABLE"


@pytest.mark.parametrize("policy", ["cache", "fail"])
def test_origin_down_a_tag_never_seen_without_the_mirrors(
    tmp_path: Path, policy: str
) -> None:
    """``origin_unreachable = cache`` or ``fail`` take no mirror's answer:
    a tag never seen, whether a mirror has it or not, gets the origin's
    error (502 for its 500s), never a 500."""
    harness, mirror_up, origin = two(tmp_path)
    harness.router_pool("docker.io").origin_unreachable = policy
    origin.fault = failing
    image(mirror_up, tag="v1")
    for path in ("/v2/app/manifests/v1", "/v2/neverseen/manifests/v1"):
        response = harness.request("GET", path)
        assert response.code == 502, (path, harness.body(response))
        assert error_code(harness, response) == "UNAVAILABLE"


def test_origin_down_a_stale_mirror_answers_no_tag_never_seen(
    tmp_path: Path,
) -> None:
    """A mirror the origin contradicted about a repository gives no answer
    for its tags while the origin is down, not even for a tag never seen."""
    harness, mirror_up, origin = two(tmp_path)
    image(mirror_up, created=OLD)
    image(origin, created=NEW)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    image(mirror_up, tag="v1", created=OLD)
    origin.fault = failing
    harness.clock.advance(60)
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert response.code == 502, harness.body(response)


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
