"""
Keeping images warm (issue 18, item 5): ``[namespace:NAME] keep_warm``
images re-resolved at the origin every ``keep_warm_interval`` (the first
time soon after start), whatever the tag's TTL; their new manifests, configs
and layers fetched before anyone asks, as downloads a client's pull joins;
the stale-mirror defence run on each refresh; waiting while the origin is
rate limited or marked down; nothing fetched that would take the images
kept warm past ``max_size``; a clean stop, and SIGHUP's new lists.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from fakeregistry import FakeRegistry
from memory import Harness, image_manifest, index_manifest, result
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Request

from regmirror import warm as warm_module
from regmirror.config import NamespaceConfig, WarmImage
from regmirror.ini import load
from regmirror.ini_values import warm_image
from regmirror.listeners import Inherited
from regmirror.reference import OCI_INDEX, OCI_MANIFEST, parse_digest
from regmirror.service import Worker, build_mirror, build_tree
from regmirror.status import Shown
from regmirror.warm import FIRST_DELAY, KeepWarm, read_record

INTERVAL = 60.0


def push(
    fake: FakeRegistry,
    seed: int,
    tag: str | None = "latest",
    architecture: str = "amd64",
    layer_size: int = 4096,
) -> dict[str, Any]:
    """An image of a config and two layers, its bytes chosen by *seed*,
    as ``library/app:<tag>`` in *fake*."""
    config_bytes = json.dumps(
        {"architecture": architecture, "os": "linux", "seed": seed}
    ).encode()
    config = fake.add_blob(config_bytes)
    layers = [
        fake.add_blob(bytes((seed * 7 + n + i) % 251 for i in range(layer_size)))
        for n in range(2)
    ]
    document = image_manifest(
        (config, len(config_bytes)), [(digest, layer_size) for digest in layers]
    )
    manifest, body = fake.add_manifest("library/app", tag, document, OCI_MANIFEST)
    return {
        "manifest": manifest,
        "body": body,
        "config": config,
        "layers": layers,
        "blobs": [config, *layers],
        "size": len(config_bytes) + 2 * layer_size,
    }


def cached(harness: Harness, digests: list[str]) -> bool:
    return all(harness.store.has_blob(parse_digest(d)) for d in digests)


def blob_gets(fake: FakeRegistry) -> list[str]:
    return [
        p.rsplit("/", 1)[1] for m, p in fake.requests if m == "GET" and "/blobs/" in p
    ]


def tag_heads(fake: FakeRegistry) -> int:
    return fake.count("HEAD", "/manifests/latest")


def namespace_of(
    harness: Harness,
    images: tuple[WarmImage, ...],
    interval: float = INTERVAL,
    deny: tuple[str, ...] = (),
) -> NamespaceConfig:
    pool = harness.pools["docker.io"]
    return NamespaceConfig(
        "docker.io",
        tuple(u.name for u in pool.upstreams),
        pool.origin.name,
        keep_warm=images,
        keep_warm_interval=interval,
        deny=deny,
    )


def keep_warm(
    harness: Harness,
    *images: str,
    interval: float = INTERVAL,
    deny: tuple[str, ...] = (),
) -> KeepWarm:
    """A started :class:`KeepWarm` for docker.io's *images*."""
    namespace = namespace_of(
        harness, tuple(warm_image(i) for i in images), interval, deny
    )
    service = KeepWarm(
        harness.fetcher,
        [harness.pools["docker.io"]],
        [namespace],
        harness.clock,
    )
    service.startService()
    return service


def advance(harness: Harness, seconds: float) -> None:
    harness.clock.advance(seconds)
    harness.settle()


def state(service: KeepWarm, index: int = 0) -> dict[str, Any]:
    return service.states()[index]


def refreshes(harness: Harness, outcome: str) -> float:
    return harness.metrics.total(
        "regmirror_keep_warm_refreshes_total", namespace="docker.io", outcome=outcome
    )


