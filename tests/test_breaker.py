"""
An upstream's health shared through its record in the cache folder: two
:class:`Breaker` objects on one record (as two worker processes have)
behave as one breaker, and so do two :class:`Upstream` objects and two
mirrors built from one configuration.
"""

from __future__ import annotations

from pathlib import Path

import treq
from configs import write_config
from fakeregistry import FakeRegistry
from memory import result
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent

from regmirror.breaker import Breaker
from regmirror.config import UpstreamConfig
from regmirror.ini import load
from regmirror.mirror import Mirror
from regmirror.service import build_mirror
from regmirror.upstream import DEFAULT_BACKOFF, Upstream

#: a wall-clock time, as every process reads it
NOW = 1_765_000_000.0


def started_clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def pair(tmp_path: Path, clock: Clock) -> tuple[Breaker, Breaker]:
    """Two breakers on one record, as two processes have them."""
    record = str(tmp_path / "cache" / "health" / "mirror")
    return (
        Breaker(clock, threshold=3, backoff=10.0, record=record),
        Breaker(clock, threshold=3, backoff=10.0, record=record),
    )


def test_opened_by_one_refuses_in_the_other(tmp_path: Path) -> None:
    """A transport failure seen by one opens the breaker for both: the
    other refuses, and reports the upstream down until when."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    assert two.allow()
    assert one.failed(transport=True) == 10.0
    assert not two.allow()
    assert two.opened == 1
    assert two.open_until == NOW + 10.0
    clock.advance(9)
    assert not two.allow() and not one.allow()


def test_failed_answers_count_across_processes(tmp_path: Path) -> None:
    """``threshold`` failed answers in a row open it, whichever process saw
    them; broken transfers too; an answer anywhere ends the run."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    assert one.failed(transport=False) is None
    assert two.failed(transport=False) is None
    assert not one.succeeded()  # closed: an answer only ends the run
    assert one.failed(transport=False) is None
    assert two.failed(transport=False) is None
    assert one.failed(transport=False) == 10.0
    assert not two.allow()
    clock.advance(10)
    assert two.allow() and two.succeeded()
    assert one.broke() is None and two.broke() is None
    two.transferred()
    assert one.broke() is None and two.broke() is None
    assert one.broke() == 10.0
    assert not two.allow()


def test_closed_by_one_allows_the_other(tmp_path: Path) -> None:
    """A probe that succeeds in one process closes the breaker for both."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    one.failed(transport=True)
    clock.advance(10)
    assert one.allow()  # the probe
    assert not two.allow()
    assert one.succeeded()
    assert two.opened == 0
    assert two.allow() and two.allow()
    assert not two.succeeded()  # it was not open any more


def test_one_probe_for_all_per_period(tmp_path: Path) -> None:
    """Once the back-off has passed, the first to ask probes and the other
    does not; the probe failing opens it again for both, doubled; a prober
    that never answers (its process died) holds the others back for one
    back-off at most."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    one.failed(transport=True)
    clock.advance(10)
    assert two.allow()
    assert not one.allow() and not two.allow()
    assert two.failed(transport=False) == 20.0
    clock.advance(19)
    assert not one.allow()
    clock.advance(1)
    assert one.allow()  # probes, then is never heard of again
    clock.advance(9)
    assert not two.allow()
    clock.advance(1)
    assert two.allow()


