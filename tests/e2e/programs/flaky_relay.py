"""
An HTTP relay in front of a registry that resets the connection after the
first N bytes of every response body, ranged ones included: what a
congested mirror does.  Run as ``python flaky_relay.py --ready-file F
--log L --target-port P --cut-after N``.

Every request accepted on 127.0.0.1 goes on to 127.0.0.1:P (same method,
path and headers, but the hop-by-hop ones) and its answer comes back:
status, headers, then the body up to N bytes.  A longer body is cut there:
the relay sends nothing more, lets what it sent reach the client, and
aborts the connection (a TCP reset).  With N = 0 the client gets the
headers and then the reset.  Shorter bodies go through whole.

Each request is appended to ``--log`` as a JSON line once it is over:
``method``, ``path``, ``range`` (the header, or null), ``status``, ``sent``
(body bytes passed on) and ``cut`` (was it cut).  Binds a free port,
written as ``{"relay": N}`` to ``--ready-file``.  Twisted only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _serving import listen, pass_on, report_ready, run
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

#: how long a cut body's last bytes are given to reach the client before
#: the reset (which would discard them if still buffered)
FLUSH_DELAY = 0.2


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as log:
            log.write(json.dumps(entry, sort_keys=True) + "\n")


class Body(Protocol):
    """Passes an upstream body on to the client, up to the cut."""

    def __init__(self, request: Request, cut_after: int) -> None:
        self.request = request
        self.cut_after = cut_after
        self.sent = 0
        self.cut = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        if self.cut_after == 0:
            self._cut()

    def dataReceived(self, data: bytes) -> None:
        if self.cut:
            return
        room = self.cut_after - self.sent
        if len(data) <= room:
            self.request.write(data)
            self.sent += len(data)
            return
        if room:
            self.request.write(data[:room])
            self.sent += room
        self._cut()

    def _cut(self) -> None:
        self.cut = True
        self.request.write(b"")  # the headers at least
        self.request.unregisterProducer()
        self.transport.stopProducing()
        channel = self.request.channel
        reactor.callLater(  # type: ignore[attr-defined]
            FLUSH_DELAY,
            lambda: (
                channel.transport is not None and channel.transport.abortConnection()
            ),
        )

    def connectionLost(self, reason: Any) -> None:
        if not self.cut:
            self.request.unregisterProducer()
            if not self.request._disconnected:  # noqa: SLF001
                self.request.finish()
        self.done.callback(None)


class Relay(Resource):
    isLeaf = True

    def __init__(
        self, agent: Agent, target: str, cut_after: int, recorder: Recorder
    ) -> None:
        super().__init__()
        self.agent = agent
        self.target = target
        self.cut_after = cut_after
        self.recorder = recorder

    def render(self, request: Request) -> Any:
        Deferred.fromCoroutine(self.relay(request)).addErrback(
            lambda failure: failure.printTraceback()
        )
        return NOT_DONE_YET

    async def relay(self, request: Request) -> None:
        entry: dict[str, Any] = {
            "method": request.method.decode(),
            "path": request.path.decode(),
            "range": request.getHeader("Range"),
            "status": None,
            "sent": 0,
            "cut": False,
        }
        headers = pass_on(request.requestHeaders)
        try:
            response = await self.agent.request(
                request.method, self.target.encode() + request.uri, headers
            )
        except Exception as e:
            entry["error"] = str(e)
            self.recorder.record(entry)
            if not request._disconnected:  # noqa: SLF001
                request.setResponseCode(502)
                request.finish()
            return
        entry["status"] = response.code
        request.setResponseCode(response.code, response.phrase)
        pass_on(response.headers, request.responseHeaders)
        # The client takes Content-Length out of the headers (but a HEAD
        # answer's, whose length it sets to 0).
        if request.method != b"HEAD" and isinstance(response.length, int):
            request.setHeader("Content-Length", str(response.length))
        body = Body(request, self.cut_after)
        request.notifyFinish().addErrback(
            lambda _: body.transport is not None and body.transport.stopProducing()
        )
        response.deliverBody(body)
        await body.done
        entry["sent"], entry["cut"] = body.sent, body.cut
        self.recorder.record(entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--cut-after", type=int, required=True)
    options = parser.parse_args()
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    relay = Relay(
        agent,
        f"http://127.0.0.1:{options.target_port}",
        options.cut_after,
        Recorder(Path(options.log)),
    )

    async def start() -> None:
        report_ready(options.ready_file, {"relay": await listen(Site(relay))})

    run(start)


if __name__ == "__main__":
    main()
