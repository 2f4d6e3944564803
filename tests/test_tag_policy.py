"""
Freshness per namespace and per tag pattern (``tag_ttl``,
``immutable_tags``, ``stale_while_revalidate``) and a failing origin's
cost (``origin_retry``, shared by the processes), in memory: what the
origin is asked, counted, as the clock moves.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import Harness, error_code, image, result
from test_fetch_cluster import Cluster
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent
from twisted.web.server import NOT_DONE_YET, Request

from regmirror import failures
from regmirror.cli import main
from regmirror.config import DEFAULT_ORIGIN_RETRY, ConfigError
from regmirror.errors import ManifestUnknown, UpstreamUnavailable
from regmirror.ini import load
from regmirror.pool import TagAnswer
from regmirror.reference import Digest, is_immutable, parse_digest
from regmirror.service import build_mirror
from regmirror.store import Store
from regmirror.tags import MAX_ANSWERS, Tags

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


def test_retry_after_is_not_before_the_origins_429_back_off(tmp_path: Path) -> None:
    """``origin_unreachable = fail``, ``origin_retry`` 30 s, the origin
    answering 429 with ``Retry-After: 60``: pulls in the window are told to
    come back when the origin may be asked again (60 s), not when the
    window ends (a client back sooner met another 429; found by the
    fresh-eyes review)."""
    harness, origin = one(tmp_path, origin={"breaker_failures": 100})
    pool = harness.router_pool("docker.io")
    pool.origin_unreachable = "fail"
    _cached_then_expired(harness, origin)

    def limited(request: Request) -> tuple[int, bytes]:
        request.setHeader("Retry-After", "60")
        return 429, b"slow down"

    origin.fault = limited
    assert harness.request("GET", "/v2/app/manifests/latest").code == 429
    harness.clock.advance(10)
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.headers.getRawHeaders("Retry-After") == ["50"]


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


def test_failed_checks_remembered_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients choose the tags: far more distinct tags the origin failed
    on than :data:`MAX_FAILURES` (made 100 here) leave at most that many
    remembered, in memory and in the namespace's folder, the newest kept;
    answers remembered are bounded by :data:`MAX_ANSWERS`."""
    monkeypatch.setattr(failures, "MAX_FAILURES", 100)
    harness, _ = one(tmp_path)
    pool = harness.router_pool("docker.io")
    tags = harness.fetcher.tags
    down = UpstreamUnavailable("down")
    for n in range(1_000):
        tags._failed(("docker.io", "library/app", f"t{n}"), pool, down)
    assert len(tags._failures) == 100
    assert ("docker.io", "library/app", "t999") in tags._failures
    assert ("docker.io", "library/app", "t0") not in tags._failures
    folder = Path(harness.store.root) / "failures" / "docker.io"
    assert 90 <= len(list(folder.iterdir())) <= 100
    other = failures.FailedChecks(str(Path(harness.store.root) / "failures"))
    assert other.get(("docker.io", "library/app", "t999")) is not None
    assert other.get(("docker.io", "library/app", "t0")) is None
    for n in range(100_000):
        tags._remember(
            ("docker.io", "library/app", f"t{n}"),
            TagAnswer(Digest.of(b"x"), "origin"),
            1.0,
        )
    assert len(tags._answers) == MAX_ANSWERS


# -- stale_while_revalidate ------------------------------------------------------


class SlowOrigin(FakeRegistry):
    """A fake registry whose every answer takes :attr:`delay` seconds of
    *clock* (0: at once); each request counted once, on arrival."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.delay = 0.0
        self._due: set[Request] = set()

    def render(self, request: Request) -> Any:
        if request in self._due:
            self._due.discard(request)
            counted, self.requests = self.requests, []
            try:
                return super().render(request)
            finally:
                self.requests = counted
        if not self.delay:
            return super().render(request)
        self.requests.append((request.method.decode(), request.path.decode()))
        self._due.add(request)
        self.clock.callLater(self.delay, request.render, self)
        return NOT_DONE_YET


def slow(tmp_path: Path, window: float = 600.0) -> tuple[Harness, SlowOrigin]:
    """A mirror over a :class:`SlowOrigin` (answering at once for now):
    docker.io's ``tag_ttl`` 1 s, ``stale_while_revalidate`` *window*."""
    clock = Clock()
    origin = SlowOrigin(clock)
    harness = Harness(str(tmp_path / "cache"), {"origin": origin}, clock=clock)
    pool = harness.router_pool("docker.io")
    pool.tag_ttl = 1.0
    pool.stale_while_revalidate = window
    return harness, origin


