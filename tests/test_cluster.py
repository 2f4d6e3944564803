"""
The cluster coordinator's own logic, on a :class:`Clock`: lease renewal and
loss, bounded calls, fail-fast while Redis is away, reconnection, and what
reaches the logs.

Redis is :class:`memory_redis.FakeRedis`, a few commands and the
coordinator's scripts answered in RESP over an in-memory transport, so that
txredisapi's real protocol does the talking; tests look at what it holds.
The end-to-end suite runs the same against a real ``redis-server``
(``tests/e2e/test_cluster_redis.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
from memory_redis import FakeRedis
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from regmirror import _redis, cluster
from regmirror.cluster import Coordinator, CoordinatorDown, Holder, Lease
from regmirror.reference import Digest

DIGEST = Digest.of(b"one blob")
OTHER = Digest.of(b"another blob")
URL = "redis://127.0.0.1:6379/0"


def node(
    clock: Clock,
    redis: IStreamClientEndpoint,
    name: str = "a",
    url: str = URL,
    *,
    ttl: float = 3.0,
    timeout: float = 1.0,
    start: bool = True,
) -> Coordinator:
    coordinator = Coordinator(
        clock,
        url,
        f"http://node-{name}:5000",
        lease_ttl=ttl,
        timeout=timeout,
        endpoint=redis,
    )
    if start:
        coordinator.start()
    return coordinator


def messages(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def lease_key(digest: Digest) -> bytes:
    return b"regmirror:lease:" + str(digest).encode()


def stop(clock: Clock, *coordinators: Coordinator) -> list[Deferred[None]]:
    """Stop *coordinators*, and let their connections close."""
    stopping = [Deferred.fromCoroutine(c.stop()) for c in coordinators]
    clock.advance(0)
    return stopping


@implementer(IStreamClientEndpoint)
class Pending:
    """An endpoint whose connections are made when the test says so."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[Any], IProtocolFactory]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((d, factory))
        return d


class LeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.a = node(self.clock, self.redis, "a")
        self.b = node(self.clock, self.redis, "b")

    def acquire(self, coordinator: Coordinator, digest: Digest = DIGEST) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(coordinator.acquire(digest)))

    def test_first_node_leases_the_others_learn_its_url_and_token(self) -> None:
        """The first acquire takes the lease; the next gets the holder."""
        lease = self.acquire(self.a)
        holder = self.acquire(self.b)
        assert isinstance(lease, Lease)
        assert holder == Holder("http://node-a:5000", lease.token)
        assert self.redis.get(lease_key(DIGEST)) == lease.value
        assert lease.value == b"%d http://node-a:5000" % lease.token
        assert self.redis.get(lease_key(OTHER)) is None

    def test_tokens_keep_growing_when_redis_comes_back_empty(self) -> None:
        """The fence counter lost with Redis's data restarts above the
        largest token the node has seen."""
        tokens = [self.acquire(self.a, Digest.of(b"%d" % i)).token for i in range(3)]
        assert tokens == [1, 2, 3]
        self.redis.data.clear()
        assert self.acquire(self.a).token == 4

    def test_renewed_every_third_of_the_ttl_and_kept_past_it(self) -> None:
        """Renewals every ttl/3 keep the lease for as long as it is held."""
        lease = self.acquire(self.a)
        self.clock.pump([1.0] * 10)
        assert len(self.redis.named(cluster._RENEW.encode())) == 10
        assert isinstance(self.acquire(self.b), Holder)
        self.assertNoResult(lease.lost)

    def test_renewal_that_finds_another_value_loses_the_lease(self) -> None:
        """Another node's value under the key: the holder learns at once."""
        lease = self.acquire(self.a)
        self.redis.data[lease_key(DIGEST)] = b"99 http://node-b:5000"
        self.clock.advance(1.0)
        assert "another node" in self.successResultOf(lease.lost)
        renewals = len(self.redis.named(cluster._RENEW.encode()))
        self.clock.pump([1.0] * 5)
        assert len(self.redis.named(cluster._RENEW.encode())) == renewals

    def test_lease_lost_when_redis_is_silent_for_its_ttl(self) -> None:
        """
        Without a confirmed renewal for ttl seconds (counted from the last
        confirmed request's sending), the lease has surely run out.
        """
        lease = self.acquire(self.a)
        self.clock.advance(1.0)  # renewed at t=1: good until t=4
        self.redis.silent = True
        self.clock.pump([0.5] * 5)  # t=3.5
        self.assertNoResult(lease.lost)
        self.clock.advance(0.5)
        assert "ran out" in self.successResultOf(lease.lost)

    def test_release_deletes_only_its_own_lease(self) -> None:
        """
        A lease that ran out while its holder was cut off from Redis, and
        went to another node, is not deleted by the holder's late release.
        """
        link = self.redis.link()
        c = node(self.clock, link, "c")
        old = self.acquire(c)
        link.down = True
        link.drop()
        self.clock.advance(3.0)
        new = self.acquire(self.b)
        assert isinstance(new, Lease) and new.token > old.token
        link.down = False
        self.clock.advance(_redis.RECONNECT_MAX)
        assert c.available
        self.successResultOf(Deferred.fromCoroutine(c.release(old)))
        assert self.redis.get(lease_key(DIGEST)) == new.value

    def test_release_stops_renewal_and_frees_the_digest(self) -> None:
        lease = self.acquire(self.a)
        self.successResultOf(Deferred.fromCoroutine(self.a.release(lease)))
        self.clock.pump([1.0] * 5)
        assert self.redis.named(cluster._RENEW.encode()) == []
        assert isinstance(self.acquire(self.b), Lease)
        self.assertNoResult(lease.lost)

    def test_stop_releases_leases_and_leaves_no_timer(self) -> None:
        lease = self.acquire(self.a)
        for stopped in stop(self.clock, self.a, self.b):
            self.successResultOf(stopped)
        assert self.clock.getDelayedCalls() == []
        assert self.redis.named(cluster._RELEASE.encode())[0][-1] == lease.value
        assert not any(w.connected for w in self.redis.wires)


class RedisDownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.events: list[LogEvent] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def down(self, d: Deferred[Any]) -> CoordinatorDown:
        failure = self.failureResultOf(d, CoordinatorDown)
        assert isinstance(failure.value, CoordinatorDown)
        return failure.value

    def test_silent_redis_fails_a_call_after_exactly_the_timeout(self) -> None:
        """No answer: CoordinatorDown at ``timeout``, and the connection is dropped."""
        a = node(self.clock, self.redis, timeout=1.0)
        self.redis.silent = True
        d = Deferred.fromCoroutine(a.acquire(DIGEST))
        self.clock.advance(0.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        assert "no answer within 1.0s" in str(self.down(d))
        assert a.available is False
        assert self.redis.wires[0].aborted

    def test_known_down_fails_at_once_without_queueing(self) -> None:
        """
        While Redis is known to be away, calls fail on the spot: nothing is
        sent, nothing waits, no timer is left behind per call.
        """
        self.redis.down = True
        a = node(self.clock, self.redis)
        assert a.available is False
        sent = len(self.redis.commands)
        for _ in range(100):
            self.down(Deferred.fromCoroutine(a.acquire(DIGEST)))
            self.down(Deferred.fromCoroutine(a.tag("docker.io", "library/x", "1")))
        assert len(self.redis.commands) == sent
        assert len(self.clock.getDelayedCalls()) == 1  # the next attempt

    def test_calls_wait_for_the_first_connection_within_the_timeout(self) -> None:
        """At start-up a call waits for the connection, at most ``timeout``."""
        pending = Pending()
        a = node(self.clock, pending, "a", timeout=1.0)
        early = Deferred.fromCoroutine(a.acquire(DIGEST))
        self.clock.advance(0.5)
        self.assertNoResult(early)
        waiting, factory = pending.attempts.pop()
        waiting.callback(self.redis.connect(factory).result)
        assert isinstance(self.successResultOf(early), Lease)

        b = node(self.clock, pending, "b", timeout=1.0)
        late = Deferred.fromCoroutine(b.acquire(DIGEST))
        self.clock.advance(1.0)
        assert "no connection within 1.0s" in str(self.down(late))
        assert b.available is False

    def test_reconnects_with_backoff_and_logs_each_change_once(self) -> None:
        """One warning when Redis goes, one line when it is back."""
        a = node(self.clock, self.redis)
        assert a.available is True
        self.redis.down = True
        self.redis.drop()
        assert a.available is False
        attempts = self.redis.connections
        self.clock.pump([0.1] * 100)  # 10 s
        # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 + 2 + 2 < 10 < ... + 2
        assert 8 <= self.redis.connections - attempts <= 9
        self.redis.down = False
        self.clock.pump([0.1] * 21)
        assert a.available is True
        text = messages(self.events)
        assert len([t for t in text if "is unreachable" in t]) == 1
        assert len([t for t in text if "is reachable" in t]) == 2  # start, back
        assert isinstance(
            self.successResultOf(Deferred.fromCoroutine(a.acquire(DIGEST))), Lease
        )

    def test_a_server_that_accepts_but_never_answers_stays_down(self) -> None:
        """
        Connections accepted, PING never answered (a frozen server): each is
        dropped after the timeout and the node stays down, without flapping,
        until Redis answers again; stopping then leaves no timer behind.
        """
        self.redis.silent = True
        a = node(self.clock, self.redis, timeout=1.0)
        self.clock.pump([0.1] * 100)
        assert a.available is False
        assert self.redis.connections >= 5
        assert all(wire.aborted for wire in self.redis.wires[:-1])
        self.redis.silent = False
        self.clock.pump([0.1] * 30)
        assert a.available is True
        text = messages(self.events)
        assert len([t for t in text if "is unreachable" in t]) == 1
        (stopped,) = stop(self.clock, a)
        self.successResultOf(stopped)
        assert self.clock.getDelayedCalls() == []

    def waits(self, count: int) -> list[float]:
        """The next *count* waits between connection attempts, each let
        run out (there must be no other timer)."""
        found = []
        for _ in range(count):
            self.clock.advance(0)  # a close the client asked for reaches it
            (retry,) = self.clock.getDelayedCalls()
            wait = retry.getTime() - self.clock.seconds()
            found.append(round(wait, 6))
            self.clock.advance(wait + 1e-9)
        return found

    def test_reconnections_back_off_and_are_said_once(self) -> None:
        """
        After a loss the next attempt comes ``RECONNECT_FIRST`` later, and
        each refused one doubles the wait up to ``RECONNECT_MAX``; one
        warning says it all (no line per attempt).  Once a connection is
        answered on, the next loss starts from the shortest wait again.
        """
        a = node(self.clock, self.redis)
        self.redis.down = True
        self.redis.drop()
        assert self.waits(8) == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
        assert self.redis.connections == 9
        text = messages(self.events)
        assert len([t for t in text if "is unreachable" in t]) == 1
        assert not [t for t in text if "retry" in t.lower()]
        self.redis.down = False
        self.waits(1)
        assert a.available is True
        self.redis.drop()
        assert self.waits(1) == [0.1]

    def test_connections_redis_refuses_back_off_as_well(self) -> None:
        """
        A connection Redis refuses (a wrong password) is made, then closed:
        the waits still grow as for connections that fail, instead of
        starting again at each connection made.
        """
        self.redis.password = b"right"
        a = node(self.clock, self.redis, url="redis://:wrong@127.0.0.1/0")
        assert self.waits(7) == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        assert a.available is False
        assert len(self.redis.named(b"AUTH")) == 8
        assert all(wire.aborted for wire in self.redis.wires)

    def test_a_call_without_answer_drops_the_connection_and_a_new_one_comes(
        self,
    ) -> None:
        """
        A call that times out on a connection Redis answered on before
        drops it (nothing more is sent on it); the next connection is made
        ``RECONNECT_FIRST`` later and used once Redis answers on it.
        """
        a = node(self.clock, self.redis, timeout=1.0)
        self.redis.silent = True
        d = Deferred.fromCoroutine(a.tag("docker.io", "library/x", "1"))
        self.clock.advance(1.0)
        self.down(d)
        self.redis.silent = False
        (first,) = self.redis.wires
        assert first.aborted
        assert self.waits(1) == [0.1]
        assert a.available is True
        assert self.redis.wires[1:] and self.redis.wires[1].connected
        assert isinstance(
            self.successResultOf(Deferred.fromCoroutine(a.acquire(DIGEST))), Lease
        )

    def test_a_connection_lost_before_redis_answered_is_made_again(self) -> None:
        """
        Redis closes a new connection before answering its PING (it
        restarts): nothing is decided or logged, the connection is made
        again ``RECONNECT_FIRST`` later, and calls made meanwhile go out on
        it once Redis answers.
        """
        self.redis.silent = True
        a = node(self.clock, self.redis, timeout=1.0)
        waiting = Deferred.fromCoroutine(a.acquire(DIGEST))
        self.redis.drop()
        self.redis.silent = False
        self.clock.advance(0.09)
        assert self.redis.wires == []
        self.clock.advance(0.02)
        assert len(self.redis.wires) == 1
        assert a.available is True
        assert isinstance(self.successResultOf(waiting), Lease)
        assert not [t for t in messages(self.events) if "unreachable" in t]

    def test_stop_while_connecting_leaves_nothing_behind(self) -> None:
        """stop() before a connection was ever made gives up the attempt;
        calls then fail at once."""
        pending = Pending()
        a = node(self.clock, pending)
        (stopped,) = stop(self.clock, a)
        self.successResultOf(stopped)
        ((attempt, _),) = pending.attempts
        assert attempt.called
        assert self.clock.getDelayedCalls() == []
        self.down(Deferred.fromCoroutine(a.acquire(DIGEST)))

    def test_stop_during_set_up_leaves_nothing_behind(self) -> None:
        self.redis.silent = True
        a = node(self.clock, self.redis, timeout=1.0)
        (stopped,) = stop(self.clock, a)
        self.successResultOf(stopped)
        assert not self.redis.wires[0].connected
        assert self.clock.getDelayedCalls() == []

    def test_password_is_sent_but_never_shown(self) -> None:
        """AUTH and SELECT from the URL; logs and repr name host:port/db only."""
        self.redis.password = b"s3cr%t"
        url = "redis://:s3cr%25t@127.0.0.1:6379/2"
        a = node(self.clock, self.redis, url=url)
        assert a.available is True
        assert self.redis.commands[:3] == [
            [b"AUTH", b"s3cr%t"],
            [b"SELECT", b"2"],
            [b"PING"],
        ]
        self.redis.down = True
        self.redis.drop()
        self.down(Deferred.fromCoroutine(a.acquire(DIGEST)))
        text = messages(self.events) + [repr(a), a.where]
        assert a.where == "127.0.0.1:6379/2"
        assert not [t for t in text if "s3cr" in t]

    def test_wrong_password_is_down_and_said_once(self) -> None:
        self.redis.password = b"right"
        a = node(self.clock, self.redis, url="redis://:wrong@127.0.0.1/0")
        self.clock.pump([0.5] * 20)
        assert a.available is False
        self.down(Deferred.fromCoroutine(a.acquire(DIGEST)))
        refused = [t for t in messages(self.events) if "refused" in t]
        assert len(refused) == 1 and "wrong" not in refused[0]


class CachedValueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.redis = FakeRedis(self.clock)
        self.a = node(self.clock, self.redis, "a")
        self.b = node(self.clock, self.redis, "b")

    def result(self, coroutine: Any) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def test_peer_key_is_shared_cached_and_restored(self) -> None:
        """One key for every node; read once a minute; set again if lost."""
        key = self.result(self.a.peer_key())
        assert len(key) == cluster.PEER_KEY_SIZE
        assert self.result(self.b.peer_key()) == key
        sent = len(self.redis.commands)
        assert self.result(self.a.peer_key()) == key
        assert len(self.redis.commands) == sent
        self.redis.data.clear()  # Redis restarted empty
        self.clock.advance(cluster.PEER_KEY_REFRESH)
        assert self.result(self.a.peer_key()) == key
        assert self.result(self.b.peer_key()) == key

    def test_touch_is_sent_at_most_once_a_minute_per_digest(self) -> None:
        for _ in range(5):
            self.result(self.a.touch(DIGEST))
        self.result(self.a.touch(OTHER))
        assert len(self.redis.named(b"ZADD")) == 2
        self.clock.advance(cluster.TOUCH_INTERVAL)
        self.result(self.a.touch(DIGEST))
        assert len(self.redis.named(b"ZADD")) == 3

    def test_tag_expires_ttl_after_its_confirmation(self) -> None:
        """The Redis expiry counts from when the origin confirmed the tag."""
        now = self.clock.seconds()
        self.result(self.a.set_tag("docker.io", "library/x", "1", DIGEST, now - 10, 15))
        assert self.redis.named(b"SET")[-1][-2:] == [b"PX", b"5000"]
        assert self.result(self.b.tag("docker.io", "library/x", "1")) == (
            DIGEST,
            now - 10,
        )
        sent = len(self.redis.commands)
        self.result(self.a.set_tag("docker.io", "library/x", "2", DIGEST, now - 10, 10))
        assert len(self.redis.commands) == sent
        self.clock.advance(5)
        assert self.result(self.b.tag("docker.io", "library/x", "1")) is None


@pytest.mark.parametrize(
    "url",
    ["http://h:1/0", "redis://", "redis://h/x", "redis://h:99999/0"],
)
def test_bad_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        Coordinator(Clock(), url, "http://a")
