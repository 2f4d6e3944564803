"""The cache on disk: publishing, eviction order, the in-use guard, tag
expiry and verification."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import Harness, result
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from regmirror._spool import SIZE_SUFFIX
from regmirror.readers import RELAY_FRUITLESS, Relay
from regmirror.reference import Digest, parse_digest
from regmirror.store import ACCESS_GRANULARITY, Store


class Now:
    """A settable clock for the store."""

    def __init__(self) -> None:
        self.value = 1_000_000.0

    def __call__(self) -> float:
        return self.value


def put(store: Store, data: bytes, used: float) -> Digest:
    """Publish *data* through a spool, as a download does, last used at *used*."""
    digest = Digest.of(data)
    spool = store.spool(digest)
    spool.write(data)
    spool.commit()
    store.added(len(data))
    os.utime(store.blob_path(digest), (used, used))
    return digest


def test_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    """Over max_size, the least recently used files go until the cache is
    under 90% of the limit; a use refreshes a file's place."""
    now = Now()
    store = Store(str(tmp_path), max_size=3000, now=now)
    store.open()
    oldest = put(store, b"a" * 1000, now.value - 3 * ACCESS_GRANULARITY)
    middle = put(store, b"b" * 1000, now.value - 2 * ACCESS_GRANULARITY)
    newest = put(store, b"c" * 1000, now.value - 1 * ACCESS_GRANULARITY)
    assert store.blob_size(oldest) == 1000  # a use: now the most recent
    assert not store.over_limit()
    latest = put(store, b"d" * 1000, now.value)
    assert store.size == 4000 and store.over_limit()
    evicted = [entry.digest for entry in store.evict()]
    assert evicted == [middle, newest]
    assert store.size == 2000
    assert store.blob_size(oldest) == 1000 and store.blob_size(latest) == 1000


def test_eviction_never_touches_what_is_being_read(tmp_path: Path) -> None:
    """A blob a client is reading is skipped, however old."""
    now = Now()
    store = Store(str(tmp_path), max_size=1500, now=now)
    store.open()
    busy = put(store, b"a" * 1000, now.value - 10 * ACCESS_GRANULARITY)
    idle = put(store, b"b" * 1000, now.value - 5 * ACCESS_GRANULARITY)
    store.acquire(busy)
    assert [e.digest for e in store.evict()] == [idle]
    store.release(busy)
    put(store, b"c" * 1000, now.value)
    assert [e.digest for e in store.evict()] == [busy]


def test_size_survives_a_restart(tmp_path: Path) -> None:
    """The cache's size is measured again at start, and half-written spool
    files are not counted (they are removed)."""
    store = Store(str(tmp_path))
    store.open()
    put(store, b"x" * 123, 0)
    (tmp_path / "spool" / "leftover").write_bytes(b"y" * 1000)
    again = Store(str(tmp_path))
    again.open()
    assert again.size == 123


def test_processes_sharing_the_folder_share_its_size(tmp_path: Path) -> None:
    """
    Stores opened on one folder (the processes of ``workers = N``, the
    first clean, the others joining) see each other's additions and
    removals, so that ``max_size`` holds for the folder, not per process:
    eviction in one accounts for what all of them stored, and a file both
    try to evict is counted once.
    """
    now = Now()
    first = Store(str(tmp_path), max_size=2500, now=now)
    first.open()
    second = Store(str(tmp_path), max_size=2500, now=now)
    second.open(clean=False)
    old = put(first, b"a" * 1000, now.value - 2 * ACCESS_GRANULARITY)
    put(second, b"b" * 1000, now.value - ACCESS_GRANULARITY)
    assert first.size == second.size == 2000
    assert not second.over_limit()
    put(second, b"c" * 1000, now.value)
    assert first.over_limit() and second.over_limit()
    candidates = first.by_last_use()
    assert [e.digest for e in second.evict(candidates)] == [old]
    assert first.evict(candidates) == []  # nothing more to do
    assert first.remove(old) is False  # already gone: not counted again
    assert first.size == second.size == 2000
    third = Store(str(tmp_path))
    third.open(clean=False)
    assert third.size == 2000


