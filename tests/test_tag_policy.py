"""
Freshness per namespace and per tag pattern (``tag_ttl``,
``immutable_tags``) and a failing origin's cost (``origin_retry``), in
memory: what the origin is asked, counted, as the clock moves.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import Harness, error_code, image, result
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Request

from regmirror.cli import main
from regmirror.config import DEFAULT_ORIGIN_RETRY, ConfigError
from regmirror.errors import UpstreamUnavailable
from regmirror.ini import load
from regmirror.pool import TagAnswer
from regmirror.reference import Digest, is_immutable, parse_digest
from regmirror.service import build_mirror
from regmirror.store import Store
from regmirror.tags import MAX_ANSWERS, MAX_FAILURES, Tags

DAY = 86400.0


def one(tmp_path: Path, **settings: dict[str, object]) -> tuple[Harness, FakeRegistry]:
    """A mirror whose docker.io namespace has one upstream, its origin."""
    origin = FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"origin": origin}, settings)
    return harness, origin


def two(tmp_path: Path) -> tuple[Harness, FakeRegistry, FakeRegistry]:
    """A mirror over a fake mirror registry first and an origin second."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"mirror": mirror_up, "origin": origin})
    return harness, mirror_up, origin


def tag_heads(fake: FakeRegistry, tag: str = "latest") -> int:
    return fake.count("HEAD", f"/manifests/{tag}")


def source(response: Any) -> list[str]:
    return list(response.headers.getRawHeaders("Regmirror-Tag-Source") or [])


def digest(response: Any) -> list[str]:
    return list(response.headers.getRawHeaders("Docker-Content-Digest") or [])


def pending(d: Deferred[Any]) -> list[Any]:
    """What *d* gave (nothing while it has not fired)."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    return outcome


def failing(request: Request) -> tuple[int, bytes]:
    return 500, b"oops"


# -- tag_ttl per namespace ----------------------------------------------------


def test_a_namespace_tag_ttl_overrides_the_cache_one(tmp_path: Path) -> None:
    """The harness's ``[cache] tag_ttl`` is 30 s; docker.io's own 120 s
    reuses the origin's answer for 120 s, and 5 s for 5 s."""
    harness, origin = one(tmp_path)
    pool = harness.router_pool("docker.io")
    image(origin)
    pool.tag_ttl = 120.0
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(119)
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["origin"]
    assert tag_heads(origin) == 1
    harness.clock.advance(1)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    assert tag_heads(origin) == 2

    pool.tag_ttl = 5.0
    image(origin, tag="v2")
    assert harness.request("GET", "/v2/app/manifests/v2").code == 200
    harness.clock.advance(4)
    assert harness.request("GET", "/v2/app/manifests/v2").code == 200
    assert tag_heads(origin, "v2") == 1
    harness.clock.advance(1)
    assert harness.request("GET", "/v2/app/manifests/v2").code == 200
    assert tag_heads(origin, "v2") == 2


def test_a_namespace_tag_ttl_holds_for_every_process(tmp_path: Path) -> None:
    """Another process (a second :class:`Tags` over the same cache folder)
    takes the recorded answer for the namespace's ``tag_ttl``, not the
    cache's."""
    harness, origin = one(tmp_path)
    pool = harness.router_pool("docker.io")
    pool.tag_ttl = 300.0
    image(origin)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(200)  # past the cache's 30 s, within the namespace's
    tags = harness.fetcher.tags
    other = Tags(harness.store, harness.clock, tags.manifests, tags.blobs, tags.metrics)
    answer = result(
        Deferred.fromCoroutine(other.resolve(pool, "library/app", "latest"))
    )
    assert answer.upstream == "origin"
    assert tag_heads(origin) == 1


# -- immutable_tags -------------------------------------------------------------


def test_immutable_patterns_are_shell_globs() -> None:
    """``v[0-9]* sha-*`` as documented: fnmatch, case-sensitive."""
    patterns = ("v[0-9]*", "sha-*")
    for tag in ("v1", "v1.2.3", "v2-alpine", "sha-3f2a9c1"):
        assert is_immutable(patterns, tag), tag
    for tag in ("latest", "version-1", "V1", "main", "sha", "xv1"):
        assert not is_immutable(patterns, tag), tag
    assert not is_immutable((), "v1")


