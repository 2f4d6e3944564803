"""
A tag past ``tag_ttl`` against an origin that became slow or silent, end
to end: ``stale_while_revalidate`` answers at once while one check runs
behind (and a tag gone at the origin stops being served), and with
``workers = 3`` a silent origin costs one wait per ``origin_retry`` on the
machine.  The origin is a ``docker-registry`` behind ``delay_relay.py``,
whose log counts every request as it arrives.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config,
    poll_until,
    stopped,
    workers_of,
)
from .images import (
    MANIFEST_ACCEPT,
    Catalog,
    assert_layout_matches,
    gzip_layer,
    single_arch_image,
)
from .servers import DelayRelay

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]
StartRelay = Callable[[DelayRelay], DelayRelay]

LATEST = "/v2/test/small/manifests/latest"
#: how long the slow origin takes: far longer than the concurrent pulls
#: take to be answered, shorter than the mirror's response_timeout (10 s)
SLOW = 6.0

#: ``test/small:latest`` built again: the tag moved at the origin
REBUILT = single_arch_image(
    "test/small",
    "latest",
    [gzip_layer({"hello.txt": b"a rebuilt hello from regmirror's e2e suite\n"})],
    created="2024-06-01T00:00:00Z",
)


def with_keys(config: str, **keys: str) -> str:
    """*config* (of :func:`mirror_config`) with more keys in its namespace."""
    extra = "".join(f"{key} = {value}\n" for key, value in keys.items())
    return config.replace("prefetch = 0\n", f"prefetch = 0\n{extra}")


def test_an_expired_tag_answers_at_once_while_a_slow_origin_is_asked_once(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    start_registry: StartRegistry,
    start_program: StartRelay,
    start_mirror: StartMirror,
) -> None:
    """
    ``tag_ttl = 1s``, ``stale_while_revalidate = 10m``.  ``test/small`` is
    pulled with skopeo; the tag is then moved at the origin, which now
    takes 6 s to answer.  Past ``tag_ttl``, 20 concurrent pulls of the tag
    are all answered ``revalidating`` with the digest the origin gave
    before (none waited for the origin, whose answer is the new digest),
    and the origin gets one HEAD for them; once it answered, skopeo pulls
    the new image.  Then the tag is deleted at the origin: the
    next pull past ``tag_ttl`` still gets the digest, the check behind it
    finds the tag gone, and the pull after it is a 404 ``MANIFEST_UNKNOWN``.
    """
    image = catalog.small
    origin = start_registry(storage=tmp_path / "origin-storage")
    skopeo.push_images(origin.host, [image], tmp_path / "push")
    relay = start_program(DelayRelay(tmp_path / "relay", origin.port))
    mirror = start_mirror(
        lambda port: with_keys(
            mirror_config(port, relay.url, tag_ttl="1s", prefetch=0),
            stale_while_revalidate="10m",
        )
    )
    skopeo.pull(mirror.host, image.reference, tmp_path / "before", image.tag)
    assert_layout_matches(tmp_path / "before", image, image.tag)
    assert relay.count("HEAD", "/manifests/latest") == 1

    skopeo.push_images(origin.host, [REBUILT], tmp_path / "push-rebuilt")
    relay.control(delay=SLOW)
    time.sleep(1.5)  # past tag_ttl
    answers: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()

    def pull() -> None:
        answer = mirror.request("GET", LATEST, {"Accept": MANIFEST_ACCEPT})
        with lock:
            answers.append(
                (
                    answer.status,
                    answer.header("Regmirror-Tag-Source"),
                    answer.header("Docker-Content-Digest"),
                )
            )

    pulls = [threading.Thread(target=pull, daemon=True) for _ in range(20)]
    for thread in pulls:
        thread.start()
    for thread in pulls:
        thread.join(timeout=30)
    assert answers == [(200, "revalidating", image.root.digest)] * 20, answers
    mirror.wait_for_log(r"test/small:latest checked behind its answer", timeout=30)
    assert relay.count("HEAD", "/manifests/latest") == 2
    assert origin.count_requests("HEAD", LATEST) == 2
    relay.control()
    skopeo.pull(mirror.host, REBUILT.reference, tmp_path / "after", REBUILT.tag)
    assert_layout_matches(tmp_path / "after", REBUILT, REBUILT.tag)

    relay.control(gone=r"/manifests/latest$")
    time.sleep(1.5)  # past tag_ttl
    stale = mirror.request("GET", LATEST, {"Accept": MANIFEST_ACCEPT})
    assert stale.header("Regmirror-Tag-Source") == "revalidating"
    assert stale.header("Docker-Content-Digest") == REBUILT.root.digest
    mirror.wait_for_log(r"test/small:latest is gone at the origin", timeout=30)
    gone = mirror.request("GET", LATEST, {"Accept": MANIFEST_ACCEPT})
    assert gone.status == 404, gone.body
    assert gone.error_codes() == ["MANIFEST_UNKNOWN"]


def manifest_then_pid(port: int) -> tuple[int, str | None, str | None, int]:
    """The tag's GET, then ``/_status.json`` on the same connection (so
    the same process): status, tag source, digest, and that process's pid."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
    try:
        connection.request("GET", LATEST, headers={"Accept": MANIFEST_ACCEPT})
        response = connection.getresponse()
        response.read()
        answer = (
            response.status,
            response.getheader("Regmirror-Tag-Source"),
            response.getheader("Docker-Content-Digest"),
        )
        connection.request("GET", "/_status.json")
        status = json.loads(connection.getresponse().read())
        return (*answer, int(status["pid"]))
    finally:
        connection.close()