def test_manifest_counted_once(tmp_path: Path) -> None:
    """Storing the same manifest twice does not count its bytes twice."""
    store = Store(str(tmp_path))
    store.open()
    body = b'{"schemaVersion":2}'
    digest = Digest.of(body)
    store.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", body)
    store.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", body)
    assert store.size == len(body)
    assert store.remove(digest)
    assert store.size == 0 and store.manifest(digest) is None


def test_tag_records_expire(tmp_path: Path) -> None:
    """Tag records the origin confirmed before the cut-off are removed."""
    store = Store(str(tmp_path))
    store.open()
    digest = Digest.of(b"m")
    store.set_tag("docker.io", "library/old", "latest", digest, confirmed=100.0)
    store.set_tag("docker.io", "library/new", "latest", digest, confirmed=900.0)
    assert store.expire_tags(older_than=500.0) == 1
    assert [(r, t) for _, r, t, _ in store.tags()] == [("library/new", "latest")]


def test_verify_removes_corrupt_files(tmp_path: Path) -> None:
    """A blob corrupted on disk is found by verify and removed."""
    store = Store(str(tmp_path))
    store.open()
    good = put(store, b"good" * 100, 0)
    bad = put(store, b"bad!" * 100, 0)
    with open(store.blob_path(bad), "r+b") as f:
        f.write(b"X")
    results = {entry.digest: sound for entry, sound in store.verify()}
    assert results == {good: True, bad: False}
    assert store.blob_size(bad) is None and store.blob_size(good) == 400


def test_a_finished_download_triggers_eviction(tmp_path: Path) -> None:
    """When a download pushes the cache over max_size, older content goes."""
    origin = FakeRegistry()
    first = origin.add_blob(b"1" * 3000)
    second = origin.add_blob(b"2" * 3000)
    harness = Harness(str(tmp_path), {"origin": origin})
    harness.store.max_size = 4000
    harness.body(harness.request("GET", f"/v2/app/blobs/{first}"))
    os.utime(harness.store.blob_path(parse_digest(first)), (1, 1))
    harness.body(harness.request("GET", f"/v2/app/blobs/{second}"))
    assert harness.store.blob_size(parse_digest(first)) is None
    assert harness.store.blob_size(parse_digest(second)) == 3000
    registry = harness.metrics.registry
    assert registry.get_sample_value("regmirror_cache_evictions_total") == 1
    assert registry.get_sample_value("regmirror_cache_evicted_bytes_total") == 3000


def test_full_disk_serves_uncached_then_recovers(tmp_path: Path) -> None:
    """When the cache cannot be written (ENOSPC), blobs stream straight from
    upstream with their digest checked, the problem is logged once, and
    caching resumes by itself once the period has passed."""
    origin = FakeRegistry()
    digest = origin.add_blob(b"payload" * 1000)
    harness = Harness(str(tmp_path), {"origin": origin})
    spool = tmp_path / "spool"
    spool.rmdir()
    spool.write_bytes(b"")  # creating a spool file now fails, as on a full disk
    for _ in range(2):
        response = harness.request("GET", f"/v2/app/blobs/{digest}")
        assert harness.body(response) == b"payload" * 1000
    assert not harness.store.writable()
    assert harness.store.blob_size(parse_digest(digest)) is None
    spool.unlink()
    spool.mkdir()
    assert not harness.store.writable()
    harness.clock.advance(61)
    harness.body(harness.request("GET", f"/v2/app/blobs/{digest}"))
    assert harness.store.blob_size(parse_digest(digest)) == 7000


def test_relayed_blob_with_wrong_bytes_breaks_the_client(tmp_path: Path) -> None:
    """Streaming uncached, a blob whose bytes do not match is cut short."""
    origin = FakeRegistry()
    digest = origin.add_blob(b"payload" * 1000)
    origin.corrupt.add(digest)
    origin.hold[digest] = 3000
    harness = Harness(str(tmp_path), {"origin": origin})
    harness.store.degrade(OSError(errno.EROFS, "Read-only file system"))
    response = harness.request("GET", f"/v2/app/blobs/{digest}")
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.settle()
    origin.release()
    harness.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection)
        result(done)
    assert len(b"".join(received)) < 7000


