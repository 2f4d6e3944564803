"""
A Redis in memory for unit tests: a few commands and the coordinator's Lua
scripts (leases, the peer key, the shared store's index) answered in RESP
over an in-memory transport, so that txredisapi's real protocol does the
talking, with key expiry on a :class:`Clock` and the faults tests need.
The end-to-end suite runs against a real ``redis-server`` instead.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from regmirror import cluster


class ResponseError(Exception):
    """An error reply."""


def _encode(reply: object) -> bytes:
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, ResponseError):
        return b"-ERR %s\r\n" % str(reply).encode()
    if isinstance(reply, bool | int):
        return b":%d\r\n" % reply
    if isinstance(reply, str):
        return b"+%s\r\n" % reply.encode()
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if isinstance(reply, list):
        return b"*%d\r\n" % len(reply) + b"".join(_encode(r) for r in reply)
    raise TypeError(reply)


def _decode_command(data: bytes) -> list[bytes]:
    """One RESP array of bulk strings (txredisapi writes one per command)."""
    header, rest = data.split(b"\r\n", 1)
    assert header[:1] == b"*", data
    args = []
    for _ in range(int(header[1:])):
        length_line, rest = rest.split(b"\r\n", 1)
        length = int(length_line[1:])
        args.append(rest[:length])
        rest = rest[length + 2 :]
    assert rest == b"", data
    return args


@implementer(IStreamClientEndpoint)
class FakeRedis:
    """
    A Redis with a few commands, the coordinator's lease and peer-key
    scripts, key expiry on the clock, and the faults the tests need:
    refusing connections (``down``) and never answering (``silent``).  It
    is the endpoint of the nodes that reach it; :meth:`link` gives a node
    one of its own, which a test can cut.
    """

    def __init__(self, clock: Clock, password: bytes | None = None) -> None:
        self.clock = clock
        self.password = password
        self.data: dict[bytes, bytes] = {}
        self.expiry: dict[bytes, float] = {}
        self.zsets: dict[bytes, dict[bytes, float]] = {}
        self.hashes: dict[bytes, dict[bytes, bytes]] = {}
        self.commands: list[list[bytes]] = []
        self.wires: list[Wire] = []
        self.down = False
        self.silent = False
        self.connections = 0
        #: when each connection was asked for, by the clock
        self.attempts: list[float] = []
        self.scripts = {
            cluster._ACQUIRE.encode(): self._acquire,
            cluster._RENEW.encode(): self._renew,
            cluster._RELEASE.encode(): self._release,
            cluster._PEER_KEY.encode(): self._peer_key,
            cluster._STORED.encode(): self._stored,
            cluster._FORGET.encode(): self._forget,
            cluster._LEAST_RECENTLY_USED.encode(): self._least_recently_used,
        }
        self.by_sha = {hashlib.sha1(s).hexdigest().encode(): s for s in self.scripts}

    # -- the network ------------------------------------------------------

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        """An endpoint's ``connect``: to this server, unless it is down."""
        self.connections += 1
        self.attempts.append(self.clock.seconds())
        if self.down:
            return fail(ConnectionRefusedError("fake Redis is down"))
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        wire = Wire(self, protocol)
        self.wires.append(wire)
        protocol.makeConnection(wire)
        return succeed(protocol)

    def drop(self) -> None:
        """Close every connection (a restart)."""
        for wire in self.wires:
            wire.drop()
        self.wires = []

    def link(self) -> Link:
        """A node's own way here, which a test can cut."""
        return Link(self)

    def get(self, key: bytes) -> bytes | None:
        """What ``GET`` answers for *key* now."""
        return self._live(key)

    def named(self, name: bytes) -> list[list[bytes]]:
        """The commands received with this name (scripts by their text)."""
        return [args for args in self.commands if self._name(args) == name]

    def _name(self, args: list[bytes]) -> bytes | None:
        command = args[0].upper()
        if command == b"EVAL":
            return args[1]
        if command == b"EVALSHA":
            return self.by_sha.get(args[1])
        return command

    # -- the commands -----------------------------------------------------

    def _live(self, key: bytes) -> bytes | None:
        if key in self.expiry and self.clock.seconds() >= self.expiry[key]:
            del self.data[key], self.expiry[key]
        return self.data.get(key)

    def _set(self, key: bytes, value: bytes, px: int | None = None) -> None:
        self.data[key] = value
        self.expiry.pop(key, None)
        if px is not None:
            self.expiry[key] = self.clock.seconds() + px / 1000

    def answer(self, args: list[bytes]) -> object:
        name, rest = args[0].upper(), args[1:]
        if name == b"AUTH":
            return "OK" if rest[-1] == self.password else ResponseError("WRONGPASS")
        if name == b"SELECT":
            return "OK"
        if name == b"PING":
            return "PONG"
        if name == b"GET":
            return self._live(rest[0])
        if name == b"SET":
            key, value, options = rest[0], rest[1], [o.upper() for o in rest[2:]]
            if b"NX" in options and self._live(key) is not None:
                return None
            px = int(options[options.index(b"PX") + 1]) if b"PX" in options else None
            self._set(key, value, px)
            return "OK"
        if name == b"HGET":
            return self.hashes.get(rest[0], {}).get(rest[1])
        if name == b"ZADD":
            key, flag, score, member = rest
            assert flag == b"XX"
            zset = self.zsets.setdefault(key, {})
            if member in zset:
                zset[member] = float(score)
            return 0
        if name in (b"EVAL", b"EVALSHA"):
            script = rest[0] if name == b"EVAL" else self.by_sha.get(rest[0])
            if script is None:
                return ResponseError("NOSCRIPT")
            count = int(rest[1])
            keys, argv = rest[2 : 2 + count], rest[2 + count :]
            return self.scripts[script](keys, argv)
        return ResponseError(f"unknown command {name!r}")

    def _acquire(self, keys: list[bytes], argv: list[bytes]) -> object:
        held = self._live(keys[0])
        if held is not None:
            return [0, held]
        token = max(int(self._live(keys[1]) or 0), int(argv[2])) + 1
        self._set(keys[1], b"%d" % token)
        value = b"%d %s" % (token, argv[0])
        self._set(keys[0], value, int(argv[1]))
        return [1, value]

    def _renew(self, keys: list[bytes], argv: list[bytes]) -> object:
        if self._live(keys[0]) != argv[0]:
            return 0
        self.expiry[keys[0]] = self.clock.seconds() + int(argv[1]) / 1000
        return 1

    def _release(self, keys: list[bytes], argv: list[bytes]) -> object:
        if self._live(keys[0]) != argv[0]:
            return 0
        self.data.pop(keys[0])
        self.expiry.pop(keys[0], None)
        return 1

    def _peer_key(self, keys: list[bytes], argv: list[bytes]) -> object:
        if self._live(keys[0]) is None:
            self._set(keys[0], argv[0])
        return self._live(keys[0])

    def _stored(self, keys: list[bytes], argv: list[bytes]) -> object:
        sizes, uses, total = keys
        digest, size, now = argv
        old = int(self.hashes.get(sizes, {}).get(digest, b"0"))
        self.hashes.setdefault(sizes, {})[digest] = size
        self.zsets.setdefault(uses, {})[digest] = float(now)
        value = int(self._live(total) or 0) + int(size) - old
        self._set(total, b"%d" % value)
        return value

    def _forget(self, keys: list[bytes], argv: list[bytes]) -> object:
        sizes, uses, total = keys
        self.zsets.get(uses, {}).pop(argv[0], None)
        old = self.hashes.get(sizes, {}).pop(argv[0], None)
        if old is None:
            return 0
        self._set(total, b"%d" % (int(self._live(total) or 0) - int(old)))
        return 1

    def _least_recently_used(self, keys: list[bytes], argv: list[bytes]) -> object:
        uses, sizes = keys
        ranked = sorted(self.zsets.get(uses, {}).items(), key=lambda e: (e[1], e[0]))
        found: list[bytes] = []
        for name, _ in ranked[: int(argv[0])]:
            found += [name, self.hashes.get(sizes, {}).get(name, b"0")]
        return found