def test_abandoned_probe_lets_another_probe(tmp_path: Path) -> None:
    """A probe cancelled before any answer frees the probe at once for
    every process; a cancelled request that was not the probe frees
    nothing."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    one.failed(transport=True)
    clock.advance(10)
    assert one.allow()
    one.abandoned()
    assert two.allow()
    one.abandoned()
    assert not one.allow()


def test_recovery_look_taken_by_one(tmp_path: Path) -> None:
    """While open, one process of all looks at the upstream per interval,
    the first an interval after the failure that opened it (a look at
    once let an upstream whose /v2/ answers while its manifests hang back
    within a second, ending origin_retry's window early)."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    assert not one.look(30.0)  # closed: nothing to look at
    one.failed(transport=True)
    assert not one.look(30.0) and not two.look(30.0)
    clock.advance(29)
    assert not one.look(30.0) and not two.look(30.0)
    clock.advance(1)
    assert two.look(30.0)
    assert not one.look(30.0) and not two.look(30.0)
    clock.advance(29)
    assert not one.look(30.0)
    clock.advance(1)
    assert one.look(30.0)
    assert not two.look(30.0)


def test_rate_limit_shared_and_reset(tmp_path: Path) -> None:
    """A 429's back-off recorded by one holds for the other until it ends;
    a reset (a mirror starting) forgets the breaker and the back-off."""
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    one.rate_limited(NOW + 30.0)
    assert two.backing_off() == 30.0
    clock.advance(30)
    assert two.backing_off() is None
    one.rate_limited(NOW + 60.0)
    one.failed(transport=True)
    two.reset()
    assert one.backing_off() is None
    assert one.opened == 0 and one.allow()


def test_without_a_record_each_breaker_is_its_own() -> None:
    """Built without a record (a unit test, a single mirror in memory), a
    breaker keeps its health to itself."""
    clock = started_clock()
    one, two = Breaker(clock, backoff=10.0), Breaker(clock, backoff=10.0)
    one.failed(transport=True)
    one.rate_limited(NOW + 30.0)
    assert not one.allow()
    assert two.allow() and two.backing_off() is None


def test_unusable_record_falls_back_to_memory(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A record that cannot be opened (its folder is a file) is said once in
    the log; the breaker then works alone, in memory."""
    (tmp_path / "health").write_text("not a folder")
    breaker = Breaker(
        started_clock(), backoff=10.0, record=str(tmp_path / "health" / "mirror")
    )
    assert breaker.failed(transport=True) == 10.0
    assert not breaker.allow()
    assert breaker.record is None
    errors = [e for e in logged if "cannot use {path}" in str(e.get("log_format"))]
    assert len(errors) == 1


def upstream_pair(
    tmp_path: Path, clock: Clock
) -> tuple[Upstream, Upstream, FakeRegistry]:
    """Two :class:`Upstream` objects for one registry on one record."""
    registry = FakeRegistry()
    agent = RequestTraversalAgent(registry)
    config = UpstreamConfig("mirror", "http://mirror.test", breaker_backoff=30.0)
    record = str(tmp_path / "health" / "mirror")
    return (
        Upstream(config, agent, clock, health_record=record),
        Upstream(config, agent, clock, health_record=record),
        registry,
    )


def test_upstreams_share_a_429_back_off(tmp_path: Path) -> None:
    """A 429 answered to one upstream object sets the other aside too."""
    clock = started_clock()
    one, two, registry = upstream_pair(tmp_path, clock)
    registry.fault = lambda request: (429, b"slow down")
    d = Deferred.fromCoroutine(one.request("GET", ""))
    one.agent.flush()  # type: ignore[attr-defined]
    assert result(d).code == 429
    assert two.backing_off() == DEFAULT_BACKOFF


def test_upstreams_recover_once_for_both(tmp_path: Path) -> None:
    """Marked down through one, the upstream is looked at once per
    ``breaker_backoff`` by the two together; the look that finds it back
    closes the breaker for both."""
    clock = started_clock()
    one, two, registry = upstream_pair(tmp_path, clock)

    def recover(upstream: Upstream) -> None:
        d = Deferred.fromCoroutine(upstream.recover())
        upstream.agent.flush()  # type: ignore[attr-defined]
        result(d)

    one.breaker.failed(transport=True)
    registry.fault = lambda request: (503, b"down")
    recover(one)
    assert registry.requests == []  # not before an interval
    clock.advance(30)
    recover(one)
    recover(two)
    assert registry.requests == [("GET", "/v2/")]
    clock.advance(30)
    registry.fault = None
    recover(two)
    recover(one)
    assert len(registry.requests) == 2
    assert one.breaker.opened == 0 and two.breaker.allow()


def readiness(mirror: Mirror) -> int:
    client = StubTreq(mirror.site.resource)
    d = client.get("http://mirror.test/readyz")
    client.flush()
    response = result(d)
    result(treq.content(response))
    return int(response.code)


def test_mirrors_on_one_cache_share_upstream_health(tmp_path: Path) -> None:
    """
    Two mirrors built from one configuration (the ``twistd`` process and a
    worker) see one health per upstream, kept under ``<cache>/health/``: the
    upstream marked down in one is down in the other's status, metrics and
    readiness; the first process starting afresh resets it.
    """
    config = load(str(write_config(tmp_path)))
    parent = build_mirror(config, MemoryReactorClock())
    worker = build_mirror(config, MemoryReactorClock())
    parent.upstreams["one"].breaker.failed(transport=True)
    assert (tmp_path / "cache" / "health" / "one").is_file()
    assert readiness(worker) == 503
    status = result(Deferred.fromCoroutine(worker.status()))
    (upstream,) = status["namespaces"][0]["upstreams"]
    assert upstream["down"] is True
    assert upstream["retry_in"] > 0
    families = result(worker.families())
    (down,) = [f for f in families if f.name == "regmirror_upstream_down"]
    assert [s.value for s in down.samples] == [1.0]
    worker.start(clean=False)
    assert readiness(parent) == 503
    result(Deferred.fromCoroutine(worker.stop()))
    parent.start(clean=True)
    assert readiness(worker) == 200
    result(Deferred.fromCoroutine(parent.stop()))


def test_failures_of_requests_sent_before_it_opened_do_not_double_it(
    tmp_path: Path,
) -> None:
    """
    Two requests time out at once: the first marks the upstream down for
    one back-off, the second (sent before that) neither opens it again nor
    doubles the back-off, no probe having failed ("marked down for 30s",
    then "for 60s" in the same second; found by the fresh-eyes review).
    A transfer broken meanwhile does not either; the probe's failure does.
    """
    clock = started_clock()
    one, two = pair(tmp_path, clock)
    assert one.failed(transport=True) == one.backoff
    assert two.failed(transport=True) is None
    assert one.broke() is None and one.broke() is None and one.broke() is None
    assert one.health().opened == 1
    clock.advance(one.backoff)
    assert one.allow()  # the probe
    assert one.failed(transport=True) == 2 * one.backoff