def test_another_process_download_is_followed_not_repeated(tmp_path: Path) -> None:
    """While another process holds the spool lock for a digest, this one
    asks no upstream: it streams the growing spool file to its client,
    holding back the last byte until the blob is verified and in the cache."""
    origin = FakeRegistry()
    data = b"shared" * 2000
    digest = origin.add_blob(data)
    harness = Harness(str(tmp_path), {"origin": origin})
    path = harness.store.spool_path(parse_digest(digest))
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    with open(path + SIZE_SUFFIX, "w") as f:
        f.write(str(len(data)))
    os.write(other, data[:5000])
    response = harness.request("GET", f"/v2/app/blobs/{digest}")
    assert response.code == 200 and response.length == len(data)
    received: list[bytes] = []
    finished: list[object] = []
    treq.collect(response, received.append).addBoth(finished.append)
    harness.clock.advance(0.05)
    harness.settle()
    assert len(b"".join(received)) == 4999 and finished == []
    os.write(other, data[5000:])
    harness.clock.advance(0.05)
    harness.settle()
    assert len(b"".join(received)) == len(data) - 1  # not verified yet
    final = harness.store.blob_path(parse_digest(digest))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(path, final)
    os.unlink(path + SIZE_SUFFIX)
    os.close(other)
    harness.clock.advance(0.05)
    harness.settle()
    assert finished == [None] and b"".join(received) == data
    assert origin.count("GET", "/blobs/") == 0


def test_a_dead_downloader_breaks_its_followers(tmp_path: Path) -> None:
    """When the other process dies (its lock goes) before finishing, the
    followers' clients see a broken stream, never a short blob."""
    origin = FakeRegistry()
    data = b"orphan" * 2000
    digest = origin.add_blob(data)
    harness = Harness(str(tmp_path), {"origin": origin})
    path = harness.store.spool_path(parse_digest(digest))
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    with open(path + SIZE_SUFFIX, "w") as f:
        f.write(str(len(data)))
    os.write(other, data[:5000])
    response = harness.request("GET", f"/v2/app/blobs/{digest}")
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.clock.advance(0.05)
    harness.settle()
    os.close(other)  # the process died: its lock is gone
    harness.clock.advance(0.05)
    harness.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection)
        result(done)
    assert len(b"".join(received)) < len(data)


def broken(harness: Harness, response: Any) -> bytes:
    """What a client got of a blob whose download was abandoned: a 502, or
    a 200 whose stream broke."""
    received: list[bytes] = []
    outcome: list[object] = []
    if response.code == 200:
        treq.collect(response, received.append).addBoth(outcome.append)
        harness.settle()
        assert outcome and outcome[0] is not None  # the stream broke
    else:
        assert response.code == 502
    return b"".join(received)


def test_a_blob_without_length_is_bounded(tmp_path: Path) -> None:
    """An upstream that does not say a blob's size may not send more than
    max_blob_size: the transfer is abandoned, nothing is cached."""
    origin = FakeRegistry()
    digest = origin.add_blob(b"endless" * 1000)
    origin.unsized.add(digest)
    harness = Harness(str(tmp_path), {"origin": origin})
    harness.fetcher.blobs.max_blob_size = 3000
    received = broken(harness, harness.request("GET", f"/v2/app/blobs/{digest}"))
    assert len(received) <= 3000
    assert harness.cached_files() == []