def test_an_image_is_fetched_soon_after_start_before_anyone_asks(
    tmp_path: Path,
) -> None:
    """
    Started, nothing is asked of the origin at once; FIRST_DELAY later the
    tag is asked of the origin, and the manifest, config and layers come
    without a client: the state is ``ok`` with the digest and the time,
    written to the record every process reads, and counted as fetched.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    service = keep_warm(harness, "library/app:latest")
    assert state(service)["state"] == "pending"
    advance(harness, FIRST_DELAY / 2)
    assert origin.requests == []
    advance(harness, FIRST_DELAY / 2)
    assert tag_heads(origin) == 1
    assert cached(harness, image["blobs"])
    assert harness.store.manifest(parse_digest(image["manifest"])) is not None
    assert sorted(blob_gets(origin)) == sorted(image["blobs"])
    now = state(service)
    assert now["state"] == "ok", now
    assert now["digest"] == image["manifest"]
    assert now["refreshed"] == harness.clock.seconds()
    assert now["size"] == image["size"]
    record = read_record(os.path.join(harness.store.root, "warm.json"))
    assert record == service.states()
    assert refreshes(harness, "fetched") == 1
    service.stopService()


def test_every_interval_the_origin_is_asked_whatever_the_tag_ttl(
    tmp_path: Path,
) -> None:
    """
    With an interval (10 s) shorter than the tag's TTL (30 s), each refresh
    still asks the origin (a refresh is a real check); nothing changed, it
    fetches nothing and counts as unchanged.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1)
    service = keep_warm(harness, "library/app:latest", interval=10.0)
    advance(harness, FIRST_DELAY)
    gets = len(blob_gets(origin))
    for round_ in range(2, 5):
        advance(harness, 9.5)
        assert tag_heads(origin) == round_ - 1
        advance(harness, 0.5)
        assert tag_heads(origin) == round_
    assert len(blob_gets(origin)) == gets
    assert refreshes(harness, "unchanged") == 3
    service.stopService()


def test_a_moved_tag_brings_the_new_image_and_a_pull_costs_no_upstream_request(
    tmp_path: Path,
) -> None:
    """
    The tag moves at the origin: the next refresh fetches the new image's
    blobs without a client.  A pull then finds the tag's answer refreshed
    (no question to the origin within tag_ttl) and every blob cached: the
    origin sees neither a HEAD nor a blob GET for it.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1)
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    moved = push(origin, 2)
    assert not cached(harness, moved["blobs"])
    advance(harness, INTERVAL)
    assert cached(harness, moved["blobs"])
    assert state(service)["digest"] == moved["manifest"]
    assert "the tag moved" in state(service)["detail"]
    before = len(origin.requests)
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert harness.body(response) == moved["body"]
    for digest in moved["blobs"]:
        response = harness.request("GET", f"/v2/app/blobs/{digest}")
        assert response.code == 200
        harness.body(response)
    assert origin.requests[before:] == []
    service.stopService()


def test_a_refresh_notices_a_stale_mirror_before_anyone_pulls(tmp_path: Path) -> None:
    """
    The mirror in front still tags an older image: the refresh asks it too
    and notes it stale (and counts it), with no client having pulled.
    """
    mirror, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"mirror": mirror, "origin": origin})
    older = push(mirror, 1)
    current = push(origin, 2)
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    pool = harness.pools["docker.io"]
    stale = dict(pool.stale.items())
    answer = stale[("mirror", "library/app")]
    assert str(answer.theirs) == older["manifest"]
    assert str(answer.origin) == current["manifest"]
    assert (
        harness.metrics.total(
            "regmirror_stale_detections_total", namespace="docker.io", mirror="mirror"
        )
        == 1
    )
    assert state(service)["digest"] == current["manifest"]
    service.stopService()


def too_many_requests(request: Request) -> tuple[int, bytes]:
    request.setHeader("Retry-After", "30")
    return 429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'


def test_a_rate_limited_origin_pauses_the_refresh_until_its_back_off_ends(
    tmp_path: Path,
) -> None:
    """
    The origin answers the refresh's tag check 429 with ``Retry-After: 30``:
    the image waits (``waiting``, rate limited), the origin is asked nothing
    more for 30 s, over several intervals, and nothing counts as failed;
    then the refresh goes on and the image comes.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    origin.fault = too_many_requests
    service = keep_warm(harness, "library/app:latest", interval=5.0)
    advance(harness, FIRST_DELAY)
    assert len(origin.requests) == 1
    waiting = state(service)
    assert waiting["state"] == "waiting"
    assert "rate limited" in waiting["detail"]
    for _ in range(5):
        advance(harness, 5.0)
        assert len(origin.requests) == 1
        assert state(service)["state"] == "waiting"
    origin.fault = None
    advance(harness, 5.0)
    assert state(service)["state"] == "ok"
    assert cached(harness, image["blobs"])
    assert refreshes(harness, "failed") == 0
    assert refreshes(harness, "fetched") == 1
    service.stopService()


