"""
A TCP relay that slows the server's answers down, so that a test can act
(kill the upstream) while a large body is still on its way.  Run as
``python throttle_relay.py --ready-file F --log L --target-port P --rate B``.

Every connection accepted on 127.0.0.1 is relayed to 127.0.0.1:P: what the
client sends goes through at once, what the server answers is passed on at
no more than B bytes per second.  When the server's side closes, what is
buffered is delivered and the client's side is closed; when the server
cannot be reached, the client's side is closed at once.

Each connection is appended to ``--log`` as JSON lines (``{"event":
"connected"|"refused"|"closed", "bytes": N}``).  Binds a free port, written
as ``{"relay": N}`` to ``--ready-file``.  Twisted only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _serving import listen, report_ready, run
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall

TICKS = 100
#: the server is paused while this much is waiting to be passed on
HIGH_WATER = 1 << 20


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, sent: int = 0) -> None:
        with self.path.open("a") as log:
            log.write(json.dumps({"event": event, "bytes": sent}) + "\n")


class ServerSide(Protocol):
    """The relay's connection to the real server."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.queue(data)

    def connectionLost(self, reason: Any) -> None:
        self.client.server_gone()


class ClientSide(Protocol):
    """A connection from the client, relayed at a limited rate."""

    def __init__(self, target_port: int, rate: int, recorder: Recorder) -> None:
        self.target_port = target_port
        self.per_tick = max(1, rate // TICKS)
        self.recorder = recorder
        self.server: ServerSide | None = None
        self.pending: list[bytes] = []
        self.waiting = 0
        self.sent = 0
        self.early: list[bytes] = []
        self.server_closed = False
        self.pump = LoopingCall(self.tick)

    def connectionMade(self) -> None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.target_port, timeout=2)
        d = endpoint.connect(_OneShot(ServerSide(self)))
        d.addCallbacks(self.server_connected, self.server_refused)

    def server_connected(self, server: ServerSide) -> None:
        self.server = server
        self.recorder.record("connected")
        for data in self.early:
            server.transport.write(data)
        self.early = []
        self.pump.start(1.0 / TICKS, now=False).addErrback(lambda _: None)

    def server_refused(self, _: Any) -> None:
        self.recorder.record("refused")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.transport.write(data)

    def queue(self, data: bytes) -> None:
        self.pending.append(data)
        self.waiting += len(data)
        if self.waiting > HIGH_WATER and self.server is not None:
            self.server.transport.pauseProducing()

    def tick(self) -> None:
        budget = self.per_tick
        while budget and self.pending:
            head = self.pending[0]
            piece, rest = head[:budget], head[budget:]
            self.transport.write(piece)
            budget -= len(piece)
            self.waiting -= len(piece)
            self.sent += len(piece)
            if rest:
                self.pending[0] = rest
            else:
                self.pending.pop(0)
        if self.server is not None and self.waiting <= HIGH_WATER:
            self.server.transport.resumeProducing()
        if self.server_closed and not self.pending:
            self.transport.loseConnection()

    def server_gone(self) -> None:
        self.server_closed = True
        if not self.pump.running:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.recorder.record("closed", self.sent)
        if self.pump.running:
            self.pump.stop()
        if self.server is not None:
            self.server.transport.loseConnection()


class _OneShot(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class RelayFactory(Factory):
    def __init__(self, target_port: int, rate: int, recorder: Recorder) -> None:
        self.target_port = target_port
        self.rate = rate
        self.recorder = recorder

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = ClientSide(self.target_port, self.rate, self.recorder)
        protocol.factory = self
        return protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--rate", type=int, required=True)
    options = parser.parse_args()
    factory = RelayFactory(
        options.target_port, options.rate, Recorder(Path(options.log))
    )

    async def start() -> None:
        report_ready(options.ready_file, {"relay": await listen(factory)})

    run(start)


if __name__ == "__main__":
    main()
