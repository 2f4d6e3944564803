"""
The status page: one small HTML page (no build step, no external asset)
that polls ``/_status.json`` and shows upstream health per namespace, stale
mirrors, hit ratio and bytes saved over time, cache usage and the
downloads in flight.

With ``[access]``, the document names a repository (a stale mirror's tag,
a download's digest) only to a client who may pull it (:class:`Shown`):
its address may pull the namespace anonymously, its bearer token names
the repository, or it logs in as a user (Basic).  Everyone else gets the
rest: upstream health, totals, the number of downloads.  A namespace with
``credentials = passthrough`` has its repositories named to no one.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from regmirror.access.gate import Gate
from regmirror.access.tokens import Tokens
from regmirror.errors import RegistryError
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


@frozen
class Shown:
    """
    Which repositories a status document may name to one client.

    :ivar everything: all of them (no ``[access]``, or a user), but for
        *hidden*.
    :ivar namespaces: those whose every repository it may pull.
    :ivar grants: ``(namespace, repository)`` its token names.
    :ivar hidden: namespaces none of whose repositories is named to
        anyone: those with ``credentials = passthrough``, where only the
        upstream knows who may read what (and ``/token`` grants whatever
        it is asked).
    """

    everything: bool = False
    namespaces: frozenset[str] = frozenset()
    grants: frozenset[tuple[str, str]] = frozenset()
    hidden: frozenset[str] = frozenset()

    def __call__(self, namespace: str | None, repository: str | None) -> bool:
        """May the client see *repository* of *namespace* (``None``:
        unknown, as of a download another worker process runs)?"""
        if namespace in self.hidden:
            return False
        if self.everything:
            return True
        if namespace is None:
            return False
        return namespace in self.namespaces or (namespace, repository) in self.grants


#: What a mirror without ``[access]`` shows everyone.
EVERYTHING = Shown(everything=True)


async def shown_to(gate: Gate | None, request: Request, namespaces: list[str]) -> Shown:
    """What the status document may name to the client of *request*."""
    if gate is None:
        return EVERYTHING
    address = gate.client(request)
    anonymous = frozenset(n for n in namespaces if gate.anonymous_allowed(address, n))
    raw = request.requestHeaders.getRawHeaders(b"authorization") or []
    scheme, _, credentials = (
        raw[0].decode("latin-1") if len(raw) == 1 else ""
    ).partition(" ")
    grants: frozenset[tuple[str, str]] = frozenset()
    if scheme.lower() == "bearer" and credentials.strip():
        claims = gate.tokens.verify(credentials.strip())
        if claims is not None:
            grants = Tokens.grants(claims)
    elif scheme.lower() == "basic" and credentials.strip():
        try:
            user = await gate.login(address, credentials.strip())
        except RegistryError:  # throttled: no more than anonymous
            user = None
        if user is not None:
            return Shown(everything=True, hidden=gate.passthrough)
    return Shown(False, anonymous, grants, gate.passthrough)


class StatusJSON(ReadOnlyResource):
    """
    ``/_status.json``: the document *document* makes, as JSON, naming only
    the repositories the client may pull (with *gate*, the ``[access]``
    rules for *namespaces*).
    """

    isLeaf = True

    def __init__(
        self,
        document: Callable[[Shown], Awaitable[dict[str, Any]]],
        gate: Gate | None = None,
        namespaces: list[str] | None = None,
    ) -> None:
        super().__init__()
        self._document = document
        self._gate = gate
        self._namespaces = list(namespaces or [])

    def render_GET(self, request: Request) -> int:
        async def body() -> bytes:
            shown = await shown_to(self._gate, request, self._namespaces)
            document = await self._document(shown)
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