def test_an_origin_marked_down_is_waited_for(tmp_path: Path) -> None:
    """
    The origin's breaker is open (another process, a client's request): the
    refresh waits, asking nothing, until its back-off ends; then it asks.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    harness.upstreams["origin"].breaker.failed(transport=True)
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "waiting"
    assert "marked down" in state(service)["detail"]
    advance(harness, 28.0)
    assert origin.requests == []
    advance(harness, 2.0)
    assert state(service)["state"] == "ok"
    assert cached(harness, image["blobs"])
    service.stopService()


def test_images_that_would_not_fit_in_max_size_are_too_big(tmp_path: Path) -> None:
    """
    Two images, the cache's max_size room for one: the first is kept warm,
    the second is ``too big`` (its size and the limit said), none of its
    blobs fetched, and counted as too_big.
    """
    origin = FakeRegistry()
    first = push(origin, 1, tag="one")
    second = push(origin, 2, tag="two")
    harness = Harness(
        str(tmp_path / "cache"),
        {"origin": origin},
        max_size=first["size"] + second["size"] - 1,
    )
    service = keep_warm(harness, "library/app:one", "library/app:two")
    advance(harness, FIRST_DELAY)
    assert state(service, 0)["state"] == "ok"
    assert cached(harness, first["blobs"])
    big = state(service, 1)
    assert big["state"] == "too big"
    assert "max_size" in big["detail"]
    assert not any(harness.store.has_blob(parse_digest(d)) for d in second["blobs"])
    assert not set(second["blobs"]) & set(blob_gets(origin))
    assert refreshes(harness, "too_big") == 1
    service.stopService()


def test_a_clients_pull_joins_the_refreshs_download(tmp_path: Path) -> None:
    """
    A client asking for a layer the refresh is downloading joins that
    download: it gets every byte, and the origin sees one GET of it.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    layer = image["layers"][0]
    origin.hold[layer] = 1000
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "refreshing"
    d = harness.client.get(f"http://mirror.test/v2/app/blobs/{layer}")
    harness.settle()
    origin.release()
    harness.settle()
    response = result(d)
    assert response.code == 200
    assert harness.body(response) == origin.blobs[layer]
    advance(harness, 0)
    assert blob_gets(origin).count(layer) == 1
    assert state(service)["state"] == "ok"
    service.stopService()


def index_of(fake: FakeRegistry) -> dict[str, Any]:
    """``library/app:latest`` as an index of an amd64 and an arm64 image."""
    amd64 = push(fake, 1, tag=None, architecture="amd64")
    arm64 = push(fake, 2, tag=None, architecture="arm64")
    document = index_manifest([(amd64, "amd64"), (arm64, "arm64")])
    index, _ = fake.add_manifest("library/app", "latest", document, OCI_INDEX)
    return {"index": index, "amd64": amd64, "arm64": arm64}


@pytest.mark.parametrize("platform", ["@linux/arm64", ""])
def test_an_index_brings_the_wanted_platform_or_every_one(
    tmp_path: Path, platform: str
) -> None:
    """
    An index with an amd64 and an arm64 image: ``@linux/arm64`` brings the
    arm64 image's manifest and blobs only; without a platform, both.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    index = index_of(origin)
    service = keep_warm(harness, f"library/app:latest{platform}")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "ok"
    assert state(service)["digest"] == index["index"]
    assert cached(harness, index["arm64"]["blobs"])
    assert cached(harness, index["amd64"]["blobs"]) is (platform == "")
    service.stopService()


def test_an_index_without_the_wanted_platform_fails(tmp_path: Path) -> None:
    """A platform the index does not have: ``failed``, saying so, counted."""
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    index_of(origin)
    service = keep_warm(harness, "library/app:latest@linux/s390x")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "failed"
    assert "linux/s390x" in state(service)["detail"]
    assert refreshes(harness, "failed") == 1
    assert blob_gets(origin) == []
    service.stopService()


def test_one_image_of_another_platform_fails(tmp_path: Path) -> None:
    """
    A tag naming one image (no index) whose config says linux/amd64, kept
    warm ``@linux/arm64``: ``failed``, saying what it is (it said ``ok``
    before; found by the fresh-eyes review).  ``@linux/amd64`` brings it.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    service = keep_warm(
        harness, "library/app:latest@linux/arm64", "library/app:latest@linux/amd64"
    )
    advance(harness, FIRST_DELAY)
    wrong, right = state(service, 0), state(service, 1)
    assert wrong["state"] == "failed"
    assert "linux/amd64, not linux/arm64" in wrong["detail"]
    assert right["state"] == "ok"
    assert cached(harness, image["blobs"])
    service.stopService()


