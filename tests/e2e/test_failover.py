"""
Failover and the stale-mirror defence, end to end, with real registries:
a mirror whose tag is out of date, a mirror that is not running at all, and
the origin; then the origin stopped with ``origin_unreachable = freshest``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    free_port,
    mirror_config_namespaces,
    poll_until,
    port_is_free,
)
from .images import (
    MANIFEST_ACCEPT,
    Catalog,
    assert_layout_matches,
    gzip_layer,
    single_arch_image,
    uncompressed_layer,
)

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]

#: ``test/small:latest`` as it was before the catalog's (image A) was built
OLDER = single_arch_image(
    "test/small",
    "latest",
    [
        gzip_layer({"hello.txt": b"an older hello from regmirror's e2e suite\n"}),
        uncompressed_layer({"etc/small.conf": b"answer = 41\n"}),
    ],
    created="2023-01-01T00:00:00Z",
)
#: a build of ``test/small:latest`` newer than image A
NEWER = single_arch_image(
    "test/small",
    "latest",
    [gzip_layer({"hello.txt": b"a newer hello from regmirror's e2e suite\n"})],
    created="2024-06-01T00:00:00Z",
)
#: the newest build of all, which the origin rolled ``latest`` back from
ROLLED_BACK = single_arch_image(
    "test/small",
    "latest",
    [gzip_layer({"hello.txt": b"a broken release, withdrawn at the origin\n"})],
    created="2025-01-01T00:00:00Z",
)

#: twistd's text log writes "<time> [<namespace>#<level>] <message>"
WARN = r"#warn\]"


def _blob_gets(registry: RegistryProcess, repository: str) -> int:
    return registry.count_requests("GET", rf"/v2/{re.escape(repository)}/blobs/\S+")


def _closed_port() -> int:
    port = free_port()
    assert port_is_free(port)
    return port


def test_fresh_tag_wins_blobs_from_stale_mirror_dead_mirror_skipped(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    Upstreams ``stale dead origin``: the origin's ``test/small:latest`` is
    image A; ``stale`` still tags an older image B but holds A by digest;
    ``dead`` listens nowhere.  Every pull by tag gets A
    (``Regmirror-Tag-Source: origin``); the log names ``stale`` with both
    digests and the stale-detection counter counts it; A's blobs all come
    from ``stale`` (the first upstream holding them), none from the origin;
    ``dead`` is marked down after its first refused connection and not
    tried again within its back-off, however many pulls follow.
    """
    image = catalog.small
    origin = start_registry()
    stale = start_registry(storage=tmp_path / "stale-storage")
    skopeo.push_images(
        stale.host, [dataclasses.replace(image, tag="a"), OLDER], tmp_path / "push"
    )
    stale_mark = len(stale.access_log())
    dead_port = _closed_port()
    mirror = start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {
                "stale": {"url": stale.url},
                "dead": {"url": f"http://127.0.0.1:{dead_port}"},
                "origin": {"url": origin.url},
            },
            {
                "docker.io": {
                    "upstreams": "stale dead origin",
                    "origin": "origin",
                    "default": "true",
                }
            },
        )
    )

    skopeo.pull(mirror.host, image.reference, tmp_path / "first", "latest")
    assert_layout_matches(tmp_path / "first", image, "latest")

    lines = mirror.wait_for_log(
        rf"{WARN}.*stale mirror stale: test/small:latest is {OLDER.root.digest} "
        rf"there, {image.root.digest} at the origin"
    )
    assert len(lines) >= 1
    down = mirror.wait_for_log(rf"{WARN}.*upstream dead marked down for \d+s")
    assert len(down) == 1, down
    assert mirror.metric("regmirror_upstream_errors_total", upstream="dead") == 1

    skopeo.pull(mirror.host, image.reference, tmp_path / "second", "latest")
    assert_layout_matches(tmp_path / "second", image, "latest")
    for method in ("HEAD", "GET"):
        response = mirror.request(
            method, "/v2/test/small/manifests/latest", {"Accept": MANIFEST_ACCEPT}
        )
        assert response.status == 200, (method, response.body)
        assert response.header("Docker-Content-Digest") == image.root.digest
        assert response.header("Regmirror-Tag-Source") == "origin"
        if method == "GET":
            assert response.body == image.root.data

    assert mirror.metric("regmirror_upstream_errors_total", upstream="dead") == 1
    assert len(mirror.wait_for_log(r"upstream dead marked down")) == 1
    assert (
        mirror.metric(
            "regmirror_stale_detections_total", namespace="docker.io", mirror="stale"
        )
        >= 1
    )
    origin_log = "\n".join(origin.access_log())
    assert _blob_gets(origin, "test/small") == 0, origin_log
    assert origin.count_requests("HEAD", "/v2/test/small/manifests/latest") >= 4
    stale_log = "\n".join(stale.access_log()[stale_mark:])
    for blob in image.blobs:
        assert stale.count_blob_gets(blob.digest) >= 1, (blob.digest, stale_log)
    assert _blob_gets(stale, "test/small") >= len(image.blobs), stale_log
    for blob in OLDER.blobs:
        assert blob.digest not in mirror.cached_blobs()