def test_within_the_window_an_expired_tag_answers_at_once_and_is_checked_once(
    tmp_path: Path,
) -> None:
    """
    The issue's target: the origin taking a second to answer, 100 pulls of
    a tag past ``tag_ttl`` and within ``stale_while_revalidate`` are all
    answered before the clock moves, ``revalidating``, with the digest the
    origin last gave (the tag moved there meanwhile), and the origin gets
    one HEAD for them.  Once it answered, the next pull gets its new
    answer from memory (``origin``), without asking again.  An immutable
    tag is answered ``immutable`` as before, never checked.
    """
    harness, origin = slow(tmp_path)
    harness.router_pool("docker.io").immutable_tags = ("v[0-9]*",)
    old = image(origin, created="2020-01-01T00:00:00Z")
    fixed = image(origin, tag="v1")
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["origin"]
    assert source(harness.request("GET", "/v2/app/manifests/v1")) == ["origin"]
    harness.clock.advance(2)
    new = image(origin, created="2024-01-01T00:00:00Z")
    origin.delay = 1.0
    url = "http://mirror.test/v2/app/manifests/latest"
    pulls = [pending(harness.client.get(url)) for _ in range(100)]
    immutable = pending(harness.client.get("http://mirror.test/v2/app/manifests/v1"))
    harness.settle()
    for (response,) in pulls:
        assert response.code == 200
        assert (source(response), digest(response)) == (
            ["revalidating"],
            [old["manifest"]],
        )
    assert (source(immutable[0]), digest(immutable[0])) == (
        ["immutable"],
        [fixed["manifest"]],
    )
    assert tag_heads(origin) == 2
    assert tag_heads(origin, "v1") == 1
    harness.clock.advance(1)
    harness.settle()
    origin.delay = 0.0  # the new manifest, fetched by digest
    answered = harness.request("GET", "/v2/app/manifests/latest")
    assert (source(answered), digest(answered)) == (["origin"], [new["manifest"]])
    assert tag_heads(origin) == 2
    record = harness.store.tag("docker.io", "library/app", "latest")
    assert record is not None and str(record.digest) == new["manifest"]


def test_past_the_window_a_pull_waits_for_the_origin(tmp_path: Path) -> None:
    """Past ``tag_ttl`` + ``stale_while_revalidate`` (1 + 10 s) the pull
    waits for the origin's answer, as without a window; within it, it
    does not."""
    harness, origin = slow(tmp_path, window=10.0)
    image(origin)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    origin.delay = 1.0
    harness.clock.advance(10.5)
    within = pending(harness.client.get("http://mirror.test/v2/app/manifests/latest"))
    harness.settle()
    assert source(within[0]) == ["revalidating"]
    harness.clock.advance(1)  # the check behind it answered: confirmed now
    harness.settle()
    harness.clock.advance(11)
    url = "http://mirror.test/v2/app/manifests/latest"
    waiting = pending(harness.client.get(url))
    harness.settle()
    assert waiting == []
    assert tag_heads(origin) == 3
    harness.clock.advance(1)
    harness.settle()
    assert source(waiting[0]) == ["origin"]