def test_an_immutable_tag_is_asked_of_the_origin_once(tmp_path: Path) -> None:
    """A tag matching ``immutable_tags`` is resolved at the origin once
    (``origin``), then answered from the cache (``immutable``) however far
    the clock moves past ``tag_ttl`` and ``max_stale``, by this process and
    by another; a tag that does not match is asked again past ``tag_ttl``."""
    harness, origin = one(tmp_path)
    pool = harness.router_pool("docker.io")
    pool.immutable_tags = ("v[0-9]*", "sha-*")
    fixed = image(origin, tag="v1.2.3")
    image(origin, tag="latest")
    first = harness.request("GET", "/v2/app/manifests/v1.2.3")
    assert source(first) == ["origin"]
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    for _ in range(5):
        harness.clock.advance(30 * DAY)
        for method in ("GET", "HEAD"):
            again = harness.request(method, "/v2/app/manifests/v1.2.3")
            assert again.code == 200
            assert source(again) == ["immutable"]
            assert digest(again) == [fixed["manifest"]]
        assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    assert tag_heads(origin, "v1.2.3") == 1
    assert origin.count("GET", "/manifests/v1.2.3") == 0
    assert tag_heads(origin, "latest") == 6

    tags = harness.fetcher.tags
    other = Tags(harness.store, harness.clock, tags.manifests, tags.blobs, tags.metrics)
    answer = result(
        Deferred.fromCoroutine(other.resolve(pool, "library/app", "v1.2.3"))
    )
    assert answer.upstream == "immutable"
    assert tag_heads(origin, "v1.2.3") == 1


def test_an_immutable_tag_moved_upstream_is_not_followed(tmp_path: Path) -> None:
    """The point of an immutable tag: once resolved, the origin moving it
    changes nothing here until the record is purged."""
    harness, origin = one(tmp_path)
    harness.router_pool("docker.io").immutable_tags = ("v[0-9]*",)
    old = image(origin, tag="v1", created="2020-01-01T00:00:00Z")
    assert digest(harness.request("GET", "/v2/app/manifests/v1")) == [old["manifest"]]
    new = image(origin, tag="v1", created="2024-01-01T00:00:00Z")
    harness.clock.advance(DAY)
    assert digest(harness.request("GET", "/v2/app/manifests/v1")) == [old["manifest"]]
    # A purge (regmirror cache purge) removes the record; the running
    # process heeds it once its memory of the answer (tag_ttl) is over.
    assert harness.store.remove_tag("docker.io", "library/app", "v1")
    harness.clock.advance(30)
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert source(response) == ["origin"]
    assert digest(response) == [new["manifest"]]
    assert tag_heads(origin, "v1") == 2


def test_a_mirrors_answer_never_becomes_an_immutable_tags(tmp_path: Path) -> None:
    """With the origin failing at the first pull of an immutable tag, the
    mirror's answer serves (``freshest``) but is not kept as the tag's:
    once the origin answers again, its answer is asked for and kept."""
    harness, mirror_up, origin = two(tmp_path)
    harness.router_pool("docker.io").immutable_tags = ("v[0-9]*",)
    theirs = image(mirror_up, tag="v1", created="2024-01-01T00:00:00Z")
    ours = image(origin, tag="v1", created="2020-01-01T00:00:00Z")
    origin.fault = failing
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert source(response) == ["mirror"]
    assert digest(response) == [theirs["manifest"]]
    assert harness.store.tag("docker.io", "library/app", "v1") is None
    origin.fault = None
    harness.clock.advance(31)  # past origin_retry
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert source(response) == ["origin"]
    assert digest(response) == [ours["manifest"]]
    harness.clock.advance(DAY)
    response = harness.request("GET", "/v2/app/manifests/v1")
    assert source(response) == ["immutable"]
    assert digest(response) == [ours["manifest"]]


