"""
The cluster's connection to Redis: kept by a :class:`ClientService`, which
makes it again with backoff whenever it ends, and used once Redis has
answered on it.  Every command is bounded by ``timeout`` on the injected
clock; while Redis is known to be away, commands fail at once, so that
nothing queues up.  A command that times out drops the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import txredisapi
from attrs import frozen
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: The first reconnection comes this long after a loss; each failed attempt
#: doubles the wait, up to RECONNECT_MAX.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0
_BACKOFF = backoffPolicy(RECONNECT_FIRST, RECONNECT_MAX, 2.0, jitter=lambda: 0.0)


class CoordinatorDown(Exception):
    """Redis is unreachable or too slow: the caller works alone."""


def parse_url(url: str) -> tuple[str, int, int, str | None, str | None]:
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


class _Connections(Factory):
    """ClientService's factory: the client sees each connection made."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    def buildProtocol(self, addr: object) -> Any:
        return self._client._connection()


@implementer(IStreamClientEndpoint)
@frozen
class _Attempts:
    """
    How ClientService connects: each attempt bounded by the client's
    timeout (name resolution included), and its failure told to the client.
    """

    endpoint: IStreamClientEndpoint
    client: RedisClient

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        client = self.client
        d = self.endpoint.connect(factory).addTimeout(client.timeout, client.clock)
        return d.addErrback(client._cannot_connect)


class _Keeper(ClientService):
    # ClientService says every retry at info level: while Redis is away, a
    # line every RECONNECT_MAX seconds.  The client says each change of
    # state once instead.  ``_log`` is ClientService's private logger, the
    # only way to quiet it (tests/test_private_apis.py fails if it changes).
    _log = Logger(
        observer=FilteringLogObserver(
            globalLogPublisher, [LogLevelFilterPredicate(LogLevel.warn)]
        )
    )