def test_a_tag_the_check_behind_finds_gone_is_not_served_again(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """The tag deleted at the origin: the pull within the window gets the
    old digest, the check behind it gets a 404, and from then on the tag
    is unknown here too (404 ``MANIFEST_UNKNOWN``, asked of the origin),
    in this process and in another over the same cache folder: its record
    is gone.  Said in the log."""
    harness, origin = slow(tmp_path)
    image(origin)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(2)
    del origin.tags[("library/app", "latest")]
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == [
        "revalidating"
    ]
    assert harness.store.tag("docker.io", "library/app", "latest") is None
    gone = harness.request("GET", "/v2/app/manifests/latest")
    assert gone.code == 404
    assert error_code(harness, gone) == "MANIFEST_UNKNOWN"
    assert tag_heads(origin) == 3
    tags = harness.fetcher.tags
    other = Tags(harness.store, harness.clock, tags.manifests, tags.blobs, tags.metrics)
    pool = harness.router_pool("docker.io")
    elsewhere = Deferred.fromCoroutine(other.resolve(pool, "library/app", "latest"))
    harness.settle()
    assert isinstance(pending(elsewhere)[0].value, ManifestUnknown)
    assert any("gone at the origin" in (formatEvent(event) or "") for event in logged)


def test_a_failing_check_behind_follows_origin_retry(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """The origin answering 500 to the check behind a ``revalidating``
    answer: with ``origin_unreachable = freshest`` the next pulls get the
    policy's answer (``cache``) and the origin is not asked again within
    ``origin_retry``; with ``fail``, they get the origin's error with
    ``Retry-After``.  The failed check is logged, never unhandled."""
    harness, origin = slow(tmp_path)
    image(origin)
    harness.upstreams["origin"].breaker.threshold = 100
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    harness.clock.advance(2)
    origin.fault = failing
    assert source(harness.request("GET", "/v2/app/manifests/latest")) == [
        "revalidating"
    ]
    for _ in range(5):
        harness.clock.advance(5)
        assert source(harness.request("GET", "/v2/app/manifests/latest")) == ["cache"]
    assert tag_heads(origin) == 2

    harness.router_pool("docker.io").origin_unreachable = "fail"
    image(origin, tag="other")
    origin.fault = None
    assert harness.request("GET", "/v2/app/manifests/other").code == 200
    harness.clock.advance(2)
    origin.fault = failing
    assert source(harness.request("GET", "/v2/app/manifests/other")) == ["revalidating"]
    refused = harness.request("GET", "/v2/app/manifests/other")
    assert refused.code == 502
    assert refused.headers.getRawHeaders("Retry-After") == ["30"]
    assert tag_heads(origin, "other") == 2
    texts = [formatEvent(event) or "" for event in logged]
    assert any("revalidating library/app:other failed" in t for t in texts), texts
    assert not [e for e in logged if e.get("log_failure") is not None]


def test_the_window_reaches_the_pools(tmp_path: Path) -> None:
    """``[namespace:NAME] stale_while_revalidate`` (default 0: off) reaches
    the namespace's pool."""
    path = tmp_path / "mirror.ini"
    path.write_text(
        CONFIG_TEXT.replace("origin_retry = 45s", "stale_while_revalidate = 10m"),
        encoding="utf-8",
    )
    mirror = build_mirror(load(str(path)), MemoryReactorClock())
    pools = {pool.namespace: pool for pool in mirror.pools}
    assert pools["docker.io"].stale_while_revalidate == 600.0
    assert pools["ghcr.io"].stale_while_revalidate == 0.0


def test_in_a_cluster_the_check_behind_takes_another_nodes_fresh_answer(
    tmp_path: Path,
) -> None:
    """Two nodes, one Redis: past ``tag_ttl`` (30 s), within the window,
    node a answers ``revalidating`` and asks the origin behind it; node b
    answers ``revalidating`` too, and its check behind takes a's fresh
    answer from the cluster instead of asking the origin: one HEAD for
    both; b's next pull is answered ``cluster``."""
    c = Cluster(tmp_path)
    for name in "ab":
        c[name].router_pool("docker.io").stale_while_revalidate = 600.0
    image(c.origin)

    def pulled(name: str) -> list[str]:
        response = c.request(name, "GET", "/v2/app/manifests/latest")
        assert response.code == 200
        return source(response)

    assert pulled("a") == ["origin"]
    assert pulled("b") == ["cluster"]
    c.tick(31)
    assert pulled("a") == ["revalidating"]
    assert tag_heads(c.origin) == 2
    assert pulled("b") == ["revalidating"]
    assert pulled("b") == ["cluster"]
    assert pulled("a") == ["origin"]
    assert tag_heads(c.origin) == 2


# -- failed checks, shared by the processes ------------------------------------------


def test_a_failed_check_holds_for_every_process(tmp_path: Path) -> None:
    """
    The origin silent (``response_timeout`` 10 s, breaker back-off 5 s):
    one process's check times out; another process over the same cache
    folder, past the breaker's back-off and within ``origin_retry``,
    answers the tag at once from the cache without asking (``workers``:
    one wait per window on the machine, not one per process).  A mirror
    starting afresh (its breakers reset) ends the window: asked again.
    """
    harness, origin = one(
        tmp_path, origin={"response_timeout": 10.0, "breaker_backoff": 5.0}
    )
    content = _cached_then_expired(harness, origin)
    origin.silent = True
    url = "http://mirror.test/v2/app/manifests/latest"
    first = pending(harness.client.get(url))
    harness.settle()
    harness.clock.advance(10)
    harness.settle()
    assert source(first[0]) == ["cache"]
    assert tag_heads(origin) == 2
    harness.clock.advance(6)  # past the breaker's back-off
    pool = harness.router_pool("docker.io")
    tags = harness.fetcher.tags
    other = Tags(harness.store, harness.clock, tags.manifests, tags.blobs, tags.metrics)
    answered = pending(
        Deferred.fromCoroutine(other.resolve(pool, "library/app", "latest"))
    )
    harness.settle()
    assert answered != [], "the other process asked the origin"
    assert (answered[0].upstream, str(answered[0].digest)) == (
        "cache",
        content["manifest"],
    )
    assert tag_heads(origin) == 2
    harness.clock.advance(1)
    pool.origin.breaker.reset()
    again = Tags(harness.store, harness.clock, tags.manifests, tags.blobs, tags.metrics)
    pending(Deferred.fromCoroutine(again.resolve(pool, "library/app", "latest")))
    harness.settle()
    assert tag_heads(origin) == 3


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
