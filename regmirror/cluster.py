"""
Several regmirror nodes acting as one cache, coordinated through Redis.

What the nodes share, all under one key prefix:

- ``lease:<digest>``: which node is downloading a digest, as
  ``"<token> <advertised URL>"``, set only if absent and with an expiry
  that the holder renews while it downloads.  The token comes from the
  ``fence`` counter, so tokens grow strictly across the cluster and a
  later holder always has the larger one.
- ``tag:<namespace>/<repository>:<tag>``: the origin's answer for a tag,
  ``"<digest> <confirmed>"``, expiring when the tag TTL runs out.
- ``peer-key``: a random secret for node-to-node requests.
- ``store:size`` (hash digest → bytes), ``store:used`` (sorted set digest →
  last use) and ``store:total``: the index of the shared store, which S3
  does not keep for us.

Every multi-step change is one Lua script, so that it is atomic and costs
one round trip.

Redis is a help, never a dependency: each call is bounded by ``timeout``
on the injected clock, and when Redis does not answer in time, or is known
to be unreachable, the call raises :class:`CoordinatorDown` (at once, when
it is known, so that nothing queues up while it is away) and the caller
works alone.  A call that times out drops the connection, which is then
made again with backoff.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import txredisapi
from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror.reference import Digest, parse_digest

#: The first reconnection comes this long after a loss; each failed attempt
#: doubles the wait, up to RECONNECT_MAX.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0
#: Uses of one blob are recorded at most this often by one node.
TOUCH_INTERVAL = 60.0
#: How many blobs' last recorded use a node remembers (for TOUCH_INTERVAL).
MAX_TOUCHED = 10_000
#: How long the peer key is used before it is read again (Redis may have
#: lost it, and another node may have set a new one).
PEER_KEY_REFRESH = 60.0
PEER_KEY_SIZE = 32

Connect = Callable[[IProtocolFactory], "Deferred[Any]"]

# KEYS: lease, fence.  ARGV: advertised URL, ttl in ms, the largest token
# this node has seen (a fence lost with Redis's data starts above it).
# -> {1, value} when taken, {0, value of the holder} when held.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local token = redis.call('INCR', KEYS[2])
if token <= tonumber(ARGV[3]) then
  token = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[2], string.format('%d', token))
end
local value = string.format('%d %s', token, ARGV[1])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""

# KEYS: lease.  ARGV: our value, ttl in ms.  -> 1 when renewed, 0 when lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease.  ARGV: our value.  -> 1 when deleted, 0 when not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: peer key.  ARGV: a candidate.  -> the cluster's key.
_PEER_KEY = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# KEYS: sizes, uses, total.  ARGV: digest, size, now.  -> the new total.
_STORED = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
"""

# KEYS: sizes, uses, total.  ARGV: digest.  -> 1 when it was indexed.
_FORGET = """
redis.call('ZREM', KEYS[2], ARGV[1])
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[3], -tonumber(old))
return 1
"""

# KEYS: uses, sizes.  ARGV: count.  -> {digest, size, digest, size, ...}
_LEAST_RECENTLY_USED = """
local names = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local found = {}
for _, name in ipairs(names) do
  found[#found + 1] = name
  found[#found + 1] = redis.call('HGET', KEYS[2], name) or '0'
end
return found
"""


class CoordinatorDown(Exception):
    """Redis is unreachable or too slow: the caller works alone."""


@frozen
class Lease:
    """
    This node's lease on a digest: it downloads, the others fetch from it.

    :ivar token: the fencing token, larger than every earlier holder's.
    :ivar value: what Redis holds under the lease key while it is ours.
    :ivar lost: fires with the reason if the lease is lost while held
        (another node holds it now, or Redis could not confirm it for
        longer than its ttl, so it has surely run out).  Never fires for a
        lease released with :meth:`Coordinator.release`.
    """

    digest: Digest
    token: int
    value: bytes = field(repr=False)
    lost: Deferred[str] = field(factory=Deferred, eq=False, repr=False)


@frozen
class Holder:
    """Another node's lease on a digest (or this node's, asked again)."""

    #: the URL it advertises to the other nodes
    url: str
    token: int


