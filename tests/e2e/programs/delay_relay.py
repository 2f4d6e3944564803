"""
An HTTP relay in front of a registry whose answers can be slowed down, or
withheld, while it runs: an origin that becomes slow or silent.  Run as
``python delay_relay.py --ready-file F --log L --target-port P --control C``.

Every request accepted on 127.0.0.1 is appended to ``--log`` as a JSON
line (``method``, ``path``) as it arrives; then it waits the ``delay`` (in
seconds) that the JSON file ``--control`` says at that moment (none
without the file; ``3600``: an origin that accepts and says nothing), and
goes on to 127.0.0.1:P (same method, path and headers, but the hop-by-hop
ones), whose answer comes back whole.  A path that the control file's
``gone`` (a regular expression) matches is answered 404
``MANIFEST_UNKNOWN`` instead, after the delay: a tag deleted at the origin.
The control file is replaced whole by whoever changes it.  Binds a free
port, written as ``{"relay": N}`` to ``--ready-file``.  Twisted only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from _serving import listen, pass_on, report_ready, run
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


class Relay(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, target: str, log: Path, control: Path) -> None:
        super().__init__()
        self.agent = agent
        self.target = target
        self.log = log
        self.control = control

    def settings(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.control.read_text()))
        except FileNotFoundError:
            return {}

    def render(self, request: Request) -> Any:
        with self.log.open("a") as log:
            entry = {"method": request.method.decode(), "path": request.path.decode()}
            log.write(json.dumps(entry, sort_keys=True) + "\n")
        Deferred.fromCoroutine(self.relay(request)).addErrback(
            lambda failure: failure.printTraceback()
        )
        return NOT_DONE_YET

    async def relay(self, request: Request) -> None:
        settings = self.settings()
        delay = float(settings.get("delay", 0))
        if delay > 0:
            await deferLater(reactor, delay, lambda: None)
        if request._disconnected:  # noqa: SLF001
            return
        gone = settings.get("gone")
        if gone and re.search(gone, request.path.decode()):
            body = json.dumps(
                {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "gone"}]}
            ).encode()
            request.setResponseCode(404)
            request.setHeader("Content-Type", "application/json")
            request.setHeader("Content-Length", str(len(body)))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()
            return
        headers = pass_on(request.requestHeaders)
        try:
            response = await self.agent.request(
                request.method, self.target.encode() + request.uri, headers
            )
            body = await readBody(response)
        except Exception:
            if not request._disconnected:  # noqa: SLF001
                request.setResponseCode(502)
                request.finish()
            return
        if request._disconnected:  # noqa: SLF001
            return
        request.setResponseCode(response.code, response.phrase)
        pass_on(response.headers, request.responseHeaders)
        # The client takes Content-Length out of the headers (but a HEAD
        # answer's, whose length it sets to 0).
        if request.method != b"HEAD":
            request.setHeader("Content-Length", str(len(body)))
            request.write(body)
        request.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--control", required=True)
    options = parser.parse_args()
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    relay = Relay(
        agent,
        f"http://127.0.0.1:{options.target_port}",
        Path(options.log),
        Path(options.control),
    )

    async def start() -> None:
        report_ready(options.ready_file, {"relay": await listen(Site(relay))})

    run(start)


if __name__ == "__main__":
    main()