def test_a_missing_tag_fails_and_the_next_image_is_refreshed(tmp_path: Path) -> None:
    """A tag the origin does not have fails that image only."""
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1, tag="there")
    service = keep_warm(harness, "library/app:gone", "library/app:there")
    advance(harness, FIRST_DELAY)
    assert state(service, 0)["state"] == "failed"
    assert "unknown" in state(service, 0)["detail"]
    assert state(service, 1)["state"] == "ok"
    assert cached(harness, image["blobs"])
    service.stopService()


def test_a_tag_deleted_at_the_origin_is_answered_no_more(tmp_path: Path) -> None:
    """A refresh that finds the tag gone at the origin removes its record,
    as a pull's check does: the cache does not answer it afterwards, not
    even while the origin is unreachable."""
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1)
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "ok"
    assert harness.store.tag("docker.io", "library/app", "latest") is not None
    del origin.tags[("library/app", "latest")]
    advance(harness, INTERVAL)
    assert state(service)["state"] == "failed"
    assert harness.store.tag("docker.io", "library/app", "latest") is None
    service.stopService()


def test_stopping_while_waiting_leaves_no_timer(tmp_path: Path) -> None:
    """
    Stopped while it waits out a 429's back-off, and while its next round
    is due: the stop fires at once and no delayed call is left.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1)
    origin.fault = too_many_requests
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "waiting"
    result(service.stopService())
    assert harness.clock.getDelayedCalls() == []
    assert len(origin.requests) == 1

    idle = keep_warm(Harness(str(tmp_path / "idle"), {"origin": FakeRegistry()}))
    assert idle.states() == []
    result(idle.stopService())


def test_stopping_mid_download_ends_the_round_and_the_download_goes_on(
    tmp_path: Path,
) -> None:
    """
    Stopped while a layer downloads: the stop fires once the round ended,
    no round is scheduled again, and the download (which a client may have
    joined) still completes into the cache.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    image = push(origin, 1)
    layer = image["layers"][0]
    origin.hold[layer] = 1000
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    stopped = service.stopService()
    assert result(stopped) is None
    origin.release()
    harness.settle()
    assert harness.store.has_blob(parse_digest(layer))
    advance(harness, INTERVAL * 2)
    assert tag_heads(origin) == 1


def test_a_new_list_is_taken_soon_and_images_no_longer_listed_go(
    tmp_path: Path,
) -> None:
    """
    :meth:`KeepWarm.change` (what SIGHUP does with the file read again):
    the new image is refreshed FIRST_DELAY later, not an interval later;
    the one no longer listed leaves the states and is not asked again.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1, tag="one")
    two = push(origin, 2, tag="two")
    service = keep_warm(harness, "library/app:one")
    advance(harness, FIRST_DELAY)
    service.change([namespace_of(harness, (warm_image("library/app:two"),))])
    assert [s["image"] for s in service.states()] == ["library/app:two"]
    advance(harness, FIRST_DELAY)
    assert cached(harness, two["blobs"])
    advance(harness, INTERVAL)
    assert origin.count("HEAD", "/manifests/one") == 1
    assert origin.count("HEAD", "/manifests/two") == 2
    service.stopService()


def test_a_list_read_again_is_taken_within_the_rules_in_force(
    tmp_path: Path,
) -> None:
    """
    :meth:`KeepWarm.change` takes the lists of the file read again (SIGHUP),
    but not an image that the ``deny`` in force refuses, whatever the file
    now says of ``deny``: pulls of it are still refused, so keeping it warm
    would fetch upstream what the mirror refuses (found by the fresh-eyes
    review: the reload fetched it).
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1, tag="one")
    push(origin, 2, tag="two")
    service = keep_warm(harness, "library/app:one", deny=("*/*-debug",))
    read_again = namespace_of(
        harness,
        tuple(
            warm_image(i)
            for i in ("library/app:two", "library/app-debug:one", "library/app:one")
        ),
    )
    service.change([read_again])
    assert [s["image"] for s in service.states()] == [
        "library/app:two",
        "library/app:one",
    ]
    advance(harness, FIRST_DELAY)
    assert [s["state"] for s in service.states()] == ["ok", "ok"]
    assert not [path for _, path in origin.requests if "app-debug" in path]
    service.stopService()