class RedisClient:
    """
    Commands to Redis, within ``timeout`` each, on a connection made again
    whenever it is lost.

    :ivar available: the last known state of Redis; each change is logged
        once.
    :ivar where: where Redis is, for people: never the password.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        url: str,
        *,
        timeout: float,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """
        :param clock: times every command and reconnection; without
            *endpoint*, also the reactor that connects to Redis.
        :param url: ``redis://[[user]:password@]host[:port][/db]``.
        :param timeout: how long a command may take before Redis counts as
            down, for this command and until the connection is made again.
        :param endpoint: where Redis is (tests); by default TCP to the
            URL's host.
        """
        host, port, db, username, password = parse_url(url)
        self.clock = clock
        self.timeout = timeout
        self.where = f"{host}:{port}/{db}"
        self._db = db
        self._username = username
        self._password = password
        if endpoint is None:
            endpoint = HostnameEndpoint(cast(Any, clock), host, port)
        self._service = _Keeper(
            _Attempts(endpoint, self),
            _Connections(self),
            retryPolicy=self._retry_delay,
            clock=clock,
        )
        self.available = False
        #: whether ``available`` has been decided once: until then commands
        #: wait for the first connection, and the first decision is logged
        #: whichever way it goes
        self._known = False
        self._why = "not started"
        #: the connection in use: Redis has answered on it
        self._protocol: Any = None
        #: the latest connection, answered on or not
        self._latest: Any = None
        self._failures = 0
        self._waiting: list[Deferred[Any]] = []
        self._refusal = ""

    @property
    def running(self) -> bool:
        """Between :meth:`start` and :meth:`stop`."""
        return bool(self._service.running)

    def start(self) -> None:
        """Connect, and keep connecting whenever the connection ends."""
        if not self.running:
            self._service.startService()

    async def stop(self) -> None:
        """Stop connecting; close the connection."""
        if not self.running:
            return
        latest = self._latest
        stopped = self._service.stopService()
        self._why = "stopped"
        self._fail_waiting(self._why)
        try:
            await stopped.addTimeout(self.timeout, self.clock)
        except TimeoutError:
            # The server stopped reading: what was written never leaves.
            if latest is not None:
                latest.transport.abortConnection()

    async def call(self, what: str, send: Callable[[Any], Deferred[Any]]) -> Any:
        """
        Run one command (*send* given the connection) within ``timeout``:
        waiting for the first connection while starting, failing at once
        while Redis is known to be away.

        :raises CoordinatorDown: when Redis cannot answer in time, or
            answers with an error.
        """
        if self._protocol is None and (self._known or not self.running):
            raise self._unreachable(self._why)
        sending = Deferred.fromCoroutine(self._send(send))
        try:
            return await sending.addTimeout(self.timeout, self.clock)
        except TimeoutError:
            protocol, self._protocol = self._protocol, None
            if protocol is not None:
                # The command went on this connection (one that is lost
                # fails its commands at once), and it is stuck or the
                # server overloaded: nothing more is sent on it.
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

    async def eval(
        self, what: str, script: str, keys: list[str], args: list[object]
    ) -> Any:
        """Run a Lua *script* (sent once per connection, then by its hash)."""
        return await self.call(what, lambda p: p.eval(script, keys, args))

    async def _send(self, send: Callable[[Any], Deferred[Any]]) -> Any:
        protocol = self._protocol
        if protocol is None:
            first: Deferred[Any] = Deferred(self._waiting.remove)
            self._waiting.append(first)
            protocol = await first
        return await send(protocol)

    # -- the connection ---------------------------------------------------

    def _retry_delay(self, attempt: int) -> float:
        # ClientService counts failed attempts from its last connection,
        # even one Redis refused or never answered on (see _connection):
        # ours run up to the last connection that answered.
        delay = _BACKOFF(self._failures)
        self._failures += 1
        return delay

    def _cannot_connect(self, failure: Failure) -> Failure:
        if self.running:  # else stop() cancelled the attempt
            if failure.check(TimeoutError):
                self._down(f"no connection within {self.timeout}s")
            else:
                self._down(f"cannot connect: {failure.getErrorMessage()}")
        return failure

    def _connection(self) -> Any:
        """
        A protocol for a new connection, used once Redis answers on it.

        Not ClientService's ``prepareConnection``: a connection that ends
        while that runs, or after it failed, raises ``NoTransition`` inside
        ClientService (Twisted 26.10).  So ClientService keeps every
        connection it makes, and this decides which to use.
        """
        protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
        # txredisapi schedules on the global reactor unless told otherwise.
        protocol.callLater = self.clock.callLater
        self._latest = protocol
        Deferred.fromCoroutine(self._use(protocol)).addErrback(
            lambda failure: self.log.failure("a Redis connection failed", failure)
        )
        return protocol

    async def _use(self, protocol: Any) -> None:
        """
        Use *protocol* from when Redis has answered on it in time (AUTH,
        SELECT, then a PING: a server that accepts connections and then
        says nothing, stopped or swapping, is no better than none) until it
        is lost.
        """
        hello = Deferred.fromCoroutine(self._hello(protocol))
        try:
            await hello.addTimeout(self.timeout, self.clock)
        except TimeoutError:
            if self.running:
                self._down(f"no answer on a new connection within {self.timeout}s")
            protocol.transport.abortConnection()
            return
        except txredisapi.ConnectionError as error:
            self.log.debug("a new Redis connection ended: {why}", why=str(error))
            return
        except txredisapi.RedisError as error:
            # Redis's words, which hold no password.
            self._refused(str(error))
            protocol.transport.abortConnection()
            return
        self._protocol = protocol
        self._failures = 0
        self._refusal = ""
        self._set_available(True, "connected")
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(protocol)
        await protocol.whenDisconnected()
        if self._protocol is protocol:
            self._protocol = None
            if self.running:
                self._down("lost the connection")

    async def _hello(self, protocol: Any) -> None:
        await protocol.whenConnected()
        if self._password is not None:
            await protocol.auth(self._password, self._username)
        if self._db:
            await protocol.select(self._db)
        await protocol.ping()

    def _refused(self, why: str) -> None:
        if why != self._refusal:
            self._refusal = why
            self.log.error(
                "Redis at {where} refused this node: {why}", where=self.where, why=why
            )
        self._down(why)

    def _down(self, why: str) -> None:
        self._why = why
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