@define(eq=False)
class _Renewal:
    """Keeps one lease alive."""

    loop: LoopingCall
    #: when the lease has surely run out in Redis unless renewed before
    expiry: IDelayedCall

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        if self.expiry.active():
            self.expiry.cancel()


class _Factory(Factory):
    """
    Builds the connection's protocol.  txredisapi's protocol calls
    ``stopTrying`` and ``connectionError`` on its factory when AUTH or
    SELECT fail; reconnecting is ours to decide.
    """

    isLazy = False

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def buildProtocol(self, addr: object) -> Any:
        return self._coordinator._build()

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self._coordinator._refused(why)


def _parse_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """``redis://[[user]:password@]host[:port][/db]`` → its parts."""
    parts = urlsplit(url.strip())
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("the Redis URL must be redis://[:password@]host[:port][/db]")
    path = parts.path.lstrip("/")
    if not (path == "" or path.isdigit()):
        raise ValueError("the Redis URL's path must be a database number")
    port = parts.port or 6379
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, int(path or 0), username, password


class Coordinator:
    """
    This node's view of the cluster, through one Redis connection that is
    made again whenever it is lost.

    :ivar available: the last known state of Redis; each change is logged
        once and passed to every callable in ``on_change``.
    :ivar on_change: callables given the new state of ``available``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        redis_url: str,
        advertise: str,
        *,
        lease_ttl: float = 5.0,
        timeout: float = 1.0,
        prefix: str = "regmirror:",
        connect: Connect | None = None,
    ) -> None:
        """
        :param clock: times every call, renewal and reconnection; without
            *connect*, also the reactor that connects to Redis.
        :param redis_url: ``redis://[[user]:password@]host[:port][/db]``;
            the password (percent-encoded) never reaches a log line.
        :param advertise: the URL other nodes use to reach this one.
        :param lease_ttl: how long a lease outlives its holder's last renewal.
        :param timeout: how long a Redis call may take before Redis counts
            as down, for this call and until the connection is made again.
        :param connect: opens a connection for a protocol factory, like an
            endpoint's ``connect`` (tests); by default TCP to the URL's host.
        """
        host, port, db, username, password = _parse_url(redis_url)
        self.clock = clock
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.prefix = prefix
        #: where Redis is, for people: never the password
        self.where = f"{host}:{port}/{db}"
        self._db = db
        self._username = username
        self._password = password
        if connect is None:
            endpoint = HostnameEndpoint(cast(Any, clock), host, port, timeout=timeout)
            connect = endpoint.connect
        self._connect = connect
        self._factory = _Factory(self)
        self.available = False
        self.on_change: list[Callable[[bool], object]] = []
        #: whether ``available`` has been decided once (the first decision
        #: is logged whichever way it goes)
        self._known = False
        self._why = "not started"
        self._running = False
        self._stopping = False
        self._protocol: Any = None
        #: a connection waiting for its first answers, and its deadline
        self._setting_up: tuple[Any, IDelayedCall] | None = None
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        #: while set, calls wait for the first connection instead of failing
        self._starting: IDelayedCall | None = None
        self._waiting: list[Deferred[Any]] = []
        self._leases: dict[Lease, _Renewal] = {}
        self._touched: dict[Digest, float] = {}
        self._peer_key: tuple[bytes, float] | None = None
        #: the largest fencing token seen, so that tokens keep growing even
        #: if Redis comes back without its data
        self._highest_token = 0
        self._refusal = ""

    def __repr__(self) -> str:
        return f"<Coordinator {self.advertise} via redis {self.where}>"

    # -- the connection ---------------------------------------------------

    def start(self) -> None:
        """Connect to Redis, and keep connecting whenever the connection ends."""
        if self._running:
            return
        self._running = True
        self._starting = self.clock.callLater(self.timeout, self._start_over)
        self._open()

    async def stop(self) -> None:
        """Release this node's leases, stop every timer, close the connection."""
        if not self._running or self._stopping:
            return
        self._stopping = True
        releasing = [
            Deferred.fromCoroutine(self.release(lease)) for lease in list(self._leases)
        ]
        for d in releasing:
            d.addErrback(self._release_failed)
        await DeferredList(releasing)
        self._running = self._stopping = False
        for renewal in self._leases.values():
            renewal.stop()
        self._leases.clear()
        for call in (self._starting, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._starting = self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._fail_waiting("the coordinator stopped")
        if self._setting_up is not None:
            unready, deadline = self._setting_up
            self._setting_up = None
            deadline.cancel()
            unready.transport.abortConnection()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            closed: Deferred[Any] = protocol.whenDisconnected()
            protocol.transport.loseConnection()
            try:
                await self._bounded(closed, "closing the connection")
            except CoordinatorDown:
                protocol.transport.abortConnection()

    def _release_failed(self, failure: Failure) -> None:
        if failure.check(CoordinatorDown):
            self.log.info(
                "a lease was not released ({why}); it runs out on its own",
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("cannot release a lease", failure)

    def _open(self) -> None:
        self._retry = None
        attempt: Deferred[Any] = maybeDeferred(self._connect, self._factory)
        self._attempt = attempt
        timer = self.clock.callLater(self.timeout, attempt.cancel)

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            self._attempt = None
            return result

        attempt.addBoth(done).addErrback(self._cannot_connect)

    def _cannot_connect(self, failure: Failure) -> None:
        if not self._running:
            return  # stop() cancelled the attempt
        if failure.check(CancelledError):
            why = f"no connection within {self.timeout}s"
        else:
            why = f"cannot connect: {failure.getErrorMessage()}"
        self._down(why)
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        if (
            not self._running
            or self._attempt is not None
            or self._protocol is not None
            or (self._retry is not None and self._retry.active())
        ):
            return
        delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2**self._failures)
        self._failures += 1
        self._retry = self.clock.callLater(delay, self._open)

    def _build(self) -> Any:
        """A protocol for a new connection, watched until it is ready and lost."""
        protocol = txredisapi.RedisProtocol(
            charset=None,
            password=self._password,
            username=self._username,
            dbid=self._db or None,
            convertNumbers=False,
        )
        protocol.factory = self._factory
        # txredisapi schedules on the global reactor unless told otherwise.
        protocol.callLater = self.clock.callLater
        # The connection counts once Redis has answered on it (AUTH, SELECT,
        # then a PING), in time: a server that accepts connections and then
        # says nothing (stopped, swapping) is no better than none.
        deadline = self.clock.callLater(self.timeout, self._unready, protocol)
        self._setting_up = (protocol, deadline)
        protocol.whenConnected().addCallback(self._ping, deadline)
        protocol.whenDisconnected().addCallback(self._lost, deadline)
        return protocol

    def _ping(self, protocol: Any, deadline: IDelayedCall) -> None:
        def answered(_: object) -> None:
            if deadline.active():
                self._ready(protocol, deadline)

        def failed(failure: Failure) -> None:
            self.log.debug("PING failed: {why}", why=failure.getErrorMessage())

        protocol.execute_command("PING").addCallbacks(answered, failed)

    def _unready(self, protocol: Any) -> None:
        self._set_up(protocol)
        if self._running:
            self._down(f"no answer on a new connection within {self.timeout}s")
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def _set_up(self, protocol: Any) -> None:
        """*protocol*'s set-up is over, one way or the other."""
        if self._setting_up is not None and self._setting_up[0] is protocol:
            self._setting_up = None

    def _ready(self, protocol: Any, deadline: IDelayedCall) -> None:
        self._set_up(protocol)
        if deadline.active():
            deadline.cancel()
        if not self._running:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        self._failures = 0
        self._refusal = ""
        if self._starting is not None:
            if self._starting.active():
                self._starting.cancel()
            self._starting = None
        self._set_available(True, "connected")
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(protocol)

    def _lost(self, protocol: Any, deadline: IDelayedCall) -> None:
        self._set_up(protocol)
        if deadline.active():
            deadline.cancel()
        if self._protocol is protocol:
            self._protocol = None
            if self._running:
                self._down("lost the connection")
        self._reconnect_later()

    def _refused(self, why: str) -> None:
        """AUTH or SELECT failed (txredisapi's words, which hold no password)."""
        if why != self._refusal:
            self._refusal = why
            self.log.error(
                "Redis at {where} refused this node: {why}", where=self.where, why=why
            )
        self._down(why)

    def _start_over(self) -> None:
        """The first connection did not come in time: stop waiting for it."""
        self._starting = None
        if self._protocol is None:
            self._down(f"no connection within {self.timeout}s")

    def _down(self, why: str) -> None:
        self._why = why
        if self._starting is not None:
            if self._starting.active():
                self._starting.cancel()
            self._starting = None
        self._fail_waiting(why)
        self._set_available(False, why)

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(self._unreachable(why))

    def _unreachable(self, why: str) -> CoordinatorDown:
        return CoordinatorDown(f"Redis at {self.where} is unreachable: {why}")

    def _set_available(self, available: bool, why: str) -> None:
        if self._known and available == self.available:
            return
        self._known = True
        self.available = available
        if available:
            self.log.info(
                "Redis at {where} is reachable: coordinating with the other nodes",
                where=self.where,
            )
        else:
            self.log.warn(
                "Redis at {where} is unreachable ({why}): this node works alone "
                "until it is back",
                where=self.where,
                why=why,
            )
        for hook in list(self.on_change):
            try:
                hook(available)
            except Exception:
                self.log.failure("a Redis state watcher failed")

    async def _bounded(self, d: Deferred[Any], what: str) -> Any:
        """*d*'s result, or :class:`CoordinatorDown` after ``timeout``."""
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        timer = self.clock.callLater(self.timeout, expire)
        try:
            return await d
        except CancelledError:
            if expired:
                raise self._unreachable(f"{what} took over {self.timeout}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _call(self, what: str, send: Callable[[Any], Deferred[Any]]) -> Any:
        """
        Run one command (*send* given the connection) within ``timeout``:
        waiting for the first connection while the node starts, failing at
        once while Redis is known to be away.

        :raises CoordinatorDown: when Redis cannot answer in time, or
            answers with an error.
        """
        current: Deferred[Any] | None = None
        expired = False
        protocol = self._protocol

        def expire() -> None:
            nonlocal expired
            expired = True
            if current is not None:
                current.cancel()

        timer = self.clock.callLater(self.timeout, expire)
        try:
            if protocol is None:
                if self._starting is None:
                    raise self._unreachable(self._why)
                current = Deferred(self._waiting.remove)
                self._waiting.append(current)
                protocol = await current
            current = send(protocol)
            return await current
        except CancelledError:
            if not expired:
                raise  # our caller gave up
            if protocol is not None and self._protocol is protocol:
                # No answer in time: the connection is stuck or the server
                # overloaded.  Either way nothing more is sent on it.
                self._protocol = None
                self._down(f"no answer within {self.timeout}s")
                protocol.transport.abortConnection()
            raise self._unreachable(
                f"{what}: no answer within {self.timeout}s"
            ) from None
        except txredisapi.ConnectionError as error:
            raise self._unreachable(f"{what}: {error}") from None
        except txredisapi.RedisError as error:
            raise CoordinatorDown(
                f"Redis at {self.where} failed {what}: {error}"
            ) from None
        finally:
            if timer.active():
                timer.cancel()

    async def _eval(
        self, what: str, script: str, keys: list[str], args: list[object]
    ) -> Any:
        return await self._call(what, lambda p: p.eval(script, keys, args))

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    # -- leases -----------------------------------------------------------

    def _lease_key(self, digest: Digest) -> str:
        return self._key("lease:", str(digest))

    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl * 1000))

    async def acquire(self, digest: Digest) -> Lease | Holder:
        """
        Take the lease on *digest*, or learn who holds it.  A lease taken
        here is renewed every ``lease_ttl / 3`` until released.

        :raises CoordinatorDown: when Redis cannot answer.
        """
        sent = self.clock.seconds()
        reply = await self._eval(
            "acquire",
            _ACQUIRE,
            [self._lease_key(digest), self._key("fence")],
            [self.advertise, self._ttl_ms(), self._highest_token],
        )
        try:
            taken, value = int(reply[0]), bytes(reply[1])
        except (TypeError, ValueError, IndexError):
            raise CoordinatorDown(
                f"Redis answered acquire with {reply!r:.80}"
            ) from None
        holder = self._parse_holder(digest, value)
        if not taken:
            return holder
        lease = Lease(digest, holder.token, value)
        self._renew_from(lease, sent)
        return lease

    def _parse_holder(self, digest: Digest, value: bytes) -> Holder:
        token, _, url = value.decode("utf-8", "replace").partition(" ")
        try:
            holder = Holder(url, int(token))
        except ValueError:
            raise CoordinatorDown(
                f"the lease on {digest} holds no token: {value!r:.80}"
            ) from None
        self._highest_token = max(self._highest_token, holder.token)
        return holder

    def _renew_from(self, lease: Lease, sent: float) -> None:
        loop = LoopingCall(self._renew, lease)
        loop.clock = self.clock
        expiry = self.clock.callLater(
            max(0.0, sent + self.lease_ttl - self.clock.seconds()),
            self._lose,
            lease,
            f"Redis did not confirm it for {self.lease_ttl}s, so it ran out",
        )
        self._leases[lease] = _Renewal(loop, expiry)
        loop.start(self.lease_ttl / 3, now=False).addErrback(
            lambda failure: self.log.failure(
                "renewing the lease on {digest} stopped",
                failure,
                digest=str(lease.digest),
            )
        )

    def _renew(self, lease: Lease) -> Deferred[None]:
        return Deferred.fromCoroutine(self._renew_once(lease))

    async def _renew_once(self, lease: Lease) -> None:
        if lease not in self._leases:
            return
        sent = self.clock.seconds()
        try:
            kept = await self._eval(
                "renew",
                _RENEW,
                [self._lease_key(lease.digest)],
                [lease.value, self._ttl_ms()],
            )
        except CoordinatorDown as error:
            # The expiry timer decides when this has gone on too long.
            self.log.debug(
                "lease on {digest} not renewed: {why}",
                digest=str(lease.digest),
                why=str(error),
            )
            return
        renewal = self._leases.get(lease)
        if renewal is None:
            return  # released or lost meanwhile
        if kept == 1:
            renewal.expiry.reset(max(0.0, sent + self.lease_ttl - self.clock.seconds()))
        else:
            self._lose(lease, "it ran out or another node holds it now")

    def _lose(self, lease: Lease, why: str) -> None:
        renewal = self._leases.pop(lease, None)
        if renewal is None:
            return
        renewal.stop()
        self.log.warn(
            "lost the lease on {digest} (token {token}): {why}",
            digest=str(lease.digest),
            token=lease.token,
            why=why,
        )
        lease.lost.callback(why)

    def abandon(self, lease: Lease) -> None:
        """
        Stop renewing *lease* without releasing it: it runs out within
        ``lease_ttl``, as if this node had died (the tests' way of killing
        a holder).
        """
        renewal = self._leases.pop(lease, None)
        if renewal is not None:
            renewal.stop()

    async def release(self, lease: Lease) -> None:
        """
        Stop renewing *lease* and delete it if it is still ours (another
        node's lease on the same digest is left alone).

        :raises CoordinatorDown: when Redis cannot answer; the lease then
            runs out within ``lease_ttl``.
        """
        self.abandon(lease)
        await self._eval(
            "release", _RELEASE, [self._lease_key(lease.digest)], [lease.value]
        )

    async def holder(self, digest: Digest) -> Holder | None:
        """Who holds the lease on *digest*, if anyone."""
        value = await self._call("holder", lambda p: p.get(self._lease_key(digest)))
        if value is None:
            return None
        return self._parse_holder(digest, bytes(value))

    # -- tags ---------------------------------------------------------------

    def _tag_key(self, namespace: str, repository: str, tag: str) -> str:
        # Namespaces are host names (no "/"), repositories have no ":", tags
        # neither: the key reads back one way only.
        return self._key("tag:", namespace, "/", repository, ":", tag)

    async def tag(
        self, namespace: str, repository: str, tag: str
    ) -> tuple[Digest, float] | None:
        """What the origin said *tag* points at, and when, if still fresh."""
        value = await self._call(
            "tag", lambda p: p.get(self._tag_key(namespace, repository, tag))
        )
        if value is None:
            return None
        try:
            digest, confirmed = bytes(value).decode("ascii").split(" ")
            return parse_digest(digest), float(confirmed)
        except Exception:
            self.log.warn(
                "ignoring an unreadable tag answer for {repository}:{tag}",
                repository=repository,
                tag=tag,
            )
            return None

    async def set_tag(
        self,
        namespace: str,
        repository: str,
        tag: str,
        digest: Digest,
        confirmed: float,
        ttl: float,
    ) -> None:
        """
        Share the origin's answer for *tag*, confirmed at *confirmed*: it
        is good until ``confirmed + ttl``, then Redis forgets it.
        """
        remaining = confirmed + ttl - self.clock.seconds()
        if remaining <= 0:
            return
        key = self._tag_key(namespace, repository, tag)
        value = f"{digest} {confirmed!r}"
        ms = max(1, round(remaining * 1000))
        await self._call("set_tag", lambda p: p.set(key, value, pexpire=ms))

    # -- the peer key -------------------------------------------------------

    async def peer_key(self) -> bytes:
        """
        The cluster's secret for node-to-node requests: set by the first
        node that asks, read by the others, read again every
        ``PEER_KEY_REFRESH`` seconds.  Should Redis have lost it, the next
        node to ask sets its own copy again, so the nodes agree once more.

        :raises CoordinatorDown: when Redis cannot answer and this node
            never learnt the key (a key it learnt is used meanwhile).
        """
        now = self.clock.seconds()
        if self._peer_key is not None and now - self._peer_key[1] < PEER_KEY_REFRESH:
            return self._peer_key[0]
        candidate = (
            self._peer_key[0]
            if self._peer_key is not None
            else secrets.token_bytes(PEER_KEY_SIZE)
        )
        try:
            key = await self._eval(
                "peer_key", _PEER_KEY, [self._key("peer-key")], [candidate]
            )
        except CoordinatorDown:
            if self._peer_key is not None:
                return self._peer_key[0]
            raise
        self._peer_key = (bytes(key), now)
        return self._peer_key[0]

    # -- the shared store's index -------------------------------------------

    def _index_keys(self) -> list[str]:
        return [
            self._key("store:size"),
            self._key("store:used"),
            self._key("store:total"),
        ]

    async def stored(self, digest: Digest, size: int) -> None:
        """Record *digest* as in the shared store, *size* bytes, used now."""
        await self._eval(
            "stored",
            _STORED,
            self._index_keys(),
            [str(digest), size, self.clock.seconds()],
        )

    async def stored_size(self, digest: Digest) -> int | None:
        """The size of *digest* in the shared store, if it is there."""
        sizes = self._key("store:size")
        value = await self._call("stored_size", lambda p: p.hget(sizes, str(digest)))
        return None if value is None else int(value)

    async def touch(self, digest: Digest) -> None:
        """
        Record a use of *digest* (if indexed), at most once per
        ``TOUCH_INTERVAL`` from this node.
        """
        now = self.clock.seconds()
        last = self._touched.get(digest)
        if last is not None and now - last < TOUCH_INTERVAL:
            return
        uses = self._key("store:used")
        await self._call(
            "touch",
            lambda p: p.execute_command("ZADD", uses, "XX", now, str(digest)),
        )
        if len(self._touched) >= MAX_TOUCHED:
            self._touched = {
                d: t for d, t in self._touched.items() if now - t < TOUCH_INTERVAL
            }
        self._touched[digest] = now

    async def total_size(self) -> int:
        """The bytes of every blob in the shared store's index."""
        total = self._key("store:total")
        value = await self._call("total_size", lambda p: p.get(total))
        return 0 if value is None else max(0, int(value))

    async def least_recently_used(self, count: int) -> list[tuple[Digest, int]]:
        """The *count* blobs used longest ago, oldest first, with their sizes."""
        if count <= 0:
            return []
        sizes, uses, _ = self._index_keys()
        reply = await self._eval(
            "least_recently_used", _LEAST_RECENTLY_USED, [uses, sizes], [count]
        )
        found: list[tuple[Digest, int]] = []
        for name, size in zip(reply[::2], reply[1::2], strict=True):
            try:
                found.append((parse_digest(bytes(name).decode("ascii")), int(size)))
            except Exception:
                self.log.warn("ignoring {name!r} in the store's index", name=name)
        return found

    async def forget(self, digest: Digest) -> None:
        """Remove *digest* from the index (once its object is deleted)."""
        await self._eval("forget", _FORGET, self._index_keys(), [str(digest)])
        self._touched.pop(digest, None)


__all__ = ["Coordinator", "CoordinatorDown", "Holder", "Lease"]