def test_origin_down_freshest_takes_newest_non_stale_mirror(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    Upstreams ``stale fresh origin`` with ``origin_unreachable = freshest``.
    While the origin answers, ``test/small:latest`` is image A (``fresh``
    agrees; ``stale`` still has a newer release the origin withdrew, and is
    recorded as stale).  With the origin stopped and ``fresh`` now holding
    a build newer than A, the tag is answered with that build and
    ``Regmirror-Tag-Source: fresh``: newer than the cached A, and the stale
    mirror's even newer image is not used.
    """
    image = catalog.small
    origin = start_registry()
    stale = start_registry(storage=tmp_path / "stale-storage")
    fresh = start_registry(storage=tmp_path / "fresh-storage")
    skopeo.push_images(stale.host, [ROLLED_BACK], tmp_path / "push-stale")
    skopeo.push_images(fresh.host, [image], tmp_path / "push-fresh")
    mirror = start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {
                "stale": {"url": stale.url},
                "fresh": {"url": fresh.url},
                "origin": {"url": origin.url},
            },
            {
                "docker.io": {
                    "upstreams": "stale fresh origin",
                    "origin": "origin",
                    "default": "true",
                    "origin_unreachable": "freshest",
                }
            },
        )
    )
    path = "/v2/test/small/manifests/latest"
    first = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
    assert first.status == 200, first.body
    assert first.header("Docker-Content-Digest") == image.root.digest
    assert first.header("Regmirror-Tag-Source") == "origin"
    mirror.wait_for_log(
        rf"{WARN}.*stale mirror stale: test/small:latest is {ROLLED_BACK.root.digest}"
    )
    assert not [x for x in mirror.log_lines() if "stale mirror fresh" in x]

    origin.stop()
    assert not origin.running
    skopeo.push_images(fresh.host, [NEWER], tmp_path / "push-newer")

    answer = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
    assert answer.status == 200, answer.body
    assert answer.header("Regmirror-Tag-Source") == "fresh", mirror.log()
    assert answer.header("Docker-Content-Digest") == NEWER.root.digest
    assert answer.body == NEWER.root.data
    skopeo.pull(mirror.host, image.reference, tmp_path / "newer", "latest")
    assert_layout_matches(tmp_path / "newer", NEWER, "latest")
    mirror.wait_for_log(
        rf"{WARN}.*origin unreachable .*test/small:latest answered by fresh "
        rf"as {NEWER.root.digest}"
    )


def _tag_then_status(port: int, path: str) -> tuple[int, dict[str, str], Any]:
    """A manifest GET of *path*, then ``/_status.json`` on the same
    connection (so from the same process): the answer's status and
    headers, and that process's status document."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
    try:
        connection.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        response = connection.getresponse()
        response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        connection.request("GET", "/_status.json")
        status = json.loads(connection.getresponse().read())
        return response.status, headers, status
    finally:
        connection.close()


def test_a_stale_mirror_is_stale_for_every_worker_process(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    With ``workers = 3``, ``tag_ttl = 1s`` and upstreams ``stale origin``:
    one pull of ``test/small:latest`` is answered by the origin, and the
    process that asked logs ``stale`` as stale (it has an older image under
    the tag).  With the origin stopped, every process answers the tag from
    the cache with the origin's digest, none with the stale mirror's, and
    every process's status page lists the stale mirror: what one process
    learnt holds for all of them.
    """
    image = catalog.small
    origin = start_registry()
    stale = start_registry(storage=tmp_path / "stale-storage")
    skopeo.push_images(stale.host, [OLDER], tmp_path / "push-stale")
    mirror = start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {"stale": {"url": stale.url}, "origin": {"url": origin.url}},
            {
                "docker.io": {
                    "upstreams": "stale origin",
                    "origin": "origin",
                    "default": "true",
                }
            },
            tag_ttl="1s",
        ).replace("[cache]", "workers = 3\n\n[cache]")
    )
    poll_until(
        lambda: len(re.findall(r"worker \d+ serving", mirror.log())) == 2,
        timeout=30,
        describe=mirror.log,
    )
    path = "/v2/test/small/manifests/latest"
    first = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
    assert first.status == 200, first.body
    assert first.header("Regmirror-Tag-Source") == "origin"
    mirror.wait_for_log(
        rf"{WARN}.*stale mirror stale: test/small:latest is {OLDER.root.digest}"
    )
    origin.stop()
    time.sleep(1.5)  # past tag_ttl: the origin is asked, and is gone

    answered: dict[int, list[tuple[str | None, str | None]]] = {}
    for _ in range(60):
        status, headers, document = _tag_then_status(mirror.port, path)
        assert status == 200, (status, mirror.log())
        source = headers.get("regmirror-tag-source")
        digest = headers.get("docker-content-digest")
        assert (source, digest) == ("cache", image.root.digest), document["pid"]
        answered.setdefault(document["pid"], []).append((source, digest))
        (namespace,) = document["namespaces"]
        assert [(s["mirror"], s["repository"]) for s in namespace["stale"]] == [
            ("stale", "test/small")
        ], (document["pid"], namespace["stale"])
        if len(answered) == 3 and min(map(len, answered.values())) >= 2:
            break
    assert len(answered) == 3, answered


@pytest.mark.parametrize(
    ("policy", "known", "unknown"),
    [("freshest", 200, 404), ("cache", 503, 503), ("fail", 503, 503)],
)
def test_origin_down_tags_never_seen(
    start_registry: StartRegistry,
    start_mirror: StartMirror,
    catalog: Catalog,
    policy: str,
    known: int,
    unknown: int,
) -> None:
    """
    Upstreams ``mirror origin``, the origin not listening, nothing cached.
    With ``origin_unreachable = freshest`` (the default) a tag the mirror
    has is answered by it (``Regmirror-Tag-Source: mirror``), and a tag it
    lacks too is ``404 MANIFEST_UNKNOWN`` (it was a 500); with ``cache`` or
    ``fail``, whose answers never come from a mirror, both are ``503``:
    the origin is unreachable.
    """
    image = catalog.small
    mirror_registry = start_registry()
    origin_port = _closed_port()
    mirror = start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {
                "mirror": {"url": mirror_registry.url},
                "origin": {"url": f"http://{LOCALHOST}:{origin_port}"},
            },
            {
                "docker.io": {
                    "upstreams": "mirror origin",
                    "origin": "origin",
                    "default": "true",
                    "origin_unreachable": policy,
                }
            },
        )
    )
    answer = mirror.request(
        "GET",
        f"/v2/{image.repository}/manifests/{image.tag}",
        {"Accept": MANIFEST_ACCEPT},
    )
    assert answer.status == known, answer.body
    if known == 200:
        assert answer.header("Regmirror-Tag-Source") == "mirror"
        assert answer.header("Docker-Content-Digest") == image.root.digest
    else:
        assert answer.error_codes() == ["UNAVAILABLE"], answer.body
    missing = mirror.request(
        "GET", "/v2/library/neverseen/manifests/v1", {"Accept": MANIFEST_ACCEPT}
    )
    assert missing.status == unknown, missing.body
    codes = ["MANIFEST_UNKNOWN"] if unknown == 404 else ["UNAVAILABLE"]
    assert missing.error_codes() == codes, missing.body
    assert "AttributeError" not in mirror.log()


def test_immutable_tag_asked_once_and_a_down_origin_costs_one_attempt_per_window(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    ``tag_ttl = 1s``, ``immutable_tags = v[0-9]*``, ``origin_retry = 30s``
    and the origin's ``breaker_backoff = 1s``.  ``test/small:v1`` is asked
    of the origin once (its access log), then answered ``immutable`` past
    ``tag_ttl``; ``latest`` is asked again past it.  With the origin
    stopped, pulls of ``latest`` over three seconds (past ``tag_ttl`` and
    the breaker's back-off, within ``origin_retry``) are all answered from
    the cache with its digest after one failed attempt; ``v1`` still
    answers ``immutable``.
    """
    image = catalog.small
    origin = start_registry(storage=tmp_path / "origin-storage")
    skopeo.push_images(
        origin.host, [image, dataclasses.replace(image, tag="v1")], tmp_path / "push"
    )
    mirror = start_mirror(
        lambda port: mirror_config_namespaces(
            port,
            {"origin": {"url": origin.url, "breaker_backoff": "1s"}},
            {
                "docker.io": {
                    "upstreams": "origin",
                    "default": "true",
                    "immutable_tags": "v[0-9]*",
                    "origin_retry": "30s",
                }
            },
            tag_ttl="1s",
        )
    )
    v1, latest = "/v2/test/small/manifests/v1", "/v2/test/small/manifests/latest"
    first = mirror.request("GET", v1, {"Accept": MANIFEST_ACCEPT})
    assert first.status == 200, first.body
    assert first.header("Regmirror-Tag-Source") == "origin"
    assert mirror.request("GET", latest, {"Accept": MANIFEST_ACCEPT}).status == 200
    time.sleep(1.5)  # past tag_ttl
    for method in ("GET", "HEAD"):
        again = mirror.request(method, v1, {"Accept": MANIFEST_ACCEPT})
        assert again.status == 200, again.body
        assert again.header("Regmirror-Tag-Source") == "immutable"
        assert again.header("Docker-Content-Digest") == image.root.digest
    assert mirror.request("GET", latest, {"Accept": MANIFEST_ACCEPT}).status == 200
    assert origin.count_requests("HEAD", "/v2/test/small/manifests/v1") == 1
    assert origin.count_requests("HEAD", "/v2/test/small/manifests/latest") == 2

    origin.stop()
    time.sleep(1.5)  # past tag_ttl again
    deadline = time.monotonic() + 3
    pulls = 0
    while time.monotonic() < deadline:
        answer = mirror.request("GET", latest, {"Accept": MANIFEST_ACCEPT})
        assert answer.status == 200, (answer.body, mirror.log())
        assert answer.header("Regmirror-Tag-Source") == "cache"
        assert answer.header("Docker-Content-Digest") == image.root.digest
        pulls += 1
        time.sleep(0.1)
    assert pulls >= 10
    assert mirror.metric("regmirror_upstream_errors_total", upstream="origin") == 1
    assert len(mirror.wait_for_log(rf"{WARN}.*origin unreachable")) == 1
    still = mirror.request("GET", v1, {"Accept": MANIFEST_ACCEPT})
    assert still.header("Regmirror-Tag-Source") == "immutable"