def test_housekeeping_keeps_an_immutable_tags_record_while_its_manifest_is_cached(
    tmp_path: Path,
) -> None:
    """Tag records older than ``max_stale`` expire, except an immutable
    tag's while the manifest it names is in the cache; evicted, its record
    expires too and the next pull asks the origin."""
    harness, origin = one(tmp_path)
    pool = harness.router_pool("docker.io")
    pool.immutable_tags = ("v[0-9]*",)
    fixed = image(origin, tag="v1")
    image(origin, tag="latest")
    assert harness.request("GET", "/v2/app/manifests/v1").code == 200
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(30 * DAY)

    def immutable(namespace: str, tag: str) -> bool:
        return namespace == "docker.io" and is_immutable(pool.immutable_tags, tag)

    cutoff = harness.clock.seconds() - 7 * DAY
    assert harness.store.expire_tags(cutoff, immutable) == 1
    assert harness.store.tag("docker.io", "library/app", "latest") is None
    assert harness.store.tag("docker.io", "library/app", "v1") is not None
    harness.store.remove(parse_digest(fixed["manifest"]))
    assert harness.store.expire_tags(cutoff, immutable) == 1
    assert harness.store.tag("docker.io", "library/app", "v1") is None
    harness.clock.advance(30)
    assert source(harness.request("GET", "/v2/app/manifests/v1")) == ["origin"]
    assert tag_heads(origin, "v1") == 2


# -- origin_retry ---------------------------------------------------------------


def _cached_then_expired(harness: Harness, origin: FakeRegistry) -> dict[str, str]:
    """``library/app:latest`` asked once while the origin answers, then the
    clock past the namespace's ``tag_ttl`` (1 s, so that no answer is
    reused for ``tag_ttl`` alone)."""
    harness.router_pool("docker.io").tag_ttl = 1.0
    content = image(origin)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(2)
    return content


def test_a_failing_origin_is_asked_once_per_origin_retry(tmp_path: Path) -> None:
    """The origin answering 500: the first pull past ``tag_ttl`` asks it
    and gets the cached digest; the pulls in the next 30 s
    (``origin_retry``) get it at once without asking; then the origin is
    asked again, once, and its answer ends the window."""
    harness, origin = one(tmp_path, origin={"breaker_failures": 100})
    content = _cached_then_expired(harness, origin)
    origin.fault = failing
    first = harness.request("GET", "/v2/app/manifests/latest")
    assert (source(first), digest(first)) == (["cache"], [content["manifest"]])
    assert tag_heads(origin) == 2
    for _ in range(29):
        harness.clock.advance(1)
        response = harness.request("GET", "/v2/app/manifests/latest")
        assert (source(response), digest(response)) == (
            ["cache"],
            [content["manifest"]],
        )
    assert tag_heads(origin) == 2
    harness.clock.advance(1)
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["cache"]
    assert tag_heads(origin) == 3
    origin.fault = None
    harness.clock.advance(30)
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["origin"]
    assert tag_heads(origin) == 4
    harness.clock.advance(2)
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["origin"]
    assert tag_heads(origin) == 5


def test_the_window_ends_once_the_origin_answers_again(tmp_path: Path) -> None:
    """The origin failing, then answering another request (a blob, its
    failures cleared): the tag's window ends there, the next pull asks the
    origin at once (seen end to end: readiness back, a pull still refused
    for the rest of the window)."""
    harness, origin = one(tmp_path, origin={"breaker_failures": 100})
    content = _cached_then_expired(harness, origin)
    origin.fault = failing
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["cache"]
    assert tag_heads(origin) == 2
    origin.fault = None
    harness.clock.advance(1)
    layer = harness.request("GET", f"/v2/app/blobs/{content['layer']}")
    assert layer.code == 200
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["origin"]
    assert tag_heads(origin) == 3