def test_with_three_workers_a_silent_origin_costs_one_wait_per_window(
    tmp_path: Path,
    catalog: Catalog,
    start_registry: StartRegistry,
    start_program: StartRelay,
    start_mirror: StartMirror,
) -> None:
    """
    ``workers = 3``, ``tag_ttl = 1s``, ``origin_retry = 60s``; the origin's
    ``response_timeout = 2s`` and ``breaker_backoff = 1s`` (so that its
    breaker, shared too, lets a probe through within the window).  The
    origin falls silent; past ``tag_ttl`` the first pull waits for its
    timeout and is answered from the cache; past the breaker's back-off,
    pulls of the tag on separate connections, for 8 s and until each
    process answered several, are all answered from the cache with its
    digest at once, and the origin got no other HEAD: every process heeded
    the failed check the first one made.
    """
    image = catalog.small
    origin = start_registry()
    relay = start_program(DelayRelay(tmp_path / "relay", origin.port))

    def config(port: int) -> str:
        text = with_keys(
            mirror_config(port, relay.url, tag_ttl="1s", prefetch=0),
            origin_retry="60s",
        )
        text = text.replace("response_timeout = 10s", "response_timeout = 2s")
        text = text.replace(
            "idle_timeout = 10s", "idle_timeout = 10s\nbreaker_backoff = 1s"
        )
        return text.replace("[cache]", "workers = 3\n\n[cache]")

    mirror = start_mirror(config)
    poll_until(
        lambda: len(re.findall(r"worker \d+ serving", mirror.log())) == 2,
        timeout=30,
        describe=mirror.log,
    )
    first = mirror.request("GET", LATEST, {"Accept": MANIFEST_ACCEPT})
    assert first.status == 200, first.body
    assert relay.count("HEAD", "/manifests/latest") == 1

    relay.control(delay=3600)
    time.sleep(1.5)  # past tag_ttl
    waited = manifest_then_pid(mirror.port)
    assert waited[:3] == (200, "cache", image.root.digest), waited
    # Past the breaker's back-off: its probe would let a check through.
    time.sleep(1.5)
    started = time.monotonic()
    served = {waited[3]: 1}
    answers = set()
    for _ in range(300):
        status, source, digest, pid = manifest_then_pid(mirror.port)
        answers.add((status, source, digest))
        served[pid] = served.get(pid, 0) + 1
        if (
            len(served) == 3
            and min(served.values()) >= 3
            and time.monotonic() - started > 8
        ):
            break
        time.sleep(0.05)
    assert len(served) == 3 and min(served.values()) >= 3, served
    assert answers == {(200, "cache", image.root.digest)}, answers
    assert relay.count("HEAD", "/manifests/latest") == 2, (served, relay.records())


def test_with_two_workers_one_check_behind_answers_for_the_machine(
    tmp_path: Path,
    catalog: Catalog,
    start_registry: StartRegistry,
    start_program: StartRelay,
    start_mirror: StartMirror,
) -> None:
    """
    ``workers = 2``, ``tag_ttl = 1s``, ``stale_while_revalidate = 10m``; the
    origin then takes 6 s to answer.  Past ``tag_ttl``, the parent alone
    (the worker stopped) answers the tag ``revalidating`` and starts the
    check behind it; then the worker alone (the parent stopped) answers it
    ``revalidating`` too and starts none of its own, the parent's being
    under way: the origin gets one HEAD for the machine (two before: one
    check per process).
    """
    image = catalog.small
    origin = start_registry()
    relay = start_program(DelayRelay(tmp_path / "relay", origin.port))

    def config(port: int) -> str:
        text = with_keys(
            mirror_config(port, relay.url, tag_ttl="1s", prefetch=0),
            stale_while_revalidate="10m",
        )
        return text.replace("[cache]", "workers = 2\n\n[cache]")

    mirror = start_mirror(config)
    poll_until(
        lambda: (
            len(workers_of(mirror)) == 1
            and re.search(r"worker \d+ serving", mirror.log()) is not None
        ),
        timeout=30,
        describe=mirror.log,
    )
    assert mirror._process is not None
    parent, (worker,) = mirror._process.pid, workers_of(mirror)
    first = mirror.request("GET", LATEST, {"Accept": MANIFEST_ACCEPT})
    assert first.status == 200, first.body
    assert relay.count("HEAD", "/manifests/latest") == 1

    relay.control(delay=SLOW)
    time.sleep(1.5)  # past tag_ttl
    with stopped(worker):
        by_parent = manifest_then_pid(mirror.port)
    with stopped(parent):
        by_worker = manifest_then_pid(mirror.port)
    assert by_parent == (200, "revalidating", image.root.digest, parent)
    assert by_worker == (200, "revalidating", image.root.digest, worker)
    mirror.wait_for_log(r"test/small:latest checked behind its answer", timeout=30)
    assert relay.count("HEAD", "/manifests/latest") == 2, relay.records()
