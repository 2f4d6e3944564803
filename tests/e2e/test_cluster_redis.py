"""
The cluster coordinator against a real ``redis-server``: leases raced for
by several nodes, renewed, lost and taken over; shared tag answers and
peer key; the shared store's index; and Redis stopped, frozen and started
again under running nodes.

Each test runs its nodes (:class:`Coordinator` objects, each with its own
connection) on a reactor of its own, created for the test and never
installed, so that the suite's processes and the global reactor stay out
of it.  Every scenario is bounded as a whole, and every wait inside it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from regmirror.cluster import Coordinator, CoordinatorDown, Holder, Lease
from regmirror.reference import Digest

from .engines import RedisServer
from .harness import LOCALHOST, free_port

pytestmark = pytest.mark.e2e

T = TypeVar("T")

#: No scenario runs longer than this, whatever happens in it.
SCENARIO_LIMIT = 60.0
#: The longest any single wait inside a scenario may take.
WAIT_LIMIT = 10.0
POLL = 0.02


class Nodes:
    """Coordinators on one reactor, each a "node" of the cluster."""

    def __init__(self, reactor: Any, redis_url: str) -> None:
        self.reactor = reactor
        self.redis_url = redis_url
        self.made: list[Coordinator] = []

    def __call__(
        self,
        name: str,
        *,
        url: str | None = None,
        lease_ttl: float = 5.0,
        timeout: float = 1.0,
        start: bool = True,
    ) -> Coordinator:
        node = Coordinator(
            self.reactor,
            url or self.redis_url,
            f"http://node-{name}.test:5000",
            lease_ttl=lease_ttl,
            timeout=timeout,
        )
        self.made.append(node)
        if start:
            node.start()
        return node

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    async def until(
        self, condition: Callable[[], bool], what: str, limit: float = WAIT_LIMIT
    ) -> float:
        """Poll *condition* until true, at most *limit* seconds: how long it took."""
        began = self.reactor.seconds()
        for _ in range(int(limit / POLL) + 1):
            if condition():
                return float(self.reactor.seconds() - began)
            await self.sleep(POLL)
        raise AssertionError(f"gave up after {limit}s waiting for {what}")

    async def in_thread(self, work: Callable[[], T]) -> T:
        """Blocking test-side work (stopping Redis) off this reactor's thread."""
        result: T = await deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), work
        )
        return result

    async def stop_all(self) -> None:
        await gatherResults([Deferred.fromCoroutine(n.stop()) for n in self.made])