def test_a_silent_origin_costs_one_timeout_per_origin_retry(tmp_path: Path) -> None:
    """The origin accepting and never answering (``response_timeout`` 10 s,
    its breaker's back-off 5 s): the pulls arriving while the first check
    waits share its one timeout; those after it, through ``origin_retry``
    (longer than the breaker's back-off), answer at once with the cached
    digest, the origin not asked; after the window, asked again."""
    harness, origin = one(
        tmp_path, origin={"response_timeout": 10.0, "breaker_backoff": 5.0}
    )
    content = _cached_then_expired(harness, origin)
    origin.silent = True
    url = "http://mirror.test/v2/app/manifests/latest"
    waiting = [pending(harness.client.get(url)) for _ in range(3)]
    harness.settle()
    assert waiting == [[], [], []]
    assert tag_heads(origin) == 2
    harness.clock.advance(10)
    harness.settle()
    for (response,) in waiting:
        assert (source(response), digest(response)) == (
            ["cache"],
            [content["manifest"]],
        )
    for step in (1, 5, 6, 7):  # 1, 6, 12, 19 s on: past the breaker's back-off
        harness.clock.advance(step)
        response = harness.request("GET", "/v2/app/manifests/latest")
        assert source(response) == ["cache"]
    assert tag_heads(origin) == 2
    harness.clock.advance(11)  # 30 s after the failure
    later = pending(harness.client.get(url))
    harness.settle()
    assert later == []
    assert tag_heads(origin) == 3
    harness.clock.advance(10)
    harness.settle()
    assert source(later[0]) == ["cache"]


def test_a_rate_limited_origin_is_not_asked_within_origin_retry(
    tmp_path: Path,
) -> None:
    """A 429 with ``Retry-After: 1``: the upstream's own back-off is over
    in a second, the tag's check is not repeated for ``origin_retry``."""
    harness, origin = one(tmp_path)
    content = _cached_then_expired(harness, origin)

    def limited(request: Request) -> tuple[int, bytes]:
        request.setHeader("Retry-After", "1")
        return 429, b"slow down"

    origin.fault = limited
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert digest(response) == [content["manifest"]]
    for _ in range(5):
        harness.clock.advance(5)
        response = harness.request("GET", "/v2/app/manifests/latest")
        assert (source(response), digest(response)) == (
            ["cache"],
            [content["manifest"]],
        )
    assert tag_heads(origin) == 2
    harness.clock.advance(6)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    assert tag_heads(origin) == 3


def test_origin_retry_under_fail_is_503_without_asking(tmp_path: Path) -> None:
    """``origin_unreachable = fail``: the failing check answers the
    origin's error (502); pulls in the window get the same error, with
    ``Retry-After``, the origin not asked."""
    harness, origin = one(tmp_path, origin={"breaker_failures": 100})
    pool = harness.router_pool("docker.io")
    pool.origin_unreachable = "fail"
    _cached_then_expired(harness, origin)
    origin.fault = failing
    assert harness.request("GET", "/v2/app/manifests/latest").code == 502
    harness.clock.advance(10)
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code == 502
    assert response.headers.getRawHeaders("Retry-After") == ["20"]
    assert error_code(harness, response) == "UNAVAILABLE"
    assert tag_heads(origin) == 2


def test_origin_retry_zero_asks_at_every_pull(tmp_path: Path) -> None:
    """``origin_retry = 0s`` keeps the behaviour before it: every pull past
    ``tag_ttl`` asks the failing origin."""
    harness, origin = one(tmp_path, origin={"breaker_failures": 100})
    harness.router_pool("docker.io").origin_retry = 0.0
    _cached_then_expired(harness, origin)
    origin.fault = failing
    for _ in range(4):
        assert harness.request("GET", "/v2/app/manifests/latest").code == 200
        harness.clock.advance(2)
    assert tag_heads(origin) == 5


def test_failed_checks_remembered_are_bounded(tmp_path: Path) -> None:
    """Clients choose the tags: 100,000 distinct tags the origin failed on
    leave :data:`MAX_FAILURES` remembered, the newest."""
    harness, _ = one(tmp_path)
    pool = harness.router_pool("docker.io")
    tags = harness.fetcher.tags
    down = UpstreamUnavailable("down")
    for n in range(100_000):
        tags._failed(("docker.io", "library/app", f"t{n}"), pool, down)
    assert len(tags._failures) == MAX_FAILURES
    assert ("docker.io", "library/app", "t99999") in tags._failures
    assert ("docker.io", "library/app", "t0") not in tags._failures
    for n in range(100_000):
        tags._remember(
            ("docker.io", "library/app", f"t{n}"),
            TagAnswer(Digest.of(b"x"), "origin"),
            1.0,
        )
    assert len(tags._answers) == MAX_ANSWERS