def test_a_blob_that_would_leave_less_than_min_free_is_relayed_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download whose announced size would take the file system below
    ``min_free`` writes nothing: the upstream's answer goes to the client
    as it comes (one request upstream), the cache is not degraded, and a
    blob that fits is cached as ever."""
    origin = FakeRegistry()
    big = origin.add_blob(b"B" * 7000)
    small = origin.add_blob(b"s" * 3000)
    harness = Harness(str(tmp_path), {"origin": origin})
    monkeypatch.setattr(Store, "free_space", lambda self: 1_000_000)
    harness.store.min_free = 1_000_000 - 5000
    response = harness.request("GET", f"/v2/app/blobs/{big}")
    assert response.code == 200
    assert harness.body(response) == b"B" * 7000
    assert not harness.store.has_blob(parse_digest(big))
    assert os.listdir(tmp_path / "spool") == []
    assert origin.count("GET", big) == 1
    assert harness.store.writable()
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{small}")) == b"s" * 3000
    assert harness.store.has_blob(parse_digest(small))


def test_a_blob_larger_than_the_cache_keeps_is_relayed_and_evicts_nothing(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    A blob whose stated size is more than the cache keeps after eviction
    (90% of ``max_size``) is relayed, every time, and evicts nothing: once
    cached, it would be evicted at once together with everything else.  A
    blob of exactly that size is cached.
    """
    origin = FakeRegistry()
    small = origin.add_blob(b"s" * 3000)
    big = origin.add_blob(b"B" * 9001)
    fits = origin.add_blob(b"f" * 9000)
    harness = Harness(str(tmp_path), {"origin": origin})
    harness.store.max_size = 10_000
    harness.body(harness.request("GET", f"/v2/app/blobs/{small}"))
    for _ in range(2):
        response = harness.request("GET", f"/v2/app/blobs/{big}")
        assert response.code == 200 and response.length == 9001
        assert harness.body(response) == b"B" * 9001
        assert not harness.store.has_blob(parse_digest(big))
        assert harness.store.has_blob(parse_digest(small))
        assert os.listdir(tmp_path / "spool") == []
    assert origin.count("GET", big) == 2
    registry = harness.metrics.registry
    assert not registry.get_sample_value("regmirror_cache_evictions_total")
    lines = [formatEvent(e) for e in logged if "not caching" in formatEvent(e)]
    assert (
        lines
        == [
            f"not caching {big} (9001 bytes): more than the cache keeps after "
            "eviction (90% of max_size, 9000 bytes); relaying it"
        ]
        * 2
    )
    harness.body(harness.request("GET", f"/v2/app/blobs/{fits}"))
    assert harness.store.has_blob(parse_digest(fits))


def test_a_blob_without_length_past_what_the_cache_keeps_is_relayed_next_time(
    tmp_path: Path,
) -> None:
    """
    A blob without a stated size is downloaded into the cache until its
    body passes what the cache keeps after eviction: then that download
    is abandoned (its client's stream breaks, nothing is cached, nothing
    evicted), and the next request for it is relayed whole.
    """
    origin = FakeRegistry()
    small = origin.add_blob(b"s" * 3000)
    data = b"endless" * 2000
    big = origin.add_blob(data)
    origin.unsized.add(big)
    harness = Harness(str(tmp_path), {"origin": origin})
    harness.store.max_size = 10_000
    harness.body(harness.request("GET", f"/v2/app/blobs/{small}"))
    received = broken(harness, harness.request("GET", f"/v2/app/blobs/{big}"))
    assert len(received) <= 9000
    assert not harness.store.has_blob(parse_digest(big))
    assert harness.store.has_blob(parse_digest(small))
    again = harness.request("GET", f"/v2/app/blobs/{big}")
    assert again.code == 200
    assert harness.body(again) == data
    assert not harness.store.has_blob(parse_digest(big))
    assert harness.store.has_blob(parse_digest(small))
    assert os.listdir(tmp_path / "spool") == []
    assert origin.count("GET", big) == 2


#: A blob more than a cache of :func:`relaying` keeps: relayed uncached.
RELAYED = bytes(range(256)) * 40


def relaying(tmp_path: Path, *names: str) -> tuple[Harness, list[FakeRegistry], str]:
    """A mirror whose cache keeps too little for :data:`RELAYED`, over
    upstreams *names* (``origin`` by default) that each have it; the
    fakes, and its digest."""
    upstreams = {name: FakeRegistry() for name in names or ("origin",)}
    (digest,) = {fake.add_blob(RELAYED) for fake in upstreams.values()}
    harness = Harness(str(tmp_path), upstreams)
    harness.store.max_size = 5000
    return harness, list(upstreams.values()), digest


@pytest.mark.parametrize("ranges", [True, False])
def test_a_relay_whose_upstream_breaks_off_goes_on_from_there(
    tmp_path: Path, ranges: bool
) -> None:
    """
    A relayed blob (more than the cache keeps) whose upstream body breaks
    off mid-way goes on from the byte it stopped at (a ranged GET; an
    upstream that ignores Range sends it whole again, and the bytes before
    are dropped): the client gets the whole blob, exact, in one response
    (a fresh-eyes review: its response broke, and a retry started at 0
    again); upstream bytes count every byte received.
    """
    harness, (origin,), big = relaying(tmp_path)
    data = RELAYED
    origin.drop[big] = 3000
    origin.ignore_range = not ranges
    response = harness.request("GET", f"/v2/app/blobs/{big}")
    assert response.code == 200
    # Sent whole: it says it answers no range (a fresh-eyes review).
    assert response.headers.getRawHeaders("Accept-Ranges") == ["none"]
    assert harness.body(response) == data
    assert not harness.store.has_blob(parse_digest(big))
    assert origin.ranges == ["bytes=3000-"]
    received = harness.metrics.registry.get_sample_value(
        "regmirror_upstream_bytes_total", {"upstream": "origin"}
    )
    assert received == 3000 + (len(data) - 3000 if ranges else len(data))


