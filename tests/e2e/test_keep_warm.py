"""
Keeping images warm (``[namespace:NAME] keep_warm``), end to end: a real
``twistd`` mirror with a one-second ``keep_warm_interval`` in front of
Debian's docker-registry fills its cache before any client asks, follows a
tag that moves, notices a stale mirror with no pull at all, waits while a
rate-limited origin's back-off lasts, and takes a new list on SIGHUP with
worker processes beside it.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config_namespaces,
    poll_until,
)
from .images import Catalog, Image, assert_layout_matches, gzip_layer, single_arch_image
from .servers import FakeUpstream

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]
StartProgram = Callable[[FakeUpstream], FakeUpstream]

#: ``test/warm:latest`` at first, and after it moved
FIRST = single_arch_image(
    "test/warm",
    "latest",
    [gzip_layer({"warm.txt": b"the first build, kept warm\n"})],
    created="2024-01-01T00:00:00Z",
)
SECOND = single_arch_image(
    "test/warm",
    "latest",
    [
        gzip_layer({"warm.txt": b"the second build, kept warm\n"}),
        gzip_layer({"extra.txt": b"and a layer more\n"}),
    ],
    created="2024-02-01T00:00:00Z",
)
#: how long a condition that comes with a refresh is waited for
WAIT = 30.0


def config(
    port: int,
    upstreams: Mapping[str, str],
    origin: str,
    *,
    server: str = "",
    **namespace: str,
) -> str:
    """docker.io over *upstreams* (name → URL) in order, nothing pulled
    ahead (the upstreams see only what keep_warm and the clients ask for),
    tags reused for a minute, and *namespace*'s keys."""
    text = mirror_config_namespaces(
        port,
        {name: {"url": url} for name, url in upstreams.items()},
        {
            "docker.io": {
                "upstreams": " ".join(upstreams),
                "origin": origin,
                "default": "true",
                "prefetch": "0",
                **namespace,
            }
        },
        tag_ttl="60s",
    )
    return text.replace("[server]\n", f"[server]\n{server}\n", 1) if server else text


def status(mirror: MirrorProcess) -> dict[str, Any]:
    response = mirror.request("GET", "/_status.json")
    assert response.status == 200, response.body
    document: dict[str, Any] = response.json()
    return document


def warm_state(mirror: MirrorProcess, image: str) -> dict[str, Any] | None:
    for entry in status(mirror)["keep_warm"]:
        if entry["image"] == image:
            return entry
    return None


def wait_cached(mirror: MirrorProcess, image: Image) -> None:
    wanted = {blob.digest for blob in image.blobs}
    poll_until(
        lambda: wanted <= set(mirror.cached_blobs()),
        timeout=WAIT,
        describe=lambda: f"{image.root.digest} not kept warm:\n{mirror.log()}",
    )


