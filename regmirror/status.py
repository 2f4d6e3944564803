"""
The status page: one small HTML page (no build step, no external asset)
that polls ``/_status.json`` and shows upstream health per namespace, stale
mirrors, hit ratio and bytes saved over time, cache usage and the
downloads in flight.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from twisted.web.server import Request

from regmirror._resource import ReadOnlyResource

#: One history sample per this many seconds, this many samples kept (1 h).
SAMPLE_INTERVAL = 10.0
SAMPLES = 360


class History:
    """Cumulative counters sampled over time, for the page's chart."""

    def __init__(self, read: Callable[[], dict[str, float]], now: Callable[[], float]):
        self._read = read
        self._now = now
        self.samples: deque[dict[str, float]] = deque(maxlen=SAMPLES)

    def sample(self) -> None:
        self.samples.append({"time": self._now(), **self._read()})


class StatusJSON(ReadOnlyResource):
    isLeaf = True

    def __init__(self, document: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Cache-Control", "no-store")
        return json.dumps(self._document(), sort_keys=True).encode("utf-8")


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
