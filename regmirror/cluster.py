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
works alone (see :mod:`regmirror._redis`).
"""

from __future__ import annotations

import secrets

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror._redis import CoordinatorDown, RedisClient
from regmirror.reference import Digest, parse_digest

#: Uses of one blob are recorded at most this often by one node.
TOUCH_INTERVAL = 60.0
#: How many blobs' last recorded use a node remembers (for TOUCH_INTERVAL).
MAX_TOUCHED = 10_000
#: How long the peer key is used before it is read again (Redis may have
#: lost it, and another node may have set a new one).
PEER_KEY_REFRESH = 60.0
PEER_KEY_SIZE = 32

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


class Coordinator:
    """This node's view of the cluster, through Redis."""

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
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """
        :param clock: times every call, renewal and reconnection; without
            *endpoint*, also the reactor that connects to Redis.
        :param redis_url: ``redis://[[user]:password@]host[:port][/db]``;
            the password (percent-encoded) never reaches a log line.
        :param advertise: the URL other nodes use to reach this one.
        :param lease_ttl: how long a lease outlives its holder's last renewal.
        :param timeout: how long a Redis call may take before Redis counts
            as down, for this call and until the connection is made again.
        :param endpoint: where Redis is (tests); by default TCP to the
            URL's host.
        """
        self._redis = RedisClient(clock, redis_url, timeout=timeout, endpoint=endpoint)
        self.clock = clock
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.prefix = prefix
        #: where Redis is, for people: never the password
        self.where = self._redis.where
        self._stopping = False
        self._leases: dict[Lease, _Renewal] = {}
        self._touched: dict[Digest, float] = {}
        self._peer_key: tuple[bytes, float] | None = None
        #: the largest fencing token seen, so that tokens keep growing even
        #: if Redis comes back without its data
        self._highest_token = 0

    def __repr__(self) -> str:
        return f"<Coordinator {self.advertise} via redis {self.where}>"

    @property
    def available(self) -> bool:
        """The last known state of Redis; each change is logged once."""
        return self._redis.available

    def start(self) -> None:
        """Connect to Redis, and keep connecting whenever the connection ends."""
        self._redis.start()

    async def stop(self) -> None:
        """Release this node's leases, stop every timer, close the connection."""
        if not self._redis.running or self._stopping:
            return
        self._stopping = True
        releasing = [
            Deferred.fromCoroutine(self.release(lease)) for lease in list(self._leases)
        ]
        for d in releasing:
            d.addErrback(self._release_failed)
        await DeferredList(releasing)
        for renewal in self._leases.values():
            renewal.stop()
        self._leases.clear()
        try:
            await self._redis.stop()
        finally:
            self._stopping = False

    def _release_failed(self, failure: Failure) -> None:
        if failure.check(CoordinatorDown):
            self.log.info(
                "a lease was not released ({why}); it runs out on its own",
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("cannot release a lease", failure)

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
        reply = await self._redis.eval(
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
            kept = await self._redis.eval(
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

    async def release(self, lease: Lease) -> None:
        """
        Stop renewing *lease* and delete it if it is still ours (another
        node's lease on the same digest is left alone).

        :raises CoordinatorDown: when Redis cannot answer; the lease then
            runs out within ``lease_ttl``.
        """
        renewal = self._leases.pop(lease, None)
        if renewal is not None:
            renewal.stop()
        await self._redis.eval(
            "release", _RELEASE, [self._lease_key(lease.digest)], [lease.value]
        )

    # -- tags ---------------------------------------------------------------

    def _tag_key(self, namespace: str, repository: str, tag: str) -> str:
        # Namespaces are host names (no "/"), repositories have no ":", tags
        # neither: the key reads back one way only.
        return self._key("tag:", namespace, "/", repository, ":", tag)

    async def tag(
        self, namespace: str, repository: str, tag: str
    ) -> tuple[Digest, float] | None:
        """What the origin said *tag* points at, and when, if still fresh."""
        value = await self._redis.call(
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
        await self._redis.call("set_tag", lambda p: p.set(key, value, pexpire=ms))

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
            key = await self._redis.eval(
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
        await self._redis.eval(
            "stored",
            _STORED,
            self._index_keys(),
            [str(digest), size, self.clock.seconds()],
        )

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
        await self._redis.call(
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
        value = await self._redis.call("total_size", lambda p: p.get(total))
        return 0 if value is None else max(0, int(value))

    async def least_recently_used(self, count: int) -> list[tuple[Digest, int]]:
        """The *count* blobs used longest ago, oldest first, with their sizes."""
        if count <= 0:
            return []
        sizes, uses, _ = self._index_keys()
        reply = await self._redis.eval(
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
        await self._redis.eval("forget", _FORGET, self._index_keys(), [str(digest)])
        self._touched.pop(digest, None)


__all__ = ["Coordinator", "CoordinatorDown", "Holder", "Lease"]