def test_keep_warm_fills_the_cache_and_follows_a_moved_tag(
    tmp_path: Path,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    ``keep_warm = test/warm:latest`` every second: the image's config and
    layer are cached with no client asking; the tag is pushed anew at the
    origin (another image) and the new blobs arrive without a client; the
    status document shows the image ``ok`` with the new digest, and the
    refreshes are counted.  A pull afterwards gets the new image bit for bit
    and costs the origin no blob GET (each blob was fetched once, by the
    refresh).
    """
    origin = start_registry(storage=tmp_path / "origin-storage")
    skopeo.push_images(origin.host, [FIRST], tmp_path / "push-first")
    mirror = start_mirror(
        lambda port: config(
            port,
            {"origin": origin.url},
            "origin",
            keep_warm="test/warm:latest",
            keep_warm_interval="1s",
        )
    )
    wait_cached(mirror, FIRST)
    skopeo.push_images(origin.host, [SECOND], tmp_path / "push-second")
    wait_cached(mirror, SECOND)

    def refreshed() -> bool:
        state = warm_state(mirror, "test/warm:latest")
        return (
            state is not None
            and state["state"] == "ok"
            and state["digest"] == SECOND.root.digest
        )

    poll_until(refreshed, timeout=WAIT, describe=lambda: str(status(mirror)))
    assert mirror.metric(
        "regmirror_keep_warm_refreshes_total", namespace="docker.io", outcome="fetched"
    ) == pytest.approx(2)
    assert (
        mirror.metric(
            "regmirror_keep_warm_refreshes_total",
            namespace="docker.io",
            outcome="failed",
        )
        == 0
    )

    skopeo.pull(mirror.host, "test/warm:latest", tmp_path / "pulled", "latest")
    assert_layout_matches(tmp_path / "pulled", SECOND, "latest")
    log = "\n".join(origin.access_log())
    for blob in SECOND.blobs:
        assert origin.count_blob_gets(blob.digest) == 1, (blob.digest, log)


def test_a_refresh_detects_a_stale_mirror_before_anyone_pulls(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    Upstreams ``stale origin``: the mirror in front still tags an older
    build of ``test/small:latest``.  With the image kept warm and no client
    pulling, a refresh asks both, logs the stale mirror with both digests,
    counts it, and the status page lists it.
    """
    older = single_arch_image(
        "test/small",
        "latest",
        [gzip_layer({"hello.txt": b"an older hello, still on the mirror\n"})],
        created="2023-01-01T00:00:00Z",
    )
    origin = start_registry()
    stale = start_registry(storage=tmp_path / "stale-storage")
    skopeo.push_images(
        stale.host,
        [dataclasses.replace(catalog.small, tag="current"), older],
        tmp_path / "push",
    )
    mirror = start_mirror(
        lambda port: config(
            port,
            {"stale": stale.url, "origin": origin.url},
            "origin",
            keep_warm="test/small:latest",
            keep_warm_interval="1s",
        )
    )
    mirror.wait_for_log(
        rf"stale mirror stale: test/small:latest is {older.root.digest} there, "
        rf"{catalog.small.root.digest} at the origin",
        timeout=WAIT,
    )
    assert (
        mirror.metric(
            "regmirror_stale_detections_total", namespace="docker.io", mirror="stale"
        )
        >= 1
    )
    (namespace,) = status(mirror)["namespaces"]
    assert [(s["mirror"], s["theirs"]) for s in namespace["stale"]] == [
        ("stale", older.root.digest)
    ]
    wait_cached(mirror, catalog.small)


def test_a_rate_limited_origin_pauses_the_refreshes(
    tmp_path: Path,
    start_program: StartProgram,
    start_mirror: StartMirror,
) -> None:
    """
    The origin answers ``429`` with ``Retry-After: 30``: the first refresh
    asks once, then the image waits (``waiting``, rate limited) over several
    one-second intervals without asking again, and nothing counts as failed.
    """
    throttled = start_program(
        FakeUpstream(tmp_path / "throttled", status=429, retry_after="30")
    )
    mirror = start_mirror(
        lambda port: config(
            port,
            {"throttled": throttled.url},
            "throttled",
            keep_warm="test/warm:latest",
            keep_warm_interval="1s",
        )
    )

    def waiting() -> bool:
        state = warm_state(mirror, "test/warm:latest")
        return state is not None and state["state"] == "waiting"

    poll_until(waiting, timeout=WAIT, describe=lambda: str(status(mirror)))
    state = warm_state(mirror, "test/warm:latest")
    assert state is not None
    assert "rate limited" in state["detail"], state
    asked = len(throttled.records())
    assert asked == 1, throttled.records()
    time.sleep(3.5)  # three intervals and more: nothing is asked meanwhile
    assert len(throttled.records()) == asked, throttled.records()
    assert warm_state(mirror, "test/warm:latest") == state
    assert (
        mirror.metric(
            "regmirror_keep_warm_refreshes_total",
            namespace="docker.io",
            outcome="failed",
        )
        == 0
    )


def test_sighup_takes_a_new_list_and_one_process_refreshes(
    tmp_path: Path,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    A mirror with two worker processes beside it (``workers = 3``) and no
    ``keep_warm``: after the list is written into its file and SIGHUP, the
    image comes without a client; over the next seconds the origin sees
    one tag check per interval (the ``twistd`` process's), not one per
    process.
    """
    origin = start_registry(storage=tmp_path / "origin-storage")
    skopeo.push_images(origin.host, [FIRST], tmp_path / "push")

    def text(port: int, **keys: str) -> str:
        return config(
            port, {"origin": origin.url}, "origin", server="workers = 3", **keys
        )

    mirror = start_mirror(text)
    assert status(mirror)["keep_warm"] == []
    mirror.config_path.write_text(
        text(mirror.port, keep_warm="test/warm:latest", keep_warm_interval="1s")
    )
    mirror._process.send_signal(signal.SIGHUP)  # noqa: SLF001
    wait_cached(mirror, FIRST)
    checks = r"/v2/test/warm/manifests/latest"
    before = origin.count_requests("HEAD", checks)
    time.sleep(4.0)
    after = origin.count_requests("HEAD", checks)
    # One process: a check per second at most (three: about twelve).
    assert 1 <= after - before <= 6, (before, after)