@implementer(IStreamClientEndpoint)
class Link:
    """
    One node's way to a :class:`FakeRedis`: while ``down``, it refuses to
    connect, as if that node were cut off from Redis (or dead).
    """

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.down = False
        self.wires: list[Wire] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.down:
            self.server.connections += 1
            return fail(ConnectionRefusedError("cut off from fake Redis"))
        connected = self.server.connect(factory)
        if connected.called:
            self.wires.append(self.server.wires[-1])
        return connected

    def drop(self) -> None:
        """Close this node's connections."""
        for wire in self.wires:
            wire.drop()
        self.wires = []


class Wire(StringTransport):
    """
    The client's side of a connection to :class:`FakeRedis`.  Answers come
    at once; a close the client asks for reaches its protocol on the next
    turn of the clock, as from a reactor.
    """

    def __init__(self, server: FakeRedis, protocol: Any) -> None:
        super().__init__()
        self.server = server
        self.protocol = protocol
        self.aborted = False

    def write(self, data: bytes) -> None:
        if not self.connected:
            return
        args = _decode_command(data)
        self.server.commands.append(args)
        if self.server.silent:
            return
        # Line by line, so that txredisapi never has bytes left over after
        # a bulk string (which it would hand back through callLater).
        for piece in re.split(rb"(?<=\r\n)", _encode(self.server.answer(args))):
            if piece and self.connected:
                self.protocol.dataReceived(piece)

    def loseConnection(self) -> None:
        if self.connected:
            self.connected = False
            self.server.clock.callLater(0, self._lost)

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def drop(self) -> None:
        """Closed by the server: the client learns at once."""
        if self.connected:
            self.connected = False
            self._lost()

    def _lost(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone("Bye.")))