def test_the_status_document_lists_the_images_to_those_who_may_see_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The status document (every process's: it reads the record) lists each
    image with its state (a one-word name of Docker Hub's with
    ``library/``, as upstream knows it); a client who may not pull the
    namespace does not see them.
    """
    monkeypatch.chdir(tmp_path)
    extra = "keep_warm = nginx:latest library/alpine:3.20@linux/amd64\n"
    config = load(str(write_config(tmp_path, extra=extra)))
    reactor = MemoryReactorClock()
    mirror = build_mirror(config, reactor)
    mirror.store.open()
    service = KeepWarm(mirror.fetcher, mirror.pools, config.namespaces, reactor)
    service.startService()
    document = result(Deferred.fromCoroutine(mirror.status()))
    listed = document["keep_warm"]
    assert [(i["image"], i["state"]) for i in listed] == [
        ("library/nginx:latest", "pending"),
        ("library/alpine:3.20@linux/amd64", "pending"),
    ]
    assert listed[1]["platform"] == "linux/amd64"
    hidden = result(Deferred.fromCoroutine(mirror.status(Shown())))
    assert hidden["keep_warm"] == []
    result(service.stopService())
    assert reactor.getDelayedCalls() == []


def test_only_the_twistd_process_keeps_images_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``workers``, the parent's tree keeps images warm, a worker's
    does not (one refresh per interval for the machine)."""
    monkeypatch.chdir(tmp_path)
    extra = "keep_warm = library/nginx:latest\n"
    config = load(str(write_config(tmp_path, "workers = 2", extra=extra)))
    parent = build_tree(config, MemoryReactorClock(), None)
    assert parent.warm is not None
    assert parent.getServiceNamed("keep warm") is parent.warm
    inherited = tuple(
        Inherited(socket.socket().detach(), socket.AF_INET, d)
        for d in config.server.listen
    )
    worker = Worker(inherited, socket.socket(socket.AF_UNIX).detach())
    child = build_tree(config, MemoryReactorClock(), worker)
    assert child.warm is None
    assert "keep warm" not in child.namedServices


def test_a_record_that_is_not_ours_reads_as_none(tmp_path: Path) -> None:
    """read_record: no file, garbage or another shape: no images."""
    path = tmp_path / "warm.json"
    assert read_record(str(path)) == []
    path.write_text("not json")
    assert read_record(str(path)) == []
    path.write_text('{"images": [1, {"image": "x"}]}')
    assert read_record(str(path)) == [{"image": "x"}]
    assert warm_module.RECORD == "warm.json"


def test_a_refresh_ends_a_failed_checks_window_for_every_process(
    tmp_path: Path,
) -> None:
    """
    A pull's check failed at the origin (a 503): the tag's failed check is
    recorded for every process (``origin_retry``).  The origin back, a
    refresh's answer removes that record: no process waits out the window.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin})
    push(origin, 1)
    origin.fault = lambda request: (503, b"down for a moment")
    assert harness.request("GET", "/v2/app/manifests/latest").code == 502
    failures = Path(harness.store.root, "failures")
    assert [p for p in failures.rglob("*") if p.is_file()] != []
    origin.fault = None
    service = keep_warm(harness, "library/app:latest")
    advance(harness, FIRST_DELAY)
    assert state(service)["state"] == "ok"
    assert [p for p in failures.rglob("*") if p.is_file()] == []
    service.stopService()