# -- the configuration ------------------------------------------------------------

CONFIG_TEXT = """\
[cache]
directory = cache
tag_ttl = 60s

[upstream:hub]
url = https://registry-1.docker.io

[upstream:ghcr]
url = https://ghcr.io

[namespace:docker.io]
upstreams = hub
default = true
tag_ttl = 5m
immutable_tags = v[0-9]*
    sha-*
origin_retry = 45s

[namespace:ghcr.io]
upstreams = ghcr
"""


def test_the_keys_are_read_per_namespace_and_reach_the_pools(tmp_path: Path) -> None:
    """``[namespace:NAME] tag_ttl``, ``immutable_tags`` and ``origin_retry``
    are read (defaults: the cache's ``tag_ttl``, none, 30 s) and given to
    each namespace's pool."""
    path = tmp_path / "mirror.ini"
    path.write_text(CONFIG_TEXT, encoding="utf-8")
    config = load(str(path))
    hub, ghcr = config.namespaces
    assert (hub.tag_ttl, hub.immutable_tags, hub.origin_retry) == (
        300.0,
        ("v[0-9]*", "sha-*"),
        45.0,
    )
    assert (ghcr.tag_ttl, ghcr.immutable_tags, ghcr.origin_retry) == (
        None,
        (),
        DEFAULT_ORIGIN_RETRY,
    )
    assert DEFAULT_ORIGIN_RETRY == 30.0
    mirror = build_mirror(config, MemoryReactorClock())
    pools = {pool.namespace: pool for pool in mirror.pools}
    assert pools["docker.io"].immutable("v1.2.3")
    assert not pools["docker.io"].immutable("latest")
    assert not pools["ghcr.io"].immutable("v1")
    tags = mirror.fetcher.tags
    assert tags.ttl_for(pools["docker.io"]) == 300.0
    assert tags.ttl_for(pools["ghcr.io"]) == 60.0
    assert pools["docker.io"].origin_retry == 45.0


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("immutable_tags = v1/*", "immutable_tags"),
        ("immutable_tags = v1,v2", "immutable_tags"),
        ("origin_retry = soon", "origin_retry"),
        ("tag_ttl = -1s", "tag_ttl"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(
    tmp_path: Path, line: str, key: str
) -> None:
    """A pattern with what no tag holds, or a duration that is none, is
    refused naming ``[namespace:docker.io]`` and the key."""
    path = tmp_path / "mirror.ini"
    path.write_text(CONFIG_TEXT.replace("origin_retry = 45s", line), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    text = str(info.value)
    assert "\n" not in text
    assert "namespace:docker.io" in text and key in text, text


def test_cache_gc_keeps_an_immutable_tag_and_purge_removes_it(tmp_path: Path) -> None:
    """``regmirror cache gc`` expires tag records older than ``max_stale``
    but an immutable tag's whose manifest is cached; ``regmirror cache
    purge`` removes that one."""
    path = tmp_path / "mirror.ini"
    path.write_text(
        CONFIG_TEXT.replace("origin_retry = 45s", "max_stale = 1d"), encoding="utf-8"
    )
    store = Store(str(tmp_path / "cache"))
    store.open()
    body = b'{"schemaVersion":2,"layers":[]}'
    manifest = Digest.of(body)
    store.put_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", body)
    for tag in ("v1", "latest"):
        store.set_tag("docker.io", "library/busybox", tag, manifest, confirmed=0.0)
    out = io.StringIO()
    assert main(["cache", "gc", "-c", str(path), "--json"], out) == 0
    assert json.loads(out.getvalue())["expired_tags"] == 1
    assert store.tag("docker.io", "library/busybox", "latest") is None
    assert store.tag("docker.io", "library/busybox", "v1") is not None
    out = io.StringIO()
    assert main(["cache", "purge", "-c", str(path), "busybox:v1"], out) == 0
    assert "removed busybox:v1" in out.getvalue()
    assert store.tag("docker.io", "library/busybox", "v1") is None