@pytest.mark.parametrize("cut", [1000, 0])
def test_a_relay_goes_on_while_its_attempts_bring_bytes(
    tmp_path: Path, cut: int
) -> None:
    """An upstream that breaks every body after *cut* bytes: while each
    attempt brings bytes, the relay goes on until the blob is whole; one
    that brings none is given up after RELAY_FRUITLESS attempts more, the
    client's response broken, never complete."""
    harness, (origin,), big = relaying(tmp_path)
    data = RELAYED
    origin.flaky[big] = cut
    response = harness.request("GET", f"/v2/app/blobs/{big}")
    assert response.code == 200
    if cut:
        assert harness.body(response) == data
        assert origin.count("GET", big) == -(-len(data) // cut)
    else:
        assert len(broken(harness, response)) < len(data)
        assert origin.count("GET", big) == 1 + RELAY_FRUITLESS


def test_a_relay_whose_upstream_falls_silent_goes_on_after_idle_timeout(
    tmp_path: Path,
) -> None:
    """A relayed blob's upstream that stops sending without closing: after
    its ``idle_timeout`` of silence (not before) the body counts as broken
    off, and the relay goes on from that byte (a fresh-eyes review: the
    client waited until its own timeout, the connection left open)."""
    harness, (origin,), big = relaying(tmp_path)
    data = RELAYED
    origin.hold[big] = 3000
    idle = harness.upstreams["origin"].config.idle_timeout
    response = harness.request("GET", f"/v2/app/blobs/{big}")
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    harness.clock.advance(idle - 0.1)
    harness.settle()
    assert not done.called and origin.ranges == []
    harness.clock.advance(0.1)
    harness.settle()
    result(done)
    assert b"".join(received) == data
    assert origin.ranges == ["bytes=3000-"]


def test_a_relay_goes_on_from_the_next_upstream(tmp_path: Path) -> None:
    """The rest of a relayed blob whose upstream broke off is asked of the
    next upstream in the namespace's order first (a fresh-eyes review: it
    went back to the one that broke, three times, and gave up)."""
    harness, (first, second), big = relaying(tmp_path, "first", "second")
    first.flaky[big] = 3000
    response = harness.request("GET", f"/v2/app/blobs/{big}")
    assert harness.body(response) == RELAYED
    assert first.count("GET", big) == 1
    assert second.ranges == ["bytes=3000-"]


def test_a_relays_resumes_take_turns_between_upstreams_that_break(
    tmp_path: Path,
) -> None:
    """Both upstreams break every body off: the rest is asked of the one
    that broke it longest ago, so they take turns (a fresh-eyes review:
    once both had broken, it went back to the first every time)."""
    harness, (first, second), big = relaying(tmp_path, "first", "second")
    first.flaky[big] = second.flaky[big] = 3000
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{big}")) == RELAYED
    assert first.ranges == ["bytes=6000-"]
    assert second.ranges == ["bytes=3000-", "bytes=9000-"]


class _Body:
    """An upstream body's transport, as a relay drives it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class _Client:
    def __init__(self) -> None:
        self.channel = object()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        pass


def test_a_relay_paused_for_a_slow_client_is_not_a_silent_upstream() -> None:
    """While the client's back-pressure holds the body, its upstream's
    silence is the relay's doing: the idle count stops, and starts again
    on resuming (a fresh-eyes review: a slow client cost one upstream GET
    per idle_timeout)."""
    clock = Clock()
    client, body = _Client(), _Body()
    relay = Relay(
        client, Digest.of(b"x"), lambda n: None, clock=clock, idle_timeout=5.0
    )
    relay.makeConnection(body)
    client.producer.pauseProducing()
    clock.advance(60)
    assert body.calls == ["pause"]
    client.producer.resumeProducing()
    clock.advance(4.9)
    assert body.calls == ["pause", "resume"]
    clock.advance(0.1)
    assert body.calls == ["pause", "resume", "stop"]
