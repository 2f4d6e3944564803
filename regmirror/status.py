"""
The status page: one small HTML page (no build step, no external asset)
that polls ``/_status.json`` and shows upstream health per namespace, stale
mirrors, hit ratio and bytes saved over time, cache usage and the
downloads in flight.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from regmirror.http.resource import ReadOnlyResource, answer_later

#: One history sample per this many seconds, this many samples kept (1 h).
SAMPLE_INTERVAL = 10.0
SAMPLES = 360


class History:
    """
    Cumulative counters sampled over time, for the page's chart.  *read*
    may take a while (it asks the other worker processes): the sample
    takes the time it was asked at.
    """

    log = Logger()

    def __init__(
        self,
        read: Callable[[], Awaitable[dict[str, float]]],
        now: Callable[[], float],
    ):
        self._read = read
        self._now = now
        self.samples: deque[dict[str, float]] = deque(maxlen=SAMPLES)

    def sample(self) -> Deferred[None]:
        """Take a sample; never fails (a timer runs it: it would stop)."""
        return Deferred.fromCoroutine(self._sample())

    async def _sample(self) -> None:
        now = self._now()
        try:
            read = await self._read()
        except Exception:
            self.log.failure("cannot sample the totals")
            return
        self.samples.append({"time": now, **read})


class StatusJSON(ReadOnlyResource):
    """``/_status.json``: the document *document* makes, as JSON."""

    isLeaf = True

    def __init__(self, document: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request: Request) -> int:
        async def body() -> bytes:
            document = await self._document()
            request.setHeader("Content-Type", "application/json")
            request.setHeader("Cache-Control", "no-store")
            return json.dumps(document, sort_keys=True).encode("utf-8")

        return answer_later(request, body, "the status document")


class StatusPage(ReadOnlyResource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        request.setHeader(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'",
        )
        return PAGE.encode("utf-8")


#: The page, shipped beside this module.
PAGE = (resources.files("regmirror") / "status.html").read_text(encoding="utf-8")
