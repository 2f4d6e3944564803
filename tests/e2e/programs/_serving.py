"""
What every helper program of ``programs/`` does to serve: listen on
127.0.0.1 (a port the kernel picks), say where in its ready file (written
whole: the harness reads it as soon as it exists), run the reactor, and
stop it with the traceback if starting failed.

The programs are run as ``sys.executable programs/NAME.py``, so this
folder is on their path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.web.http_headers import Headers

#: Headers of one connection, not passed on by the relays.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)


def pass_on(source: Headers, target: Headers | None = None) -> Headers:
    """Copy *source*'s end-to-end headers into *target* (a new one if none)."""
    target = Headers() if target is None else target
    for name, values in source.getAllRawHeaders():
        if name.lower() not in HOP_BY_HOP:
            target.setRawHeaders(name, values)
    return target


async def listen(factory: IProtocolFactory) -> int:
    """Listen on 127.0.0.1 with *factory*; the port."""
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    listening = await endpoint.listen(factory)
    port: int = listening.getHost().port
    return port


def report_ready(ready_file: str, ports: dict[str, int]) -> None:
    """Write *ports* to *ready_file*, whole."""
    ready = Path(ready_file)
    partial = ready.with_suffix(".partial")
    partial.write_text(json.dumps(ports))
    os.replace(partial, ready)


def run(start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run the reactor, *start* first; a start that fails stops it."""

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: Deferred.fromCoroutine(start()).addErrback(failed)
    )
    reactor.run()  # type: ignore[attr-defined]