def drive(
    redis_url: str,
    scenario: Callable[[Nodes], Coroutine[Any, Any, T]],
    limit: float = SCENARIO_LIMIT,
) -> T:
    """
    Run *scenario* on a reactor of its own, stopping its nodes afterwards,
    within *limit* seconds all told.
    """
    reactor = EPollReactor()
    nodes = Nodes(reactor, redis_url)
    outcome: list[object] = []

    async def run() -> T:
        await nodes.sleep(0)  # begin once the limit below is set
        try:
            return await scenario(nodes)
        finally:
            await nodes.stop_all()

    def begin() -> None:
        d = Deferred.fromCoroutine(run())
        d.addTimeout(limit, reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    # Should the scenario's own timeout not end it, this does.
    reactor.callLater(limit + 5, reactor.stop)
    began = time.monotonic()
    reactor.run(installSignalHandlers=False)
    assert outcome, f"the scenario did not end within {time.monotonic() - began:.0f}s"
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


def acquire(node: Coordinator, digest: Digest) -> Deferred[Lease | Holder]:
    return Deferred.fromCoroutine(node.acquire(digest))


async def down(call: Coroutine[Any, Any, object]) -> CoordinatorDown:
    """The CoordinatorDown that *call* raises (anything else fails the test)."""
    try:
        result = await call
    except CoordinatorDown as error:
        return error
    raise AssertionError(f"expected CoordinatorDown, got {result!r}")


def lease_key(digest: Digest) -> str:
    return f"regmirror:lease:{digest}"


#: The shared store's sizes, digest -> bytes.
SIZES = "regmirror:store:size"


def digests(count: int, salt: str = "") -> list[Digest]:
    return [Digest.of(f"{salt}blob {i}".encode()) for i in range(count)]


# -- leases ------------------------------------------------------------------------


def test_racing_nodes_get_one_lease_and_the_others_its_url_and_token(
    redis: RedisServer,
) -> None:
    """Three nodes asking at once for each of 20 digests: for each, exactly
    one gets a Lease, the two others a Holder naming the winner's
    advertised URL and token; every token is distinct."""

    async def scenario(nodes: Nodes) -> None:
        cluster = [nodes("a"), nodes("b"), nodes("c")]
        tokens = []
        for digest in digests(20):
            answers = await gatherResults([acquire(n, digest) for n in cluster])
            won = [i for i, answer in enumerate(answers) if isinstance(answer, Lease)]
            assert len(won) == 1, answers
            lease = answers[won[0]]
            assert isinstance(lease, Lease) and lease.digest == digest
            winner = cluster[won[0]]
            for i, answer in enumerate(answers):
                if i != won[0]:
                    assert answer == Holder(winner.advertise, lease.token)
            held = redis.command("GET", lease_key(digest))
            assert held == f"{lease.token} {winner.advertise}".encode()
            tokens.append(lease.token)
        assert len(set(tokens)) == len(tokens)

    drive(redis.url, scenario)


def test_fencing_tokens_grow_across_nodes(redis: RedisServer) -> None:
    """Leases taken one after another, by different nodes, on the same and
    on other digests: each token is larger than the one before."""

    async def scenario(nodes: Nodes) -> None:
        cluster = [nodes("a"), nodes("b")]
        tokens = []
        for i, digest in enumerate(digests(3) * 3):
            node = cluster[i % 2]
            lease = await node.acquire(digest)
            assert isinstance(lease, Lease)
            tokens.append(lease.token)
            await node.release(lease)
        assert tokens == sorted(set(tokens)), tokens

    drive(redis.url, scenario)


def test_a_renewed_lease_outlives_its_ttl(redis: RedisServer) -> None:
    """A 0.5 s lease held for 2 s: still the holder's, Redis still counts
    its expiry, the holder never hears it was lost; released, it is free."""
    digest = Digest.of(b"long download")

    async def scenario(nodes: Nodes) -> None:
        a, b = nodes("a", lease_ttl=0.5), nodes("b", lease_ttl=0.5)
        lease = await a.acquire(digest)
        assert isinstance(lease, Lease)
        await nodes.sleep(2.0)
        assert await b.acquire(digest) == Holder(a.advertise, lease.token)
        ttl = redis.command("PTTL", lease_key(digest))
        assert isinstance(ttl, int) and 0 < ttl <= 500
        assert not lease.lost.called
        await a.release(lease)
        assert redis.command("EXISTS", lease_key(digest)) == 0
        assert isinstance(await b.acquire(digest), Lease)

    drive(redis.url, scenario)


def test_a_dead_holders_lease_runs_out_and_another_node_takes_over(
    redis: RedisServer,
) -> None:
    """The holder is cut off from Redis (its ACL user disabled and its
    connection killed), as if it died: within the ttl its lease is gone
    and another node takes it with a larger token; the holder, back, does
    not delete the new holder's lease with its late release."""
    digest = Digest.of(b"orphaned download")
    ttl = 0.6
    user, password = "regmirror-e2e-holder", "pw-91c2a7"
    redis.command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url = f"redis://{user}:{password}@{LOCALHOST}:{redis.port}/0"

    async def scenario(nodes: Nodes) -> None:
        a, b = nodes("a", url=url, lease_ttl=ttl), nodes("b", lease_ttl=ttl)
        first = await a.acquire(digest)
        assert isinstance(first, Lease)
        redis.command("ACL", "SETUSER", user, "off")
        redis.command("CLIENT", "KILL", "USER", user)
        answers: list[Lease | Holder] = []

        def taken() -> bool:
            return bool(answers) and isinstance(answers[-1], Lease)

        async def ask() -> None:
            while not taken():
                answers.append(await b.acquire(digest))
                await nodes.sleep(POLL)

        asking = Deferred.fromCoroutine(ask())
        waited = await nodes.until(taken, "the lease to pass to node b")
        await asking
        assert waited <= ttl + 0.3, waited
        assert all(h == Holder(a.advertise, first.token) for h in answers[:-1])
        second = answers[-1]
        assert isinstance(second, Lease) and second.token > first.token

        redis.command("ACL", "SETUSER", user, "on")
        await nodes.until(lambda: a.available, "node a to be back")
        await a.release(first)
        assert redis.command("GET", lease_key(digest)) == second.value
        await nodes.sleep(2 * ttl)
        assert redis.command("GET", lease_key(digest)) == second.value
        assert not second.lost.called

    try:
        drive(redis.url, scenario)
    finally:
        redis.command("ACL", "DELUSER", user)


def test_the_holder_learns_when_its_lease_was_taken(redis: RedisServer) -> None:
    """Someone else's value under the key: the next renewal tells the
    holder, whose ``lost`` fires; its release then leaves the key alone."""
    digest = Digest.of(b"stolen lease")

    async def scenario(nodes: Nodes) -> None:
        a = nodes("a", lease_ttl=0.6)
        lease = await a.acquire(digest)
        assert isinstance(lease, Lease)
        redis.command("SET", lease_key(digest), f"{lease.token + 1} http://other")
        await nodes.until(lambda: lease.lost.called, "the lease to be lost")
        await a.release(lease)
        assert redis.command("GET", lease_key(digest)) == (
            f"{lease.token + 1} http://other".encode()
        )

    drive(redis.url, scenario)


# -- shared answers ----------------------------------------------------------------


def test_tag_answers_are_shared_until_their_ttl(redis: RedisServer) -> None:
    """A tag answer set by one node is read by another, with its confirmation
    time, until ``ttl`` after that confirmation."""
    digest = Digest.of(b"a manifest")

    async def scenario(nodes: Nodes) -> None:
        a, b = nodes("a"), nodes("b")
        confirmed = nodes.reactor.seconds()
        await a.set_tag("docker.io", "library/alpine", "3", digest, confirmed, 0.5)
        assert await b.tag("docker.io", "library/alpine", "3") == (digest, confirmed)
        assert await b.tag("ghcr.io", "library/alpine", "3") is None
        assert await b.tag("docker.io", "library/alpine", "4") is None
        await nodes.sleep(0.7)
        assert await b.tag("docker.io", "library/alpine", "3") is None

    drive(redis.url, scenario)


def test_every_node_gets_the_same_peer_key(redis: RedisServer) -> None:
    """Four nodes asking at once for the peer key all get one 32-byte key."""

    async def scenario(nodes: Nodes) -> None:
        cluster = [nodes(name) for name in "abcd"]
        keys = await gatherResults(
            [Deferred.fromCoroutine(n.peer_key()) for n in cluster]
        )
        assert len(set(keys)) == 1 and len(keys[0]) == 32
        assert redis.command("GET", "regmirror:peer-key") == keys[0]
        assert await cluster[0].peer_key() == keys[0]

    drive(redis.url, scenario)


# -- the shared store's index --------------------------------------------------


def test_shared_store_index(redis: RedisServer) -> None:
    """Sizes, the total, least-recently-used order (a use by any node
    counts), a size recorded again, and forgetting."""
    one, two, three = digests(3, "index ")

    async def scenario(nodes: Nodes) -> None:
        a, b = nodes("a"), nodes("b")
        assert await a.total_size() == 0
        assert await a.least_recently_used(10) == []
        for digest, size in ((one, 100), (two, 2000), (three, 30000)):
            await a.stored(digest, size)
            await nodes.sleep(0.01)
        assert redis.command("HGET", SIZES, str(two)) == b"2000"
        assert redis.command("HGET", SIZES, str(Digest.of(b"never stored"))) is None
        assert await b.total_size() == 32100
        assert await b.least_recently_used(2) == [(one, 100), (two, 2000)]

        await b.touch(one)
        assert await a.least_recently_used(3) == [
            (two, 2000),
            (three, 30000),
            (one, 100),
        ]
        await a.touch(Digest.of(b"not in the store"))  # not added by a use
        assert len(await a.least_recently_used(10)) == 3

        await a.stored(three, 300)  # stored again: a new size, and a use
        assert await a.total_size() == 2400

        await b.forget(two)
        await b.forget(two)
        assert redis.command("HGET", SIZES, str(two)) is None
        assert await a.total_size() == 400
        assert await a.least_recently_used(10) == [(one, 100), (three, 300)]

    drive(redis.url, scenario)


def test_database_number_from_the_url(redis: RedisServer) -> None:
    """``redis://host:port/3``: every key lands in database 3."""

    async def scenario(nodes: Nodes) -> None:
        a = nodes("a", url=redis.url.rsplit("/", 1)[0] + "/3")
        await a.stored(Digest.of(b"in db 3"), 1)
        assert isinstance(await a.acquire(Digest.of(b"in db 3")), Lease)
        assert redis.command("DBSIZE") == 0

    drive(redis.url, scenario)


def test_user_and_password_from_the_url_never_logged(redis: RedisServer) -> None:
    """A Redis ACL user: the right password works, the wrong one leaves the
    node down; neither password appears in a log line."""
    user, password = "regmirror-e2e", "pw-4dd8e1"
    events: list[LogEvent] = []
    redis.command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    globalLogPublisher.addObserver(events.append)
    base = f"{LOCALHOST}:{redis.port}/0"

    async def scenario(nodes: Nodes) -> None:
        good = nodes("a", url=f"redis://{user}:{password}@{base}")
        assert isinstance(await good.acquire(Digest.of(b"authed")), Lease)
        assert good.available
        bad = nodes("b", url=f"redis://{user}:wrong-{password}@{base}")
        await down(bad.acquire(Digest.of(b"authed")))
        assert not bad.available

    try:
        drive(redis.url, scenario)
    finally:
        globalLogPublisher.removeObserver(events.append)
        redis.command("ACL", "DELUSER", user)
    text = [formatEvent(e) for e in events]
    assert any("refused this node" in t for t in text), text
    assert not [t for t in text if password in t]


# -- Redis away ---------------------------------------------------------------------


def test_redis_stopped_then_started_again(redis: RedisServer) -> None:
    """
    Redis stops under a node holding a lease: the node says so once
    (``available`` false, one warning), every call raises CoordinatorDown at
    once without piling anything up, the lease is given up after its ttl;
    Redis back, the node reconnects on its own (one line) and leases work
    again.
    """
    digest = Digest.of(b"during an outage")
    events: list[LogEvent] = []

    async def scenario(nodes: Nodes) -> None:
        a = nodes("a", lease_ttl=1.0, timeout=0.5)
        lease = await a.acquire(digest)
        assert isinstance(lease, Lease) and a.available
        globalLogPublisher.addObserver(events.append)

        await nodes.in_thread(redis.stop)
        await nodes.until(lambda: not a.available, "the node to see Redis go")
        calls: list[Coroutine[Any, Any, object]] = []
        for i in range(50):
            calls += [
                a.acquire(Digest.of(b"%d" % i)),
                a.forget(Digest.of(b"%d" % i)),
                a.tag("docker.io", "x", "1"),
                a.touch(Digest.of(b"%d" % i)),
                a.total_size(),
            ]
        began = nodes.reactor.seconds()
        failures = await gatherResults(
            [Deferred.fromCoroutine(down(call)) for call in calls]
        )
        assert len(failures) == 250
        assert nodes.reactor.seconds() - began < 0.5  # at once, not per timeout
        # Nothing queued: the reactor's timers are the lease's and a retry.
        assert len(nodes.reactor.getDelayedCalls()) < 10

        why = await nodes.until(lambda: lease.lost.called, "the lease to be lost")
        assert why <= 1.5

        await nodes.in_thread(redis.start)
        await nodes.until(lambda: a.available, "the node to reconnect")
        # Redis came back empty, fence counter and all; tokens still grow.
        again = await a.acquire(digest)
        assert isinstance(again, Lease) and again.token > lease.token

    try:
        drive(redis.url, scenario)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [
        formatEvent(e)
        for e in events
        if str(e.get("log_format", "")).startswith("Redis at {where} is ")
    ]
    assert len(said) == 2, said
    assert "is unreachable" in said[0] and "is reachable" in said[1]


def test_frozen_redis_times_out_calls_and_the_node_recovers(redis: RedisServer) -> None:
    """
    Redis frozen (SIGSTOP: connections accepted, nothing answered): a call
    raises CoordinatorDown after the timeout, the node stays down while
    Redis says nothing, and comes back once it answers again.
    """
    info = redis.command("INFO", "server")
    assert isinstance(info, bytes)
    match = re.search(rb"process_id:(\d+)", info)
    assert match is not None
    pid = int(match.group(1))

    async def scenario(nodes: Nodes) -> None:
        a = nodes("a", lease_ttl=1.0, timeout=0.3)
        assert isinstance(await a.acquire(Digest.of(b"before")), Lease)
        os.kill(pid, signal.SIGSTOP)
        try:
            error = await down(a.acquire(Digest.of(b"while frozen")))
            assert "no answer within 0.3s" in str(error)
            assert not a.available
            # Reconnections reach the kernel's backlog but get no answer:
            # the node stays down instead of flapping.
            await nodes.sleep(2.0)
            assert not a.available
            await down(a.total_size())
        finally:
            os.kill(pid, signal.SIGCONT)
        await nodes.until(lambda: a.available, "the node to reconnect")
        assert isinstance(await a.acquire(Digest.of(b"after")), Lease)

    drive(redis.url, scenario)


def test_a_node_started_without_redis_works_alone(redis: RedisServer) -> None:
    """Nothing listens at the URL: calls raise CoordinatorDown, ``available``
    is false, and stopping the node leaves nothing running."""
    nowhere = f"redis://{LOCALHOST}:{free_port()}/0"

    async def scenario(nodes: Nodes) -> None:
        before = set(nodes.reactor.getDelayedCalls())  # the scenario's limits
        a = nodes("a", url=nowhere, timeout=0.5)
        await down(a.acquire(Digest.of(b"alone")))
        await down(a.peer_key())
        assert not a.available
        await a.stop()
        assert set(nodes.reactor.getDelayedCalls()) == before

    drive(redis.url, scenario)
